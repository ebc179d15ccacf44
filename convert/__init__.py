"""hotcold.convert: Hugging Face safetensors checkpoints -> mixed-precision GGUF (+ cold expert copies)."""
from .archs import ARCHITECTURES, ConvertError
from .pipeline import ConvertResult, cold_path_for, convert

__all__ = ["ARCHITECTURES", "ConvertError", "ConvertResult", "cold_path_for", "convert"]
