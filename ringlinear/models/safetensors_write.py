"""A safetensors file written in one pass that hashes its bytes on the way out (no second read for the manifest).

The format (huggingface/safetensors, "format" section): an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, padded with spaces to a
multiple of 8 so the data starts aligned), then the tensors' bytes back to back, in offset order, no gaps. The
files load with `safetensors.safe_open` / `load_file` like those `save_file` writes (tested).
"""
from __future__ import annotations

import hashlib
import json
import struct

import torch

_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
           torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
           torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write CPU tensors (any layout; made contiguous) to `path`; returns the file's sha256 hex digest."""
    header, offset, flat = {}, 0, []
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + b.numel()]}
        offset += b.numel()
        flat.append(b)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(head)), head, *(b.numpy() for b in flat)):
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()
