"""Runs one scheduled step through the model and returns fp32 logits for the rows that sample; requests that ask
for prompt log-probs also get every prompt position of their piece scored (only theirs: others pay nothing).

CPU: eager, with `RowBlockMode` (batch-invariant GEMMs) on by default. CUDA: all-decode steps replay a CUDA graph
when `config.cuda_graphs` (cuda_graph.py); steps of fresh prompt pieces too unless `config.prefill_cuda_graphs` is off
(prefill_graph.py); the rest run eagerly.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..ops.linear import RowBlockMode, invariant_mode
from .config import EngineConfig
from .context import PagedContext
from .cuda_graph import DecodeGraphs, StaticDecodeStep, graph_batch_sizes
from .kv_cache import PagedKVCache
from .prefill_graph import PrefillGraphs, StaticPrefillStep, prefill_buckets
from .sampler import prompt_positions, score_prompt
from .scheduler import Batch
from .state_pool import StatePool

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model, config: EngineConfig, kv: PagedKVCache, states: StatePool, max_model_len: int):
        self.model = model
        self.config = config
        self.kv, self.states = kv, states
        self.device = next(model.parameters()).device
        invariant = config.batch_invariant
        if invariant is None:
            invariant = self.device.type == "cpu"
        self.aligned = config.numerics == "aligned"
        self.batch_invariant = invariant or self.aligned
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.max_model_len = max_model_len
        self.capture_graphs()

    def capture_graphs(self) -> None:
        """Capture the decode (and, when configured, prefill) graphs (CUDA). Graphs hold the addresses of the
        weights, the KV cache and the state pool: after `drop_graphs` and re-created caches, call this again."""
        if self.device.type != "cuda":
            return
        if self.config.cuda_graphs:
            self._capture(self.max_model_len)
        if self.config.cuda_graphs and self.config.prefill_cuda_graphs:
            self._capture_prefill()

    def drop_graphs(self) -> None:
        self.graphs = self.prefill_graphs = None

    def _mode(self):
        if self.aligned:  # the trainer's aligned forward uses the same mode (RingLinearForCausalLM.forward)
            return invariant_mode(self.device, self.config.row_block)
        return RowBlockMode(self.config.row_block) if self.batch_invariant else contextlib.nullcontext()

    def _capture(self, max_model_len: int) -> None:
        max_b = min(self.config.max_num_seqs, self.config.cuda_graph_max_batch)
        step = StaticDecodeStep(self.model, self.kv, self.states, max_b, self.kv.blocks_needed(max_model_len),
                                self.device, aligned=self.aligned)
        try:
            with torch.inference_mode(), self._mode():
                self.graphs = DecodeGraphs(step, graph_batch_sizes(max_b))
            log.info("captured CUDA graphs for decode batch sizes %s", self.graphs.sizes)
        except Exception as e:  # capture is an optimisation: run eager rather than refuse to serve
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            self.graphs = None

    def _capture_prefill(self) -> None:
        dtype = next(self.model.parameters()).dtype
        if self.batch_invariant:
            log.info("prefill CUDA graphs are off: batch-invariant or aligned numerics (their eager kernels are the "
                     "contract)")
            return
        if dtype not in (torch.bfloat16, torch.float16):
            log.info("prefill CUDA graphs are off: %s weights (the fp32 reference attention reads its offsets on the "
                     "host, which capture refuses)", dtype)
            return
        buckets = prefill_buckets(self.config.max_num_batched_tokens)
        step = StaticPrefillStep(self.model, self.kv, self.states, buckets[-1],
                                 [s for s in (1, 2, 4, 8) if s <= self.config.max_num_seqs], self.device)
        before = torch.cuda.memory_reserved(self.device)
        try:
            with torch.inference_mode():
                self.prefill_graphs = PrefillGraphs(step, buckets)
            # The pool is the graphs' own: eager steps (mixed, continuing, > 8 pieces) allocate beside it, inside
            # the headroom the KV cache left (the cache was sized before capture)
            log.info("captured CUDA graphs for prefill steps of %s tokens (%.0f MiB of graph memory)",
                     self.prefill_graphs.buckets, (torch.cuda.memory_reserved(self.device) - before) / 2**20)
        except Exception as e:  # as for decode: an optimisation, logged, never a refusal to serve
            log.warning("prefill CUDA graph capture failed (%s: %s); prefill runs eagerly", type(e).__name__, e)
            self.prefill_graphs = None

    @torch.inference_mode()
    def execute(self, batch: Batch, ids: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits [n_sampling, V] fp32, in the order of the sampling entries of `batch.seqs`. Every path runs in
        the runner's numerics mode (a path outside it computed other bits: the static prefill once did, on the
        batch-invariant CPU engines the tests attach it to). ids: for a decode-only batch, its input tokens [n]
        int64 (on any device; async scheduling passes the tokens just drawn on the GPU), instead of the
        sequences' own last tokens."""
        if ids is not None and not (batch.all_decode and ids.shape == (len(batch.seqs),)):
            raise ValueError(f"execute(ids=...) takes one id per entry of a decode-only batch, got {tuple(ids.shape)} "
                             f"for {len(batch.seqs)} entries")
        with self._mode():
            return self._execute(batch, ids)

    def _execute(self, batch: Batch, given_ids: torch.Tensor | None) -> torch.Tensor:
        entries = batch.seqs
        scored = [prompt_positions(s.seq, s.start, s.num_tokens) for s in entries]
        if self.graphs is not None and batch.all_decode and self.graphs.fits(len(entries)) and \
                all(lo >= hi for lo, hi in scored):
            # a view of the graph's output, valid until its next replay; decode entries all sample: no gather (its
            # list index is a blocking copy, which would wait for the replay)
            logits = self.graphs.run(entries, given_ids)
            return logits if all(s.sample for s in entries) else logits[[i for i, s in enumerate(entries) if s.sample]]
        if self.prefill_graphs is not None and all(s.start == 0 and s.num_tokens >= 2 for s in entries) and \
                all(lo >= hi for lo, hi in scored) and self.prefill_graphs.fits(entries):
            logits = self.prefill_graphs.run(entries)
            return logits[[i for i, s in enumerate(entries) if s.sample]]
        if given_ids is None:
            ids: list[int] = []
            for s in entries:
                ids += s.seq.token_slice(s.start, s.start + s.num_tokens)
            given_ids = torch.tensor(ids)
        ctx = PagedContext(self.kv, self.states, [s.seq.slot for s in entries], [s.seq.block_table for s in entries],
                           [s.start for s in entries], [s.num_tokens for s in entries],
                           sum(1 for s in entries if s.is_decode), self.device, aligned=self.aligned)
        last_rows = [ctx.cu[i + 1] - 1 for i, s in enumerate(entries) if s.sample]
        hidden = self.model.forward_packed(given_ids.to(self.device), ctx)
        for i, (s, (lo, hi)) in enumerate(zip(entries, scored)):
            if lo < hi:
                row = ctx.cu[i] - s.start  # hidden row of position j is row + j
                score_prompt(s.seq, self.model.compute_logits(hidden[row + lo:row + hi]), self.aligned)
        if not last_rows:  # a step of prefill pieces only: nothing to sample, but keep the [n, V] shape
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
        if len(last_rows) == hidden.shape[0]:  # every row samples (a decode step): no gather, as for the graphs
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[last_rows])
