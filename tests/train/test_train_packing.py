"""Packing: rows, targets and boundaries; packed documents score exactly as when run alone."""
import numpy as np
import torch
import torch.nn.functional as F

from ringlinear.models.presets import get_preset
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.train.packing import PackedRows, RowSchedule, TokenStream, collate

SEP = 1


def _stream(docs):
    toks, starts = [], []
    for d in docs:
        starts.append(len(toks))
        toks += list(d) + [SEP]
    return TokenStream(np.asarray(toks, dtype=np.int32), np.asarray(starts, dtype=np.int64))


def test_rows_targets_and_segments():
    docs = [[10, 11, 12], [20, 21, 22, 23, 24], [30, 31]]  # stream: 10 11 12 S 20 21 22 23 24 S 30 31 S
    rows = PackedRows(_stream(docs), seq_len=6)
    assert len(rows) == 2  # 13 tokens -> (13 - 1) // 6 rows; targets need one extra token
    r0, r1 = rows.row(0), rows.row(1)
    assert r0.input_ids.tolist() == [10, 11, 12, SEP, 20, 21]
    assert r0.labels.tolist() == [11, 12, SEP, -100, 21, 22]  # separator -> next doc's first token is masked
    assert r0.seg_starts == [0, 4]
    assert r1.input_ids.tolist() == [22, 23, 24, SEP, 30, 31]
    assert r1.labels.tolist() == [23, 24, SEP, -100, 31, SEP]
    assert r1.seg_starts == [0, 4]  # the continuation of doc 2 starts a fresh segment at the row start
    b = collate([r0, r1])
    assert b["cu_seqlens"].tolist() == [0, 4, 6, 10, 12]
    assert b["input_ids"].shape == (1, 12) and b["row_ids"].tolist() == [0] * 6 + [1] * 6
    part = PackedRows(_stream(docs), seq_len=5, partial=True)
    assert len(part) == 3 and part.row(2).input_ids.tolist() == [30, 31]


def _random_rows(seed):
    g = np.random.default_rng(seed)
    docs = [g.integers(3, 400, g.integers(1, 40)).tolist() for _ in range(30)]
    rows = PackedRows(_stream(docs), seq_len=64)
    return [rows.row(i) for i in range(len(rows))]


def _check_batch(b, rows):
    """b (any device) against the rows it packs, computed here independently."""
    ids = np.concatenate([r.input_ids for r in rows])
    lab = np.concatenate([r.labels for r in rows])
    cu, off = [], 0
    for r in rows:
        cu += [off + x for x in r.seg_starts]
        off += r.input_ids.size
    cu.append(off)
    assert b["input_ids"].dtype == b["labels"].dtype == b["row_ids"].dtype == torch.long
    assert b["cu_seqlens"].dtype == torch.int32 and b["input_ids"].shape == (1, ids.size)
    assert b["input_ids"][0].cpu().tolist() == ids.tolist() and b["labels"][0].cpu().tolist() == lab.tolist()
    assert b["cu_seqlens"].cpu().tolist() == cu == b["cu_host"]
    assert b["row_ids"].cpu().tolist() == [j for j, r in enumerate(rows) for _ in range(r.input_ids.size)]
    assert b["n_targets"] == int((lab != -100).sum()) and b["n_rows"] == len(rows)
    assert b["max_seqlen"] == max(np.diff(cu))


def test_collate_one_copy_matches_the_rows():
    rows = _random_rows(4)
    _check_batch(collate(rows), rows)
    _check_batch(collate(rows, "cpu"), rows)
    if torch.cuda.is_available():  # the pinned, asynchronous copy
        b = collate(rows, "cuda")
        assert b["input_ids"].is_cuda and b["cu_seqlens"].is_cuda
        _check_batch(b, rows)
    else:
        print("collate's pinned CUDA copy not checked: no CUDA here")


def test_row_schedule_is_world_size_independent_and_epochs_reshuffle():
    one = RowSchedule(10, seed=3, batch_size=4, grad_accum=1, world=1, rank=0)
    two = [RowSchedule(10, seed=3, batch_size=2, grad_accum=1, world=2, rank=r) for r in range(2)]
    accum = RowSchedule(10, seed=3, batch_size=1, grad_accum=2, world=2, rank=0)
    for step in range(6):  # crosses epoch boundaries (10 rows, 4 per step)
        full = one.micro_batches(step)[0]
        assert two[0].micro_batches(step)[0] + two[1].micro_batches(step)[0] == full
        assert [mb[0] for mb in accum.micro_batches(step)] == [full[0], full[2]]
    epoch0 = [i for s in range(5) for i in RowSchedule(10, 3, 2, 1, 1, 0).micro_batches(s)[0]]
    epoch1 = [i for s in range(5, 10) for i in RowSchedule(10, 3, 2, 1, 1, 0).micro_batches(s)[0]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    other_seed = [i for s in range(5) for i in RowSchedule(10, 4, 2, 1, 1, 0).micro_batches(s)[0]]
    assert other_seed != epoch0


def _token_losses(model, ids, cu=None):
    labels = torch.tensor(ids[1:] + [-100])[None]
    x = torch.tensor(ids)[None]
    logits = model(x, cu_seqlens=cu).logits[0]
    return F.cross_entropy(logits, labels[0], ignore_index=-100, reduction="none")


def test_packed_documents_match_separate_runs():
    """Two documents in one row (with cu_seqlens) give the per-token losses of each run alone.

    fp64, so "the same" means to 1e-12: the chunked linear attention restarts its state at the boundary and the
    softmax window stops there. Without the boundary (negative control) the second document's losses change.
    """
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(num_hidden_layers=4, layer_group_size=2)  # linear, softmax, linear, softmax
    model = RingLinearForCausalLM.from_config(cfg, dtype=torch.float64, seed=1)
    a = torch.randint(3, 256, (70,)).tolist() + [SEP]  # longer than one 64-token chunk
    b = torch.randint(3, 256, (37,)).tolist() + [SEP]
    rows = PackedRows(_stream([a[:-1], b[:-1]]), seq_len=len(a) + len(b) - 1)
    batch = collate([rows.row(0)])
    with torch.no_grad():
        logits = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"]).logits[0]
        packed = F.cross_entropy(logits, batch["labels"][0], ignore_index=-100, reduction="none")
        alone_a = _token_losses(model, a)
        alone_b = _token_losses(model, b)
        naive = model(batch["input_ids"]).logits[0]  # no boundary: doc b attends to doc a
        naive_b = F.cross_entropy(naive, batch["labels"][0], ignore_index=-100, reduction="none")[len(a):]
    assert batch["cu_seqlens"].tolist() == [0, len(a), len(a) + len(b) - 1]
    assert batch["labels"][0, len(a) - 1] == -100 and packed[len(a) - 1] == 0  # a's separator predicts nothing
    torch.testing.assert_close(packed[:len(a) - 1], alone_a[:len(a) - 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(packed[len(a):], alone_b[:len(b) - 1], rtol=0, atol=1e-12)
    assert (naive_b - alone_b[:len(b) - 1]).abs().max() > 1e-3
