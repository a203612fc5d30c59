"""Checkpoint IO in the published layout (config.json, safetensors shards + index, tokenizer files): one toolkit for
loading, saving, `ringlinear convert` and training checkpoints.

- `iter_tensors(dir, cfg)`: every tensor of a checkpoint, one file open at a time, names with the aliases applied,
  MTP tensors skipped; each is read only when asked (`.load()`), after its shape can be checked.
- `ShardWriter`: tensors streamed into safetensors shards of at most `max_bytes`, with the index when sharded;
  each shard hashed while it is written (`safetensors_write.py`), so manifests need no second read.
- `atomic_directory(path)`: a directory written beside its target and renamed into place once complete.
- `copy_tokenizer_files`, `sha256_file`, `follow_umask`, `resolve_dtype`, `resolve_device`.

Loading builds the model on the meta device, allocates it once in the requested dtype/device and copies tensors in
one at a time, so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import RingLinearConfig
from .safetensors_write import write_safetensors

log = logging.getLogger("ringlinear")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
ALIASES = {"mlp.gate.e_score_correction_bias": "mlp.gate.expert_bias"}  # checkpoint name -> the model's
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file/tensor and the problem."""


# ---------------------------------------------------------------------- arguments
def resolve_dtype(dtype, cfg: RingLinearConfig | None = None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = cfg.torch_dtype if cfg is not None else "float32"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device=None) -> torch.device:
    """None or "auto": cuda if available, else cpu. Otherwise the named device, checked here so that an unknown
    name or a device this machine lacks is one ValueError naming it, not a traceback from deep inside torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device torch knows (use cpu, cuda or cuda:N)") from None
    if dev.type in ("cpu", "meta"):
        return dev
    available = getattr(getattr(torch, dev.type, None), "is_available", None)
    if available is None or not available():
        why = "this torch build has no CUDA, or no GPU is visible" if dev.type == "cuda" else "not on this machine"
        raise ValueError(f"device {device!r}: {'CUDA' if dev.type == 'cuda' else dev.type} is not available ({why})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ---------------------------------------------------------------------- reading
def _weight_files(path: str) -> dict[str, str]:
    """{tensor name: file} from the index, or from the single model.safetensors."""
    idx = os.path.join(path, INDEX_NAME)
    if os.path.exists(idx):
        try:
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx}: not a valid safetensors index ({e})") from None
        for fn in set(wm.values()):
            if not os.path.exists(os.path.join(path, fn)):
                raise CheckpointError(f"{idx} names shard {fn!r}, which does not exist in {path}")
        return wm
    single = os.path.join(path, SINGLE_NAME)
    if os.path.exists(single):
        with _open(single) as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError and OSError carry the precise reason
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def mtp_tensor_names(names, cfg: RingLinearConfig, where: str) -> set[str]:
    """The MTP tensors among `names` (training-only blocks, never used for inference): `model.mtp.*`, and
    `model.layers.{L..L+M-1}.*` for the M = num_nextn_predict_layers blocks the config declares (model.md §2(e)).
    A layer index past those means config.json and the weights disagree: an error, because loading the first L
    layers of a deeper model "succeeds" and generates garbage."""
    L, M = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    mtp, extra = set(), set()
    for name in names:
        m = _LAYER.match(name)
        if name.startswith("model.mtp."):
            mtp.add(name)
        elif m and int(m.group(1)) >= L:
            (mtp if int(m.group(1)) < L + M else extra).add(name)
    if extra:
        idx = sorted({int(_LAYER.match(n).group(1)) for n in extra})
        raise CheckpointError(
            f"{where}: config.json says num_hidden_layers {L} and num_nextn_predict_layers {M}, but the weights hold "
            f"layer(s) {idx[0]}..{idx[-1]} ({len(extra)} tensors): fix num_hidden_layers, or declare MTP blocks with "
            "num_nextn_predict_layers")
    return mtp


@dataclass
class StoredTensor:
    """One tensor of a checkpoint, not yet read. Valid while `iter_tensors` is on its file."""

    name: str         # as the model names it (aliases applied)
    stored_name: str  # as the file names it
    file: str
    _handle: object

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(self.stored_name).get_shape())

    def load(self) -> torch.Tensor:
        try:
            return self._handle.get_tensor(self.stored_name)
        except Exception as e:
            raise CheckpointError(f"tensor {self.stored_name!r} in {self.file} cannot be read (truncated file?): "
                                  f"{e}") from None


def iter_tensors(path: str, cfg: RingLinearConfig, desc: str = "loading weights") -> Iterator[StoredTensor]:
    """Every tensor of checkpoint directory `path` but the MTP ones (skipped with one log line), file by file in
    name order. A published checkpoint is tens of GB: progress shows on a terminal (tqdm disables itself
    otherwise)."""
    files = _weight_files(path)
    mtp = mtp_tensor_names(files, cfg, path)
    by_file: dict[str, list[str]] = {}
    for name, fn in files.items():
        by_file.setdefault(fn, []).append(name)
    with tqdm(total=len(files), desc=desc, unit="tensor", disable=None, leave=False) as bar:
        for fn, names in sorted(by_file.items()):
            with _open(os.path.join(path, fn)) as f:
                present = set(f.keys())
                for name in sorted(names):
                    bar.update(1)
                    if name not in present:
                        raise CheckpointError(f"index maps {name!r} to {fn}, but that file lacks it")
                    if name not in mtp:
                        alias = name
                        for a, b in ALIASES.items():
                            alias = alias.replace(a, b)
                        yield StoredTensor(alias, name, fn, f)
    if mtp:
        log.info("skipped %d MTP tensors (model.layers.>=%d / model.mtp.*): not used for inference", len(mtp),
                 cfg.num_hidden_layers)


def load_pretrained(cls, path, dtype=None, device=None, strict: bool = True, quantization=None, fp8_recipe=None,
                    **config_overrides):
    """`config_overrides` replace config.json fields for this load (checked like config.json itself).
    `quantization`: None = as the checkpoint is (FP8 when config.json has an fp8 quantization_config), "fp8" = FP8
    weights (quantised at load from bf16/fp32 tensors, models/fp8_serve.py), "none" = the model dtype (an FP8
    checkpoint is dequantised). `fp8_recipe`: the FP8 layers' Fp8Recipe (default: from the environment)."""
    from . import fp8_serve
    path = os.fspath(path)
    quantization = fp8_serve.check_quantization(quantization)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = RingLinearConfig.from_json(path)
    if config_overrides:
        unknown = sorted(set(config_overrides) - set(cfg.to_dict()))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown} in the overrides")
        cfg = cfg.replace(**config_overrides)
    stored = fp8_serve.checkpoint_quantization(cfg)
    quant = quantization or stored
    if quant == "fp8":
        fp8_serve.check_fp8_dims(cfg)
    elif stored == "fp8":
        cfg = cfg.replace(extra={k: v for k, v in cfg.extra.items() if k != "quantization_config"})
    dt = resolve_dtype(dtype, cfg)
    device = resolve_device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg)
    model.to(dt)
    if quant == "fp8":
        fp8_serve.quantize_fp8_(model, fp8_recipe)
    model.to_empty(device=device)
    target = model.state_dict(keep_vars=True)
    loader = fp8_serve.Fp8Loader(target)
    loaded, unexpected = set(), []
    for t in iter_tensors(path, cfg):
        if not loader.accepts(t.name):
            unexpected.append(t.stored_name)
            continue
        loaded.update(loader.put(t))
    loader.finish(path)
    optional = {k for k in target if k.endswith("expert_bias")} if not cfg.moe_router_enable_expert_bias else set()
    if cfg.tie_word_embeddings:
        optional.add("lm_head.weight")
    missing = sorted(set(target) - loaded - optional)
    if strict and unexpected:
        raise CheckpointError(f"unexpected tensor(s) in {path}: {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} total)")
    if strict and missing:
        raise CheckpointError(f"missing tensor(s) in {path}: {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)} total)")
    model.source_dir = path
    model.eval()
    return model


# ---------------------------------------------------------------------- writing
class ShardWriter:
    """Tensors streamed into safetensors shards of at most max_bytes (a tensor never split), in the order added;
    at `close` they are named model.safetensors, or model-NNNNN-of-NNNNN with the index. `sha256` then maps each
    shard's final name to the digest taken while it was written."""

    def __init__(self, directory: str, max_bytes: int):
        self.d, self.max = directory, max_bytes
        self.cur, self.size, self.names, self.weight_map, self.total = {}, 0, [], {}, 0
        self.sha256: dict[str, str] = {}
        self._digests: list[str] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.cur and self.size + n > self.max:
            self._flush()
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().nbytes() != n:  # a view into a larger tensor (the stacked experts): standalone
            t = t.clone()
        self.cur[name] = t
        self.size += n
        self.total += n

    def _flush(self) -> None:
        fn = f"part-{len(self.names):05d}.safetensors"
        self._digests.append(write_safetensors(os.path.join(self.d, fn), self.cur, metadata={"format": "pt"}))
        for k in self.cur:
            self.weight_map[k] = fn
        self.names.append(fn)
        self.cur, self.size = {}, 0

    def close(self) -> None:
        if self.cur or not self.names:
            self._flush()
        n = len(self.names)
        if n == 1:
            os.rename(os.path.join(self.d, self.names[0]), os.path.join(self.d, SINGLE_NAME))
            self.sha256 = {SINGLE_NAME: self._digests[0]}
            return
        rename = {fn: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, fn in enumerate(self.names)}
        for fn, new in rename.items():
            os.rename(os.path.join(self.d, fn), os.path.join(self.d, new))
        self.sha256 = {rename[fn]: d for fn, d in zip(self.names, self._digests)}
        wm = {k: rename[v] for k, v in self.weight_map.items()}
        with open(os.path.join(self.d, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": wm}, f, indent=2, sort_keys=True)


def write_pretrained(model, directory: str, max_shard_bytes: int = 4 << 30,
                     tokenizer_dir: str | None = None) -> dict[str, str]:
    """config.json, the weights and (from `tokenizer_dir`) the tokenizer files, into an existing directory.
    Returns {weight file: sha256} (digests taken while writing)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cfg.replace(torch_dtype=str(dtype).replace("torch.", "")).to_json(os.path.join(directory, "config.json"))
    writer = ShardWriter(directory, max_shard_bytes)
    for k, v in model.state_dict().items():
        if not (cfg.tie_word_embeddings and k == "lm_head.weight"):
            writer.add(k, v)
    writer.close()
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, directory)
    return writer.sha256


def save_pretrained(model, path, max_shard_bytes: int = 4 << 30, tokenizer_dir=None) -> None:
    """Write config.json, safetensors shards (+ index when sharded) and tokenizer files, atomically. Tokenizer
    files come from `tokenizer_dir`, else from the directory the model was loaded from."""
    path = os.path.abspath(os.fspath(path))
    src = tokenizer_dir or getattr(model, "source_dir", None)
    if src and os.path.abspath(src) == path:
        src = None  # saving over the source directory: its tokenizer files are kept as they are
    with atomic_directory(path, keep_from_old=TOKENIZER_FILES) as tmp:
        write_pretrained(model, tmp, max_shard_bytes, src)


def copy_tokenizer_files(src: str, dst: str) -> None:
    """Whatever tokenizer files (tokenizer.json, its configs, the chat template) `src` has."""
    os.makedirs(dst, exist_ok=True)
    if os.path.samefile(src, dst):  # e.g. --tokenizer OUT/tokenizer --out OUT: already in place
        return
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str, keep_from_old: tuple[str, ...] = ()) -> Iterator[str]:
    """Yields a fresh directory beside `path` to write into. Once the block completes, its modes follow the umask
    and it is renamed to `path`; an existing `path` is moved aside first and removed only after that rename
    (files in `keep_from_old` that only the old one had are carried over). If the block fails the staged
    directory is removed and `path` is as it was. An interrupted run leaves at worst a hidden `.tmp-*` beside it."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        follow_umask(tmp)
        if os.path.exists(path):
            old = tmp + ".old"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            for name in keep_from_old:
                if os.path.exists(os.path.join(old, name)) and not os.path.exists(os.path.join(path, name)):
                    shutil.copy2(os.path.join(old, name), os.path.join(path, name))
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    try:  # read, not set: os.umask() changes it process-wide for a moment
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str) -> None:
    """Give a staged directory tree the modes a plain mkdir/open would have: mkdtemp makes it 0700 and
    safetensors writes 0600, so a model saved for others on a shared machine was readable by its owner only."""
    mask = _umask()
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666 & ~mask)
