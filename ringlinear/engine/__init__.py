"""Serving engine: continuous batching over the hybrid cache (paged KV for softmax layers, state slots for
linear layers). Offline use: `LLM(model_dir).generate(prompts, SamplingParams(...))`. Design: docs/serving.md."""
from .config import EngineConfig
from .engine import LLMEngine
from .outputs import RequestError, RequestOutput
from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "RequestError"]
