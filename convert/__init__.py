"""hotcold.convert: Hugging Face safetensors checkpoints -> mixed-precision GGUF (+ cold expert copies)."""
from hotcold.keys import cold_path_for

from .archs import ARCHITECTURES, ConvertError
from .pipeline import ConvertResult, convert

__all__ = ["ARCHITECTURES", "ConvertError", "ConvertResult", "cold_path_for", "convert"]
