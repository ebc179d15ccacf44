"""hotcold: quantized inference for Mixture-of-Experts models with hot/cold expert tiers."""
__version__ = "0.1.0"
