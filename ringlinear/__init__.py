"""ringlinear: the Ring-linear-2.0 hybrid-attention MoE models — model, kernels, training and serving.

Importing the package needs only torch; Triton, CUDA and the server stack load lazily where used.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .models.config import RingLinearConfig  # noqa: E402
from .models.presets import get_preset  # noqa: E402


def __getattr__(name):  # lazy: keep `import ringlinear` cheap
    if name == "RingLinearForCausalLM":
        from .models.modeling import RingLinearForCausalLM
        return RingLinearForCausalLM
    if name == "HybridCache":
        from .models.cache import HybridCache
        return HybridCache
    if name == "generate":
        from .generation import generate
        return generate
    if name == "load_tokenizer":
        from .models.tokenizer import load_tokenizer
        return load_tokenizer
    raise AttributeError(f"module 'ringlinear' has no attribute {name!r}")


__all__ = ["RingLinearConfig", "get_preset", "RingLinearForCausalLM", "HybridCache", "generate", "load_tokenizer"]
