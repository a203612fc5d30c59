"""Tokenised documents packed into fixed-length rows whose document boundaries become `cu_seqlens`.

The documents of a split are tokenised, each followed by the separator (eos) id, and laid end to end into one
stream. Row i covers stream positions [i*L, i*L + L) and takes its targets from [i*L + 1, i*L + L + 1):

- a segment (linear-attention state, softmax causal window, RoPE positions) starts at every document start and
  at every row start, so nothing crosses a document;
- the target of a document's last token (its separator) would be the next document's first token: it is -100.

Rows are visited in a per-epoch permutation seeded by (seed, epoch). The data position is a single number, the
global rows consumed, so resuming is exact and independent of how a step's rows are split over processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenStream:
    tokens: np.ndarray      # [N] int32, documents end to end, each followed by the separator
    doc_starts: np.ndarray  # [D] int64 offset of each document's first token (increasing, doc_starts[0] == 0)

    def save(self, prefix: str) -> None:
        """prefix.tokens.npy and prefix.starts.npy, each written to a temp name and renamed (complete or absent)."""
        for suffix, arr in ((".tokens.npy", self.tokens), (".starts.npy", self.doc_starts)):
            with open(prefix + suffix + ".tmp", "wb") as f:
                np.save(f, arr)
            os.replace(prefix + suffix + ".tmp", prefix + suffix)

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.exists(prefix + ".tokens.npy") and os.path.exists(prefix + ".starts.npy")

    @classmethod
    def load(cls, prefix: str) -> "TokenStream":
        # memory-mapped: a corpus larger than RAM is paged in as rows are read
        return cls(np.load(prefix + ".tokens.npy", mmap_mode="r"), np.load(prefix + ".starts.npy"))


def tokenize_documents(tok, docs: list[str], sep_id: int, batch: int = 512) -> TokenStream:
    """`tok` is a `tokenizers.Tokenizer` (encode_batch runs in parallel in Rust) or anything with `.encode`."""
    pieces, starts, pos = [], [], 0
    enc = getattr(tok, "tokenizer", tok)
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        if hasattr(enc, "encode_batch"):
            ids = [e.ids for e in enc.encode_batch(chunk, add_special_tokens=False)]
        else:
            ids = [enc.encode(d) for d in chunk]
        for d in ids:
            if not d:
                continue
            starts.append(pos)
            arr = np.empty(len(d) + 1, dtype=np.int32)
            arr[:-1] = d
            arr[-1] = sep_id
            pieces.append(arr)
            pos += arr.size
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return TokenStream(tokens, np.asarray(starts, dtype=np.int64))


@dataclass
class Row:
    input_ids: np.ndarray  # [l] int64
    labels: np.ndarray     # [l] int64, -100 where the target would cross a document
    seg_starts: list       # offsets in [0, l) where a segment starts (first is 0)


class PackedRows:
    """Rows of `seq_len` tokens over a TokenStream. With `partial=True` a short last row is kept (validation)."""

    def __init__(self, stream: TokenStream, seq_len: int, partial: bool = False):
        self.stream, self.L = stream, seq_len
        n = stream.tokens.size
        self.n_rows = max(n - 1, 0) // seq_len
        self.last_len = 0
        if partial and (n - 1) - self.n_rows * seq_len > 0:
            self.last_len = (n - 1) - self.n_rows * seq_len

    def __len__(self) -> int:
        return self.n_rows + (1 if self.last_len else 0)

    def row(self, i: int) -> Row:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        s = i * self.L
        ln = self.L if i < self.n_rows else self.last_len
        toks, ds = self.stream.tokens, self.stream.doc_starts
        x = np.asarray(toks[s:s + ln], dtype=np.int64)
        y = np.asarray(toks[s + 1:s + ln + 1], dtype=np.int64)
        inside = ds[np.searchsorted(ds, s + 1):np.searchsorted(ds, s + ln + 1)] - s  # doc starts in (s, s+ln]
        y[inside - 1] = -100  # the target there is the next document's first token
        return Row(x, y, [0] + inside[inside < ln].tolist())


def collate(rows: list[Row], device=None):
    """Rows -> one packed micro-batch: input_ids [1, T], labels [1, T], cu_seqlens [N+1] int32, row_ids [T], and on
    the host n_rows, n_targets (labels != -100), max_seqlen (the longest segment) and cu_host (cu_seqlens as a
    list)."""
    ids = np.concatenate([r.input_ids for r in rows])
    lab = np.concatenate([r.labels for r in rows])
    cu, row_ids, off = [], [], 0
    for j, r in enumerate(rows):
        cu += [off + s for s in r.seg_starts]
        row_ids.append(np.full(r.input_ids.size, j, dtype=np.int64))
        off += r.input_ids.size
    cu.append(off)
    dev_ids, dev_lab, dev_rows, dev_cu = _to_device([ids, lab, np.concatenate(row_ids), np.asarray(cu)], device)
    # host-side counts, so the step never reads them back from the device
    return {"input_ids": dev_ids[None], "labels": dev_lab[None], "cu_seqlens": dev_cu.to(torch.int32),
            "row_ids": dev_rows, "n_rows": len(rows), "n_targets": int((lab != -100).sum()),
            "max_seqlen": int(np.diff(cu).max()), "cu_host": cu}


def _to_device(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    """Integer host arrays -> int64 tensors on `device`, views of one buffer filled on the host and copied once.
    On CUDA the buffer is pinned and the copy asynchronous: a pageable copy is synchronous, so the host would wait
    for it and for the GPU work queued before it (the next step's launches then no longer run ahead of the GPU),
    and after a checkpoint it queues behind the snapshot's long copies (train/staging.py)."""
    sizes = [a.size for a in arrays]
    cuda = device is not None and torch.device(device).type == "cuda"
    buf = torch.empty(sum(sizes), dtype=torch.long, pin_memory=cuda)
    torch.cat([torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in arrays], out=buf)
    if device is not None:
        buf = buf.to(device, non_blocking=cuda)
    return list(torch.split(buf, sizes))


def pad_rows(rows: list[Row], multiple: int) -> list[Row]:
    """`rows` plus, if needed, one padding row (token 0, no targets, its own segment) so that their total token
    count is a multiple of `multiple` (evaluation under context parallelism: equal pieces)."""
    extra = -sum(r.input_ids.size for r in rows) % multiple
    if not extra:
        return rows
    return rows + [Row(np.zeros(extra, dtype=np.int64), np.full(extra, -100, dtype=np.int64), [0])]


class RowSchedule:
    """Which rows a process reads at a given step: global row g -> epoch g // R, permuted index within it.

    A step reads `global_rows` = world * grad_accum * batch_size consecutive global rows; process r's micro-batch
    m gets rows [m*world*B + r*B, ... + B) of them, so the union over processes is the same for any world size.
    """

    def __init__(self, n_rows: int, seed: int, batch_size: int, grad_accum: int, world: int, rank: int):
        if n_rows < 1:
            raise ValueError("no training rows")
        self.R, self.seed = n_rows, seed
        self.B, self.A, self.W, self.rank = batch_size, grad_accum, world, rank
        self.global_rows = batch_size * grad_accum * world
        self._perm_epoch, self._perm = -1, None

    def _index(self, g: int) -> int:
        epoch, i = divmod(g, self.R)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.R)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def micro_batches(self, step: int) -> list[list[int]]:
        """Row indices of this process's micro-batches for 0-based `step`."""
        base = step * self.global_rows
        out = []
        for m in range(self.A):
            first = base + (m * self.W + self.rank) * self.B
            out.append([self._index(g) for g in range(first, first + self.B)])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_rows / self.R
