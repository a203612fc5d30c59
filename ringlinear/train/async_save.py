"""`--async-save`: checkpoints written by a background thread while training goes on.

The step pays only for a snapshot: every tensor of the model's state_dict and of the trainer state (optimizer
moments, master weights) copied to host memory at the step, the way a synchronous save would read them. The thread
then writes that snapshot through the same `save_checkpoint` (temp directory, sha256 manifest, atomic rename,
retention after the rename), so the files, their atomicity and the exact resume are those of a synchronous save.

On CUDA the copy is staged (ringlinear/train/staging.py): queued on a side stream, through a device copy where it
fits, into pinned buffers reused across saves, so the step does not wait for it; the optimizer step that follows
waits on the device for the device copy (else the host copy) to finish (`before_update`) before it writes the
tensors in place, and the thread waits for the host copy before it writes files.
Elsewhere (CPU training) the copy is a plain synchronous one (`to_host`, `model_snapshot`).

One save is in flight at a time: the next save, the end of the run and any exception in the loop wait for it
first. A failed write is re-raised there, naming the checkpoint, never lost; the checkpoints before it are intact.
Host memory: one copy of the model and the optimizer state (Ring-mini 5-layer slice with fp32 master weights and
AdamW moments, 4.0B parameters: ~56 GB): while a save is in flight on CPU; on CUDA pinned for the whole run.
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from .staging import Stager, leaves, replace_leaves


def to_host(obj):
    """obj with every tensor (in dicts, lists, tuples) copied to CPU memory now; other values as they are."""
    return replace_leaves(obj, (t.detach().to("cpu", copy=True) for _, t in leaves(obj)))


def model_snapshot(model, sd=None):
    """What `write_pretrained` reads of a model (config, dtype, state_dict), on the host: `sd` when given (a staged
    copy of the state_dict), else a copy taken now. The state_dict is taken through the model's hooks, so stacked
    experts come out under their per-expert checkpoint names."""
    if sd is None:
        sd = to_host(model.state_dict())
    dtype = next(model.parameters()).dtype
    return SimpleNamespace(config=model.config, state_dict=lambda: sd,
                           parameters=lambda: iter([torch.empty(0, dtype=dtype)]))


class AsyncSaver:
    """`stager`: the staged CUDA snapshot (None: plain host copies; benchmarks/save_stall.py sets None on CUDA to
    time the pageable copy). `device_copy`: the Stager's (None = when it fits)."""

    def __init__(self, device: torch.device | None = None, device_copy: bool | None = None):
        self.stager = Stager(device, device_copy) if device is not None and device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self._copy = None  # the StagedCopy in flight: for the next submit's writer
        self._unfenced = None  # the `fence` event no update has waited for yet
        self.snapshot_s = None  # the last snapshot's copy time (seconds), known once its save is written
        self.fence_s = None  # of which the part an update waits for (the device copy when there is one)

    def snapshot(self, model, state: dict):
        """(model snapshot, state snapshot) on the host, for `submit`. Waits for the save in flight first: its
        writer may still read the buffers this one reuses."""
        self.wait()
        self.snapshot_s = None
        if self.stager is None:
            t0 = time.perf_counter()
            snap = model_snapshot(model), to_host(state)
            self.snapshot_s = time.perf_counter() - t0
            return snap
        host, self._copy = self.stager.snapshot({"model": model.state_dict(), "state": state})
        self._unfenced = self._copy.fence
        return model_snapshot(model, host["model"]), host["state"]

    def prepare(self, model, state: dict) -> None:
        """Allocate (and page-lock) the staged snapshot's host buffers for this model and state now; the first
        `snapshot` of the same layout then reuses them. A no-op without staging."""
        if self.stager is not None:
            self.stager.prepare({"model": model.state_dict(), "state": state})

    def before_update(self) -> None:
        """Call before anything writes the snapshotted tensors in place (the optimizer step, the expert-bias
        update): the current stream waits on the device for the staged copy (no host sync). A no-op otherwise."""
        if self._unfenced is not None:
            torch.cuda.current_stream(self.stager.device).wait_event(self._unfenced)
            self._unfenced = None

    def submit(self, what: str, fn, *args) -> None:
        """Run fn(*args) in the background after the previous save is done (`what` names it in errors); with a
        staged snapshot, once its copy has finished."""
        self.wait()
        self._what = what
        copy, self._copy = self._copy, None

        def work():
            try:
                if copy is not None:
                    copy.wait()  # the pinned buffers hold the step's state only from here
                    self.snapshot_s, self.fence_s = copy.seconds
                fn(*args)
            except BaseException as e:  # handed to the training thread at its next wait()
                self._error = e

        self._thread = threading.Thread(target=work, name="ringlinear-async-save", daemon=False)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the save in flight is written; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"asynchronous save of {self._what} failed: {type(e).__name__}: {e} "
                               "(the checkpoints before it are intact)") from e
