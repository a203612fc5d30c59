"""LLMEngine: requests in, one scheduled model step at a time, outputs (new tokens, text deltas) out.

Synchronous and single-threaded; `AsyncEngine` (async_engine.py) runs it on a background thread for the server,
`LLM` (llm.py) drives it to completion for offline use.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from ..models.checkpoint import resolve_device
from ..models.config import RingLinearConfig
from ..models.modeling import RingLinearForCausalLM
from ..models.tokenizer import load_tokenizer
from ..ops.lightning_attn import open_chunk_rows
from ..parallel.tensor import check_serving_parallel, load_sharded, local_heads, random_sharded
from .config import EngineConfig
from .distributed import Ranks, min_over_ranks, parallel_world, rank_device
from .kv_cache import PagedKVCache
from .model_runner import ModelRunner
from .sampler import sample_rows
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .state_pool import StatePool

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve (bad prompt, too long, ...); the message is safe to show to a client."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class RequestOutput:
    """One step's news about a request. `new_*` and `delta_text` are this output's part. `token_ids`, `logprobs`
    and `top_logprobs` are the request's own lists, shared rather than copied per token (a copy per output would
    cost O(n^2) over long generations): they keep growing until the output with `finished` set."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                       # all generated so far (stop token included)
    text: str                                  # all generated text so far (stop strings cut)
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    logprobs: list[float] | None = None        # one per generated token, when requested
    top_logprobs: list[list[tuple[int, float]]] | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None           # "stop", "length" or "abort"
    num_preemptions: int = 0
    ttft_s: float | None = None                # arrival to first token


def _output(seq: Sequence) -> RequestOutput:
    first = seq.emitted_tokens
    delta, new = seq.take_delta()
    p = seq.params
    return RequestOutput(
        request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=seq.output_token_ids,
        text=seq.text, new_token_ids=new, delta_text=delta,
        logprobs=seq.logprobs if p.logprobs else None,
        top_logprobs=seq.top_logprobs if p.top_logprobs else None,
        new_logprobs=seq.logprobs[first:] if p.logprobs else None,
        new_top_logprobs=seq.top_logprobs[first:] if p.top_logprobs else None,
        finished=seq.finished, finish_reason=seq.finish_reason, num_preemptions=seq.num_preemptions,
        ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time)


def _text_of(content) -> str:
    """A message's content as one string: text parts joined, none -> ""."""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else content


class LLMEngine:
    """`random_weights`: a RingLinearConfig to serve with random weights instead of a checkpoint (benchmarks at
    published shapes; token-id prompts only). `_rank` is internal: ranks 1..N-1 of a tensor/expert-parallel engine
    build theirs with it (distributed.py)."""

    def __init__(self, model_dir: str | None = None, config: EngineConfig | None = None, *, model=None,
                 tokenizer=None, random_weights: RingLinearConfig | None = None, _rank=None):
        self.config = config = config or EngineConfig()
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.ranks, self.rank_info = None, _rank
        world = parallel_world(config)
        if world > 1 or random_weights is not None:
            model = self._parallel_model(model_dir, model, world, random_weights)
            device = next(model.parameters()).device
        else:
            device = resolve_device(config.device)
        if model is None:
            if model_dir is None:
                raise ValueError("LLMEngine needs model_dir or model")
            model = RingLinearForCausalLM.from_pretrained(model_dir, dtype=config.dtype, device=device)
        if tokenizer is None and model_dir is not None and _rank is None:
            tokenizer = load_tokenizer(model_dir)
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.model_config = cfg
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        softmax, linear = cfg.softmax_layers, cfg.linear_layers
        (H, KV), D = local_heads(model), cfg.head_dim_  # this rank's heads under tensor parallelism
        open_chunk = None
        if config.numerics == "aligned":  # open-chunk buffers, sized by the kernels this device and dtype use
            open_chunk = (open_chunk_rows(torch.empty(0, H, D, dtype=dtype, device=device)), dtype)
        self.states = StatePool(linear, config.max_num_seqs, H, D, device, open_chunk=open_chunk)
        max_pos = cfg.max_position_embeddings
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        elif softmax:
            num_blocks = self._auto_blocks(softmax, KV, D, dtype, device)
        else:  # no softmax layer: blocks are bookkeeping only, enough for every slot at full length
            num_blocks = config.max_num_seqs * -(-max_pos // config.block_size)
        if self.rank_info is not None:  # every rank the same block count: the one that fits all of them
            num_blocks = min_over_ranks(self.rank_info, num_blocks, self.ranks)
        self.kv = PagedKVCache(softmax, num_blocks, config.block_size, KV, D, dtype, device)
        self.max_model_len = min(config.max_model_len or max_pos, max_pos, num_blocks * config.block_size)
        if config.max_model_len and self.max_model_len < config.max_model_len:
            log.warning("max_model_len %d capped to %d (position limit %d, KV cache %d tokens)", config.max_model_len,
                        self.max_model_len, max_pos, num_blocks * config.block_size)
        self.scheduler = Scheduler(config, self.kv, self.states)
        self.runner = ModelRunner(model, config, self.kv, self.states, self.max_model_len)
        self.seqs: dict[str, Sequence] = {}
        self.num_aborted = 0
        self.asleep = False
        self._ids = itertools.count()
        log.info("engine: %s %s, %d state slots (%.1f MiB), %d KV blocks x %d tokens (%.1f MiB), max_model_len %d, "
                 "batch_invariant=%s, cuda_graphs=%s", device, dtype, config.max_num_seqs,
                 self.states.memory_bytes() / 2**20, num_blocks, config.block_size, self.kv.memory_bytes() / 2**20,
                 self.max_model_len, self.runner.batch_invariant, self.runner.graphs is not None)

    def _parallel_model(self, model_dir, model, world, random_weights):
        """This rank's shard, loaded or random (rank 0 first starts the other ranks and joins their group)."""
        cfg = self.config
        if model is not None or (model_dir is None) == (random_weights is None):
            raise ValueError("a tensor/expert-parallel engine builds its shards itself: pass model_dir (or "
                             "random_weights), not model")
        shape = random_weights if random_weights is not None else RingLinearConfig.from_json(model_dir)
        check_serving_parallel(shape, cfg.tensor_parallel, cfg.expert_parallel)
        if world > 1:
            # Engine features that copy states or weights on the scheduling rank alone (prefix-cache snapshots,
            # FP8 weight layouts, where the engine has them) are not mirrored on the other ranks yet.
            if getattr(cfg, "quantization", None) not in (None, "none"):
                raise ValueError("quantized weights with --tp/--ep are not supported yet")
            if getattr(cfg, "enable_prefix_caching", False):
                log.info("prefix caching is off with several ranks (its state copies are not mirrored yet)")
                cfg.enable_prefix_caching = False
        if world > 1 and self.rank_info is None:
            self.ranks = Ranks(model_dir, cfg, world, random_weights)
            self.rank_info = self.ranks.info
        rank, group = (self.rank_info.rank, self.rank_info.group) if world > 1 else (0, None)
        dev = rank_device(cfg, rank)
        if random_weights is not None:
            return random_sharded(shape, rank, world, cfg.tensor_parallel, group, dtype=cfg.dtype, device=dev)
        return load_sharded(model_dir, rank, world, cfg.tensor_parallel, group, dtype=cfg.dtype, device=dev)

    def close(self) -> None:
        """Stop the other ranks of a tensor/expert-parallel engine (a no-op for one process)."""
        if self.ranks is not None:
            self.ranks.close()

    def _auto_blocks(self, softmax, KV, D, dtype, device) -> int:
        per_block = PagedKVCache.bytes_per_block(len(softmax), self.config.block_size, KV, D, dtype)
        budget = self.config.kv_cache_bytes
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * 0.8)  # the rest: activations, CUDA-graph pools, allocator slack
            else:
                budget = 1 << 30
        return max(1, budget // per_block)

    # ------------------------------------------------------------------ requests
    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and check a request without touching engine state (safe from any thread).

        What needs no tokens is checked first: a text prompt longer than the context limit can hold at the
        tokenizer's longest token (`RingTokenizer.max_chars`) is refused before it is tokenised, a token-id list by
        its length before its ids are converted."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer")
            k = self.tokenizer.max_chars_per_token
            if k is not None:
                self._check_length(-(-len(prompt) // k), params, f"at least {-(-len(prompt) // k)} tokens "
                                   f"({len(prompt)} characters, at most {k} per token)")
            try:
                ids = self.tokenizer.encode(prompt)
            except ValueError as e:
                raise RequestError(f"prompt: {e}", param="prompt") from None
        else:
            self._check_length(len(prompt), params, f"{len(prompt)} tokens")
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty (it encodes to zero tokens)", param="prompt")
        V = self.model_config.vocab_size
        if any(t < 0 or t >= V for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {V})", param="prompt")
        if any(t < 0 or t >= V for t in params.stop_token_ids):
            raise RequestError(f"stop_token_ids must be in [0, {V})", param="stop_token_ids")
        self._check_length(len(ids), params, f"{len(ids)} tokens")
        return ids

    def _check_length(self, n: int, params: SamplingParams, what: str) -> None:
        """n: the prompt's token count (or a lower bound of it, described by `what`)."""
        if n >= self.max_model_len:
            raise RequestError(f"the prompt has {what}; this model's context limit is {self.max_model_len} (prompt "
                               "plus at least one generated token)", code="context_length_exceeded", param="prompt")
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({what}) plus max_tokens ({params.max_tokens}) exceeds this model's context "
                               f"limit of {self.max_model_len} tokens", code="context_length_exceeded",
                               param="max_tokens")

    def chat_prompt(self, messages: list[dict], **template_variables) -> str:
        """A conversation rendered by the checkpoint's chat template: the one place the server and `LLM.chat` turn
        messages into a prompt. Messages are {role, content} dicts; content may be a list of {"type": "text",
        "text": ...} parts (joined), role "developer" is the template's "system". `template_variables` override the
        defaults (add_generation_prompt=True, tools=None). Any failure is a RequestError naming `messages`."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise RequestError("this model has no chat template; send a text prompt instead", param="messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RequestError("messages must be a list of {'role': ..., 'content': ...} dicts", param="messages")
        turns = []
        for m in messages:
            m = {**m, "content": _text_of(m.get("content"))}
            if m["role"] == "developer":
                m["role"] = "system"
            turns.append(m)
        variables = {"add_generation_prompt": True, **template_variables}
        try:
            return self.tokenizer.apply_chat_template(turns, **variables)
        except Exception as e:  # noqa: BLE001  (a template error is the messages' fault)
            raise RequestError(f"could not apply the chat template: {e}", param="messages") from None

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prepared: bool = False) -> str:
        """Queue a request; returns its id. `prepared`: prompt is the id list `prepare` returned."""
        params = params or SamplingParams()
        if self.asleep:
            raise RuntimeError("the engine is asleep (its caches are freed): call wake() first")
        ids = list(prompt) if prepared else self.prepare(prompt, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise RequestError(f"duplicate request id {rid!r}")
        seq = Sequence(rid, ids, params, self.tokenizer, self.max_model_len)
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its slot and blocks now. Unknown or finished ids are ignored."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish("abort")
        self.num_aborted += 1
        return _output(seq)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for every request that produced a token or finished."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if self.ranks is not None:
            self.ranks.send_step(batch)
        logits = self.runner.execute(batch)
        self.scheduler.commit(batch)
        sampling = [s.seq for s in batch.seqs if s.sample]
        outputs = []
        for seq, (token, lp, top) in zip(sampling, sample_rows(logits, sampling, aligned=self.runner.aligned)):
            seq.append_token(token, lp, top)
            if seq.finished:
                self.scheduler.finish(seq)
                del self.seqs[seq.request_id]
            outputs.append(_output(seq))
        return outputs

    # ------------------------------------------------------------------ memory between uses (RL)
    def sleep(self) -> None:
        """Free the KV cache, the state pool and the CUDA graphs; the weights are not touched (with `model=` they
        are the caller's, e.g. an RL trainer's policy). Needs an idle engine. `wake()` re-creates them."""
        if self.seqs:
            raise RuntimeError(f"sleep() with {len(self.seqs)} unfinished request(s)")
        if self.rank_info is not None:
            raise RuntimeError("sleep() frees one rank's memory only: not supported with several ranks")
        if self.asleep:
            return
        self.runner.drop_graphs()
        self.kv.free_storage()
        self.states.free_storage()
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        self.asleep = True

    def wake(self) -> None:
        """Re-create the caches (zeroed) and recapture the CUDA graphs, against the weights as they are now."""
        if not self.asleep:
            return
        self.kv.make_storage()
        self.states.make_storage()
        self.runner.capture_graphs()
        self.asleep = False

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "free_kv_blocks": self.kv.allocator.num_free, "total_kv_blocks": self.kv.num_blocks,
            "free_state_slots": self.states.num_free, "total_state_slots": self.states.num_slots,
            "preemptions": self.scheduler.num_preemptions, "aborted": self.num_aborted,
        }
