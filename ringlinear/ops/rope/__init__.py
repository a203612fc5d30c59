from .reference import apply_rope, rope_cos_sin, rope_parameters

__all__ = ["apply_rope", "rope_cos_sin", "rope_parameters"]
