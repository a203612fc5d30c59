"""The `--async-save` snapshot (ringlinear/train/staging.py, AsyncSaver): host buffers reused across saves of one
layout and replaced when it changes, each its own storage; a snapshot waits for the save in flight; the written
checkpoint is the state at the save step even though the next optimizer step changes every tensor in place right
after the save returns. On CPU the copies are synchronous (trivially the state at the step); on CUDA the same tests
run the staged path (pinned arena, side stream, the copy event fencing the optimizer step), and one delays the
side stream so that a missing fence would let the step overwrite the tensors before they are copied."""
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from ringlinear.train import trainer as T
from ringlinear.train.async_save import AsyncSaver
from ringlinear.train.checkpoint import STATE
from ringlinear.train.staging import PinnedPool, leaves, replace_leaves

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _layout(shapes):
    return [(("t", i), s, dt) for i, (s, dt) in enumerate(shapes)]


def test_pool_reuses_buffers_of_the_same_layout_and_replaces_them_when_a_shape_changes():
    pool = PinnedPool(pin=CUDA)
    lay = _layout([((3, 5), torch.float32), ((7,), torch.bfloat16), ((), torch.int64), ((0, 4), torch.float32)])
    a = pool.buffers(lay)
    assert [tuple(b.shape) for b in a] == [(3, 5), (7,), (), (0, 4)]
    assert [b.dtype for b in a] == [torch.float32, torch.bfloat16, torch.int64, torch.float32]
    b = pool.buffers(list(lay))
    assert all(x is y for x, y in zip(a, b)) and len(a) == len(b)
    c = pool.buffers(_layout([((3, 6), torch.float32), ((7,), torch.bfloat16), ((), torch.int64),
                              ((0, 4), torch.float32)]))
    assert not any(x is y for x, y in zip(a, c)) and tuple(c[0].shape) == (3, 6)
    if CUDA:
        assert [t.is_pinned() for t in c if t.numel()] == [True] * 3


def test_pool_buffers_are_separate_storages_so_writers_save_each_alone(tmp_path):
    """torch.save writes a view's whole storage and safetensors refuses tensors sharing one: each buffer must own
    exactly its bytes, with no overlap."""
    pool = PinnedPool(pin=CUDA)
    bufs = pool.buffers(_layout([((1000,), torch.float32), ((3,), torch.bfloat16), ((2, 2), torch.float64)]))
    assert all(b.untyped_storage().nbytes() == b.numel() * b.element_size() for b in bufs)
    spans = sorted((b.untyped_storage().data_ptr(), b.untyped_storage().nbytes()) for b in bufs)
    assert all(p0 + n0 <= p1 for (p0, n0), (p1, _) in zip(spans, spans[1:]))
    bufs[1].copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.save({"x": bufs[1]}, tmp_path / "x.pt")
    assert os.path.getsize(tmp_path / "x.pt") < 2000  # the 6 bytes and pickle overhead, not the 4 KB arena
    assert torch.equal(torch.load(tmp_path / "x.pt")["x"], torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))


def test_leaves_and_their_replacement_keep_the_structure_and_copy_the_containers():
    obj = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.full((1,), 3.0), 7)], "c": "x"}
    paths = [p for p, _ in leaves(obj)]
    assert paths == [("a",), ("b", 0), ("b", 1, 0)]
    new = replace_leaves(obj, iter([torch.tensor(i) for i in range(3)]))
    assert [int(t) for _, t in leaves(new)] == [0, 1, 2] and new["c"] == "x" and new["b"][1][1] == 7
    assert isinstance(new["b"][1], tuple) and new["b"] is not obj["b"]


class _Model(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.config = None
        self.w = torch.nn.Parameter(torch.randn(n, device=DEVICE))
        self.register_buffer("bias", torch.randn(n // 4, device=DEVICE))


def test_snapshot_is_the_state_when_taken_though_everything_changes_in_place_right_after():
    n = (64 << 20) if CUDA else 4096  # on CUDA 256 MB: the copy outlasts the in-place updates queued after it
    m = _Model(n)
    state = {"step": 3, "opt": {"m": torch.randn(n, device=DEVICE)}, "rng": torch.arange(5, dtype=torch.uint8)}
    want = {"w": m.w.detach().cpu().clone(), "bias": m.bias.cpu().clone(), "m": state["opt"]["m"].cpu().clone()}
    saver = AsyncSaver(DEVICE)
    assert (saver.stager is not None) == CUDA
    model_snap, state_snap = saver.snapshot(m, state)
    saver.before_update()  # what Trainer.optimizer_step does first
    with torch.no_grad():
        m.w.add_(1.0)
        m.bias.mul_(-2.0)
        state["opt"]["m"].zero_()
    state["step"] = 4
    got = {}
    saver.submit("test", lambda: got.update({k: v.clone() for k, v in model_snap.state_dict().items()},
                                            m=state_snap["opt"]["m"].clone(), step=state_snap["step"]))
    saver.wait()
    assert got["step"] == 3
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert saver.snapshot_s is not None and saver.snapshot_s >= 0


def test_a_snapshot_waits_for_the_save_in_flight_whose_buffers_it_reuses():
    m = _Model(64)
    saver = AsyncSaver(DEVICE)
    done = threading.Event()

    def slow_write():
        time.sleep(0.5)
        done.set()
    saver.snapshot(m, {})
    saver.submit("first", slow_write)
    saver.snapshot(m, {})
    assert done.is_set()


def _trainer(tiny_cfg, out, device):
    tr = T.Trainer(tiny_cfg(out, device=device, async_save=True, steps=4, save_every=0, eval_every=0))
    tr.forward_backward(0)
    tr.optimizer_step()  # the optimizer state exists: it is part of the snapshot
    tr.step = 1
    return tr


def _check_checkpoint_is_the_state_before_the_next_step(tr, monkeypatch, delay_side_stream=False):
    """The writer is held until the next optimizer step has run, so it reads the snapshot after the update."""
    model, opt = tr.model, tr.opt
    stepped = threading.Event()
    real_save = T.save_checkpoint

    def held_save(*a):
        assert stepped.wait(60), "the next step did not run while the checkpoint was being written"
        return real_save(*a)
    monkeypatch.setattr(T, "save_checkpoint", held_save)
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    opt_state = {pid: {k: v.cpu().clone() for k, v in st.items() if torch.is_tensor(v)}
                 for pid, st in opt.state_dict()["state"].items()}
    if delay_side_stream:  # ~0.1 s of GPU sleep before the copies: an unfenced optimizer step would overtake them
        with torch.cuda.stream(tr.saver.stager.stream):
            torch.cuda._sleep(200_000_000)
    path = tr.save()
    tr.forward_backward(1)
    tr.optimizer_step()
    stepped.set()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(params[n], p.detach().cpu())]
    assert not unchanged, f"the step left these parameters as they were: {unchanged}"
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}  # updated in place
    tr.wait_for_save()
    w = load_file(os.path.join(path, "model.safetensors"))
    tied = model.config.tie_word_embeddings
    assert set(w) == {k for k in sd if not (tied and k == "lm_head.weight")}
    for k, v in w.items():
        assert torch.equal(v, sd[k]), k
    saved = torch.load(os.path.join(path, STATE), weights_only=False)["optimizer"]["state"]
    assert saved.keys() == opt_state.keys()
    for pid, tensors in opt_state.items():
        for k, v in tensors.items():
            assert torch.equal(saved[pid][k], v), (pid, k)


def test_async_checkpoint_is_the_state_at_the_save_step_not_after_the_next_update(tmp_path, tiny_cfg, monkeypatch):
    _check_checkpoint_is_the_state_before_the_next_step(_trainer(tiny_cfg, tmp_path / "r", DEVICE.type), monkeypatch)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: races the staged device-to-host copy against the optimizer step")
@pytest.mark.parametrize("device_copy", [True, False])
def test_staged_copy_delayed_on_its_stream_still_captures_the_pre_step_state(tmp_path, tiny_cfg, monkeypatch,
                                                                             device_copy):
    tr = _trainer(tiny_cfg, tmp_path / "r", "cuda")
    assert tr.saver.stager is not None
    tr.saver.stager.device_copy = device_copy
    _check_checkpoint_is_the_state_before_the_next_step(tr, monkeypatch, delay_side_stream=True)
    assert tr.saver.stager.last_device_copy is device_copy


def test_device_copy_fits_beside_the_peak_with_headroom():
    from ringlinear.train.staging import device_copy_fits
    gib = 1 << 30
    assert device_copy_fits(71 * gib, 56 * gib, 139 * gib, 4 * gib)        # the 5-layer slice on an H200
    assert not device_copy_fits(127 * gib, 56 * gib, 139 * gib, 4 * gib)   # that peak with the clones counted in
    assert not device_copy_fits(80 * gib, 56 * gib, 139 * gib, 4 * gib)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the staged snapshot's device clone")
def test_the_device_copy_choice_is_kept_for_later_saves_of_the_same_layout(tmp_path, tiny_cfg, monkeypatch):
    tr = _trainer(tiny_cfg, tmp_path / "r", "cuda")
    st = tr.saver.stager
    tr.save()
    tr.wait_for_save()
    assert st.last_device_copy is True
    monkeypatch.setattr(st, "_fits", lambda n: False)  # what a peak that counts the first save's clones would say
    tr.forward_backward(1)
    tr.optimizer_step()
    tr.step = 2
    tr.save()
    tr.wait_for_save()
    assert st.last_device_copy is True


def test_async_save_device_copy_flag_is_checked_and_reaches_the_stager(tmp_path, tiny_cfg):
    with pytest.raises(ValueError, match="--async-save-device-copy must be auto, on or off"):
        tiny_cfg(tmp_path / "bad", device=DEVICE.type, async_save=True, async_save_device_copy="sometimes").validate()
    tr = T.Trainer(tiny_cfg(tmp_path / "r", device=DEVICE.type, async_save=True, async_save_device_copy="off",
                            steps=2, save_every=0, eval_every=0))
    if CUDA:
        assert tr.saver.stager.device_copy is False
    else:
        assert tr.saver.stager is None  # CPU: plain host copies, the flag has nothing to choose


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the pinned buffers of a staged snapshot")
def test_the_first_optimizer_step_prepares_the_buffers_the_first_save_reuses(tmp_path, tiny_cfg):
    tr = _trainer(tiny_cfg, tmp_path / "r", "cuda")  # one optimizer step done
    pool = tr.saver.stager.pool
    assert pool.layout is not None and pool.arena_bytes > 0
    before = list(pool.bufs)
    tr.save()
    tr.wait_for_save()
    assert len(pool.bufs) == len(before) and all(a is b for a, b in zip(before, pool.bufs))
