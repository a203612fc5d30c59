"""The `--async-save` snapshot on CUDA: every device tensor copied into pinned host buffers on a side stream, so the
training step does not wait for the device-to-host copy (a synchronous copy into pageable memory of a Ring-mini
5-layer slice's ~56 GB of state stalls the step for many seconds).

Ordering, all on the device, no host synchronisation at the save step:
- the side stream waits for the current stream's work queued before the save (the state at the step);
- every source is `record_stream`-ed on the side stream, so the caching allocator does not hand its memory to new
  work before the copies are done (state_dict hooks or gathers may make temporaries that are dropped right away);
- an event recorded after the copies that read the sources is the fence: whatever writes the snapshotted tensors
  in place (the optimizer step: parameters, fp32 masters, moments; the MoE expert-bias update) must queue after it
  (`current_stream().wait_event`, `AsyncSaver.before_update`), and the writer thread waits for the host copy
  (`StagedCopy.wait`) before it reads a buffer. The next forward and backward run meanwhile: they only read the
  parameters.

Buffers: one host arena per snapshot layout (the (path, shape, dtype) of every tensor), an anonymous mapping of
its exact size rounded up to whole pages, page-locked with cudaHostRegister once, then reused by every save of
that layout: torch's pinned allocator rounds each allocation up to a power of two (a 1.3 GB fp32 embedding would
pin 2 GiB).
Each tensor is a separate storage over its slice of the arena (torch.frombuffer), so torch.save and safetensors
write it alone. A save reuses the buffers only after the previous save's writer is done with them (one save in
flight: `AsyncSaver.snapshot` waits first).
"""
from __future__ import annotations

import logging
import mmap
import time
import weakref
from collections import deque

import torch

log = logging.getLogger("ringlinear.train")

ALIGN = 512  # bytes between buffer starts in the arena: any dtype's alignment, and DMA-friendly


def leaves(obj, path=()):
    """(path, tensor) of every tensor in obj (dicts, lists, tuples), in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))


def replace_leaves(obj, new):
    """obj rebuilt with its tensors replaced, in `leaves` order, by the items of the iterator `new`; containers are
    new objects (later changes to the originals do not reach the copy), other values as they are."""
    if isinstance(obj, torch.Tensor):
        return next(new)
    if isinstance(obj, dict):
        return {k: replace_leaves(v, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(replace_leaves(v, new) for v in obj)
    return obj


def _unregister(ptr: int) -> None:
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != 0:  # a finalizer cannot raise; the memory is freed either way
        log.error("cudaHostUnregister of a save-staging arena failed (cudaError %d)", err)


class PinnedPool:
    """Host buffers of one snapshot layout, kept across saves; a new layout replaces them all."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.layout = None
        self.bufs: list[torch.Tensor] = []
        self.arena_bytes = 0

    def buffers(self, layout: list[tuple]) -> list[torch.Tensor]:
        """One contiguous host tensor per (path, shape, dtype) of layout, the same objects as the previous call's
        when the layout is unchanged. The caller guarantees nothing reads or writes the previous buffers any
        more."""
        if layout == self.layout:
            return self.bufs
        self.bufs, self.layout = [], None  # the old arena goes (and is unregistered) once its views are dropped
        sizes = [torch.Size(shape).numel() * dt.itemsize for _, shape, dt in layout]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // ALIGN) * ALIGN
        # An anonymous mapping: page-aligned and whole pages, so the registered range shares no page with other
        # allocations (a small malloc'd arena would share one, and registering or unregistering it would reach
        # into its neighbours).
        size = -(-max(total, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        arena = mmap.mmap(-1, size)
        if self.pin:
            ptr = torch.frombuffer(arena, dtype=torch.uint8, count=1).data_ptr()
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))
            if err != 0:
                raise RuntimeError(f"cannot page-lock {size / 2**30:.1f} GiB of host memory for the "
                                   f"async-save snapshot (cudaHostRegister: cudaError {err}); free host RAM or drop "
                                   "--async-save")
            fin = weakref.finalize(arena, _unregister, ptr)
            fin.atexit = False  # at exit the process's memory goes anyway, and CUDA may be torn down first
        host = arena  # frombuffer's storages keep the mapping alive
        for (_, shape, dt), off, n in zip(layout, offsets, sizes):
            if n == 0:
                self.bufs.append(torch.empty(shape, dtype=dt))
                continue
            self.bufs.append(torch.frombuffer(host, dtype=torch.uint8, count=n, offset=off).view(dt).view(shape))
        if self.pin and not all(b.is_pinned() for b in self.bufs if b.numel()):
            raise RuntimeError("the async-save staging arena is registered but torch does not see it as pinned")
        self.layout, self.arena_bytes = list(layout), total
        return self.bufs


def device_copy_fits(peak_bytes: int, state_bytes: int, total_bytes: int, headroom: int) -> bool:
    """Whether a device clone of the state fits beside the run's peak so far (the clones live through the next
    forward and backward, so they add to that peak)."""
    return peak_bytes + state_bytes + headroom <= total_bytes


class Stager:
    """Snapshots of trees of tensors (dicts, lists, tuples) into host buffers; device tensors of `device` (CUDA)
    through pinned memory on a side stream, host tensors copied at once.

    `device_copy`: first copy the device tensors into fresh device memory on the side stream, then from there to
    the host. The fence is then the device-to-device copy (~56 GB in ~30 ms on an H200, overlapping the next
    forward and backward), not the host copy (~1 s at PCIe speed, which an optimizer step right after the save
    would wait for). None (the default) = when it fits: the run's peak allocation so far plus the state plus
    `HEADROOM` within the GPU's memory; otherwise straight to the host (`last_device_copy` says which ran). The
    choice is made at the first snapshot of a layout and kept: later peaks include the clones themselves (they live
    through the next forward and backward), so asking again would count them twice and refuse a copy that fit."""

    HEADROOM = 4 << 30

    def __init__(self, device: torch.device, device_copy: bool | None = None):
        if device.type != "cuda":
            raise ValueError(f"staged snapshots are for CUDA devices, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.device_copy = device_copy
        self.last_device_copy = None
        self._chosen = None  # (layout, device copy or not) of the first snapshot of that layout
        self.pool = PinnedPool(pin=True)
        self.stream = torch.cuda.Stream(device=device)

    def prepare(self, obj) -> None:
        """The host buffers of obj's layout, allocated and page-locked now (logged with the time it took)."""
        src = list(leaves(obj))
        t0 = time.perf_counter()
        self.pool.buffers([(p, tuple(t.shape), t.dtype) for p, t in src])
        log.info("async save: %.1f GiB of pinned host buffers for the snapshots in %.1f s",
                 self.pool.arena_bytes / 2**30, time.perf_counter() - t0)

    def _fits(self, nbytes: int) -> bool:
        total = torch.cuda.get_device_properties(self.device).total_memory
        return device_copy_fits(torch.cuda.max_memory_allocated(self.device), nbytes, total, self.HEADROOM)

    def snapshot(self, obj):
        """(copy of obj on the host, StagedCopy). Returns with the copies queued, not finished: the sources may be
        written once the writer's stream waits on `fence`; the buffers are read after `StagedCopy.wait()`."""
        src = list(leaves(obj))
        for path, t in src:  # before any buffer is allocated
            if t.device.type != "cpu" and t.device != self.device:
                raise ValueError(f"async save: {'/'.join(map(str, path))} is on {t.device}, the staging stream "
                                 f"on {self.device}")
        layout = [(p, tuple(t.shape), t.dtype) for p, t in src]
        bufs = self.pool.buffers(layout)
        need = sum(t.numel() * t.element_size() for _, t in src if t.device.type != "cpu")
        if self.device_copy is not None:
            use_dev = self.device_copy
        elif self._chosen is not None and self._chosen[0] == layout:
            use_dev = self._chosen[1]
        else:
            use_dev = self._fits(need)
            self._chosen = (layout, use_dev)
        if use_dev != self.last_device_copy:
            why = "--async-save-device-copy off" if self.device_copy is False else "a device copy does not fit"
            log.info("async save: %.1f GiB of device state staged %s", need / 2**30,
                     "through a device copy (the step waits for that copy only)" if use_dev else
                     f"straight to pinned host memory ({why}: the optimizer step after the save waits for the "
                     "host copy)")
        self.last_device_copy = use_dev
        copy = StagedCopy(self.stream)
        side = self.stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            copy.start.record(side)
            for (_, t), b in zip(src, bufs):
                t = t.detach()
                if t.device.type == "cpu":  # RNG states, a gathered (FSDP) model: a host copy now
                    b.copy_(t)
                    continue
                t.record_stream(side)
                if use_dev:  # a clone made here belongs to the side stream; its host copy waits for the writer
                    copy.pending.append((t.clone(), b))
                else:  # the fence (all of these) is waited for by the next update anyway
                    b.copy_(t, non_blocking=True)
            copy.fence.record(side)
        return replace_leaves(obj, iter(bufs)), copy


class StagedCopy:
    """One snapshot in flight: events start / fence (the sources may be written after it) / done (the host
    buffers hold the snapshot), and the device clones still to be copied to the host.

    `wait` (the writer thread) copies the clones in chunks of CHUNK_BYTES, each waited for before the next is
    queued: the copy engine runs a stream's copies in order, so a small host copy the training stream makes
    meanwhile would otherwise wait behind the whole snapshot (measured: ~0.2 s for 12.6 GB on an H200), and the
    training stream with it."""

    CHUNK_BYTES = 256 << 20

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream
        self.start, self.fence, self.done = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        self.pending: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    def wait(self) -> None:
        side = self.stream
        with torch.cuda.device(side.device), torch.cuda.stream(side):
            queued = 0
            while self.pending:
                t, b = self.pending.popleft()  # the clone goes once its copy is queued (stream order keeps it)
                b.copy_(t, non_blocking=True)
                queued += t.numel() * t.element_size()
                del t
                if queued >= self.CHUNK_BYTES and self.pending:
                    side.synchronize()
                    queued = 0
            self.done.record(side)
        self.done.synchronize()

    @property
    def seconds(self) -> tuple[float, float]:
        """(start to done, start to fence) in seconds, once `wait` has returned."""
        return self.start.elapsed_time(self.done) / 1e3, self.start.elapsed_time(self.fence) / 1e3
