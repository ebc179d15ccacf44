"""hotcold: quantized inference for Mixture-of-Experts models with hot/cold expert tiers."""
from hotcold.kernel_cache import use_kernel_cache

__version__ = "0.1.0"

use_kernel_cache()


def __getattr__(name: str):
    # `hotcold.Model` without importing the engine (and compiling kernels) on `import hotcold`.
    if name in ("Model", "ModelBusyError"):
        from hotcold.engine import api
        return getattr(api, name)
    raise AttributeError(name)
