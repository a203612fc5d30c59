"""`--async-save`: checkpoints written by a background thread while training goes on.

The step pays only for a snapshot: every tensor of the model's state_dict and of the trainer state (optimizer
moments, master weights) copied to host memory at the step, the way a synchronous save would read them. The thread
then writes that snapshot through the same `save_checkpoint` (temp directory, sha256 manifest, atomic rename,
retention after the rename), so the files, their atomicity and the exact resume are those of a synchronous save.

One save is in flight at a time: the next save, the end of the run and any exception in the loop wait for it
first. A failed write is re-raised there, naming the checkpoint, never lost; the checkpoints before it are intact.
Host memory: one copy of the model and the optimizer state while a save is in flight (Ring-mini 5-layer slice with
fp32 master weights and AdamW moments, 4.0B parameters: ~56 GB).
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import torch


def to_host(obj):
    """obj with every tensor (in dicts, lists, tuples) copied to CPU memory; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def model_snapshot(model):
    """What `write_pretrained` reads of a model (config, dtype, state_dict), on the host. The state_dict is taken
    through the model's hooks, so stacked experts come out under their per-expert checkpoint names."""
    sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    return SimpleNamespace(config=model.config, state_dict=lambda: sd,
                           parameters=lambda: iter([torch.empty(0, dtype=dtype)]))


class AsyncSaver:
    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    def submit(self, what: str, fn, *args) -> None:
        """Run fn(*args) in the background after the previous save is done (`what` names it in errors)."""
        self.wait()
        self._what = what

        def work():
            try:
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
