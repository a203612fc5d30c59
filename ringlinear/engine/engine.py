"""LLMEngine: requests in, one scheduled model step at a time, outputs (new tokens, text deltas) out.

Synchronous and single-threaded; `AsyncEngine` (async_engine.py) runs it on a background thread for the server,
`LLM` (llm.py) drives it to completion for offline use.
"""
from __future__ import annotations

import itertools
import logging
import threading

import torch

from ..models.checkpoint import resolve_device
from ..models.config import RingLinearConfig
from ..models.fp8_serve import is_fp8
from ..models.modeling import RingLinearForCausalLM
from ..models.tokenizer import load_tokenizer
from ..ops.lightning_attn import open_chunk_rows
from ..sampling import SamplingParamError
from ..parallel.tensor import check_serving_parallel, load_sharded, local_heads, random_sharded
from .config import FP8_ALIGNED, EngineConfig, check_fp8_before_load, serves_fp8
from .cache_plan import build_caches
from .distributed import Ranks, parallel_world, rank_device
from .model_runner import ModelRunner
from .outputs import RequestError, RequestOutput, output_of
from .overlap import Lookahead
from .sampler import sample_rows
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .state_pool import StatePool

log = logging.getLogger(__name__)


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
            check_fp8_before_load(model_dir, config, device)
            model = RingLinearForCausalLM.from_pretrained(model_dir, dtype=config.dtype, device=device,
                                                          quantization=config.quantization)
        elif config.quantization is not None and is_fp8(model) != (config.quantization == "fp8"):
            raise ValueError(f"quantization={config.quantization!r} but the model given is "
                             f"{'FP8' if is_fp8(model) else 'not FP8'} (quantise it with "
                             "ringlinear.models.fp8_serve.quantize_fp8_(model), or pass model_dir)")
        if is_fp8(model) and config.numerics == "aligned":
            raise ValueError(FP8_ALIGNED)
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
        self.kv, self.prefix_cache = build_caches(config, softmax, linear, self.states, max_pos, KV, H, D, dtype,
                                                  device, self.rank_info, self.ranks)
        num_blocks = self.kv.num_blocks
        caching = self.prefix_cache is not None
        self.max_model_len = min(config.max_model_len or max_pos, max_pos, num_blocks * config.block_size)
        if config.max_model_len and self.max_model_len < config.max_model_len:
            log.warning("max_model_len %d capped to %d (position limit %d, KV cache %d tokens)", config.max_model_len,
                        self.max_model_len, max_pos, num_blocks * config.block_size)
        self.scheduler = Scheduler(config, self.kv, self.states, self.prefix_cache)
        self.runner = ModelRunner(model, config, self.kv, self.states, self.max_model_len)
        self.seqs: dict[str, Sequence] = {}
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.runner.device.type == "cuda")  # overlap.py; EngineConfig says why
        self.lookahead = Lookahead(self)
        self.num_aborted = 0
        self.asleep = False
        self._ids = itertools.count()
        self._grammars = None                # structured.GrammarCompiler, made on first use
        self._grammars_lock = threading.Lock()  # prepare() runs on several worker threads
        log.info("engine: %s %s%s, %d state slots (%.1f MiB), %d KV blocks x %d tokens (%.1f MiB), max_model_len %d, "
                 "batch_invariant=%s, cuda_graphs=%s, prefix caching %s", device, dtype,
                 " (FP8 weights)" if is_fp8(model) else "", config.max_num_seqs,
                 self.states.memory_bytes() / 2**20, num_blocks, config.block_size, self.kv.memory_bytes() / 2**20,
                 self.max_model_len, self.runner.batch_invariant, self.runner.graphs is not None,
                 "off" if not caching else f"on ({self.prefix_cache.snapshots.num} snapshots every "
                 f"{config.state_snapshot_interval} tokens, {self.prefix_cache.snapshots.memory_bytes() / 2**20:.1f} MiB)")

    def _parallel_model(self, model_dir, model, world, random_weights):
        """This rank's shard, loaded or random (rank 0 first starts the other ranks and joins their group)."""
        cfg = self.config
        if model is not None or (model_dir is None) == (random_weights is None):
            raise ValueError("a tensor/expert-parallel engine builds its shards itself: pass model_dir (or "
                             "random_weights), not model")
        shape = random_weights if random_weights is not None else RingLinearConfig.from_json(model_dir)
        check_serving_parallel(shape, cfg.tensor_parallel, cfg.expert_parallel)
        if world > 1:
            # Prefix-cache snapshots and FP8 weight layouts live on the scheduling rank alone; the other ranks
            # do not mirror them yet.
            if serves_fp8(cfg, shape):
                raise ValueError("FP8 weights with --tp/--ep are not supported yet (serve them on one GPU)")
            if cfg.enable_prefix_caching:
                log.info("prefix caching is off with several ranks (its state copies are not mirrored yet)")
                cfg.enable_prefix_caching = False
            if cfg.prefill_cuda_graphs:  # every rank must take the same path each step; not agreed across ranks yet
                log.info("prefill CUDA graphs are off with several ranks")
                cfg.prefill_cuda_graphs = False
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
        try:
            params.check_vocab(V)
        except SamplingParamError as e:
            raise RequestError(str(e), param=e.param) from None
        self._check_length(len(ids), params, f"{len(ids)} tokens")
        if params.structured is not None:
            self._matcher(params.structured)  # compiled here, off the engine thread; add_request hits the cache
        return ids

    def _matcher(self, spec: dict):
        """A fresh matcher of a `structured` spec, or RequestError(param="structured") with the reason."""
        from .structured import GrammarCompiler, GrammarError
        try:
            with self._grammars_lock:
                if self._grammars is None:
                    if self.tokenizer is None:
                        raise GrammarError("structured output needs the model's tokenizer")
                    self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
            return self._grammars.matcher(spec)
        except GrammarError as e:
            raise RequestError(str(e), param="structured") from None

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
        return self.add_group(prompt, [params or SamplingParams()], None if request_id is None else [request_id],
                              prepared)[0]

    def add_group(self, prompt: str | list[int], params: list[SamplingParams], request_ids: list[str] | None = None,
                  prepared: bool = False) -> list[str]:
        """Queue len(params) samples of one prompt (a request's n choices, GRPO's group); returns their ids. With
        prefix caching on they share one prefill: the first prefills the prompt, the others fork from it when it
        is done (its KV blocks shared, its state slot copied) and sample their first token from the same logits.
        Each sample equals the same request run alone (bitwise on CPU)."""
        if self.asleep:
            raise RuntimeError("the engine is asleep (its caches are freed): call wake() first")
        if not params:
            raise RequestError("a group needs at least one SamplingParams")
        if prepared:
            ids = list(prompt)
        else:
            ids = self.prepare(prompt, params[0])
            for p in params[1:]:
                self.prepare(ids, p)  # the checks that depend on the params (max_tokens, stop ids)
        rids = request_ids if request_ids is not None else [f"req-{next(self._ids)}" for _ in params]
        if len(rids) != len(params):
            raise RequestError(f"{len(rids)} request ids for {len(params)} samples")
        for rid in rids:
            if rid in self.seqs or rids.count(rid) > 1:
                raise RequestError(f"duplicate request id {rid!r}")
        group = [Sequence(rid, ids, p, self.tokenizer, self.max_model_len,
                          self._matcher(p.structured) if p.structured is not None else None)
                 for rid, p in zip(rids, params)]
        for seq in group:
            self.seqs[seq.request_id] = seq
        lead, rest = group[0], group[1:]
        self.scheduler.add(lead)
        # prompt log-probs are scored in the prefill, so a sample that asks for them computes its own
        if self.prefix_cache is None or any(p.prompt_logprobs is not None for p in params):
            for seq in rest:
                self.scheduler.add(seq)
        else:
            lead.forks = rest
            for seq in rest:
                seq.fork_of = lead
        return rids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its slot and blocks now. Unknown or finished ids are ignored."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish("abort")
        self.num_aborted += 1
        return output_of(seq)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for every request that produced a token or finished. With
        async scheduling (overlap.py) a step may instead sample the decode step launched during the last one."""
        taken = self.lookahead.take()
        if taken is not None:
            logits, sampling = taken
            return self._sample(logits, sampling) if sampling else []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if self.ranks is not None:
            self.ranks.send_step(batch)
        logits = self.runner.execute(batch)
        self.scheduler.commit(batch)
        sampling, rows = [], []
        for i, seq in enumerate(s.seq for s in batch.seqs if s.sample):
            # samples waiting on seq's prompt fork now and sample their first token from its logits row
            for member in [seq, *self.scheduler.fork(seq)] if seq.forks else [seq]:
                sampling.append(member)
                rows.append(i)
        if len(rows) > logits.shape[0]:
            logits = logits[rows]
        return self._sample(logits, sampling)

    def _sample(self, logits: torch.Tensor, sampling: list[Sequence]) -> list[RequestOutput]:
        """logits [n, V] fp32, a row per sequence of `sampling`: draw, record and report their tokens."""
        if self.async_scheduling:
            drawn = self.lookahead.sample_and_launch(logits, sampling)
        else:
            drawn = sample_rows(logits, sampling, aligned=self.runner.aligned)
        outputs = []
        for seq, (token, lp, top) in zip(sampling, drawn):
            if seq.params.max_tokens == 0:  # the prompt is scored (prompt_logprobs) and nothing is generated
                seq.finish("length")
            else:
                seq.append_token(token, lp, top)
            if seq.finished:
                self.scheduler.finish(seq)
                del self.seqs[seq.request_id]
            outputs.append(output_of(seq))
        self.lookahead.settle()
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
        if self.prefix_cache is not None:
            self.prefix_cache.reset()
            self.prefix_cache.snapshots.free_storage()
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
        if self.prefix_cache is not None:
            self.prefix_cache.snapshots.make_storage()
        self.runner.capture_graphs()
        self.asleep = False

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix and snapshot. Call it after changing the weights in place (sleep() does it):
        the cache holds what the old weights computed. Running requests keep their own blocks."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset()

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        """Counters (all numeric). free_kv_blocks counts cached blocks nobody holds (they are evicted on demand)."""
        pc, pool = self.prefix_cache, self.kv.allocator
        snaps = pc.snapshots if pc is not None else None
        return {
            "running": len(self.scheduler.running), "waiting": self.scheduler.num_waiting,
            "free_kv_blocks": pool.num_free, "total_kv_blocks": self.kv.num_blocks,
            "free_state_slots": self.states.num_free, "total_state_slots": self.states.num_slots,
            "preemptions": self.scheduler.num_preemptions, "aborted": self.num_aborted,
            "async_scheduled_steps": self.lookahead.num_steps,
            "prefix_cache_queries": pc.num_queries if pc else 0, "prefix_cache_hits": pc.num_hits if pc else 0,
            "prefix_cache_hit_tokens": pc.num_hit_tokens if pc else 0,
            "prefix_cache_waits": pc.num_waits if pc else 0,
            "cached_blocks": pool.num_cached, "evicted_blocks": pool.num_evicted,
            "snapshots": len(snaps) if snaps else 0, "total_snapshots": snaps.num if snaps else 0,
            "snapshot_bytes": len(snaps) * snaps.bytes_each if snaps else 0,
            "evicted_snapshots": snaps.num_evicted if snaps else 0, "forked_requests": self.scheduler.num_forked,
        }
