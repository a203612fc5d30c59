from .reference import attention_with_prefix, causal_attention_varlen

__all__ = ["attention_with_prefix", "causal_attention_varlen"]
