"""Offline API: `LLM(model_dir).generate(prompts, SamplingParams(...))` and `LLM.chat(messages, ...)`."""
from __future__ import annotations

from .config import EngineConfig
from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """All prompts are submitted at once and run with continuous batching; results come back in prompt order.

    Engine settings are keyword arguments (`LLM(dir, max_num_seqs=8, num_kv_blocks=64)`), see EngineConfig.
    """

    def __init__(self, model_dir: str, config: EngineConfig | None = None, **engine_kwargs):
        if config is not None and engine_kwargs:
            raise ValueError("pass either config or engine keyword arguments, not both")
        self.engine = LLMEngine(model_dir, config or EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stop the other ranks of a tensor/expert-parallel engine (`with LLM(...) as llm:` does it)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids, or a list of token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
            plist = params
        else:
            plist = [params or SamplingParams()] * len(prompts)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for rid in ids:  # on an exception (or Ctrl-C) leave the engine clean
                if rid not in done:
                    self.engine.abort_request(rid)
        return [done[r] for r in ids]

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None,
             **template_kwargs) -> list[RequestOutput]:
        """messages: one conversation (a list of {role, content}) or a list of conversations; rendered by
        `LLMEngine.chat_prompt`, as the server renders them. `template_kwargs` are template variables."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.engine.chat_prompt(c, **template_kwargs) for c in convs], params)
