from .reference import lm_head_fp32

__all__ = ["lm_head_fp32"]
