"""Checkpoint IO in the published layout: config.json + (sharded) safetensors + index, tokenizer files alongside.

Loading builds the model on the meta device, allocates it once in the requested dtype/device and copies tensors in
one at a time, so peak memory is the model plus one tensor. Saving writes a temp dir and renames it into place.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import torch

from .config import RingLinearConfig

log = logging.getLogger("ringlinear")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
_ALIASES = {"mlp.gate.e_score_correction_bias": "mlp.gate.expert_bias"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file/tensor and the problem."""


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
        return {k: SINGLE_NAME for k in _keys_of(single)}
    raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")


def _open(file: str):
    from safetensors import safe_open
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError and OSError carry the precise reason
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _keys_of(file: str) -> list[str]:
    with _open(file) as f:
        return list(f.keys())


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


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


def load_pretrained(cls, path, dtype=None, device=None, strict: bool = True):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = RingLinearConfig.from_json(path)
    dt = resolve_dtype(dtype, cfg)
    device = resolve_device(device or "cpu")
    files = _weight_files(path)
    mtp = mtp_tensor_names(files, cfg, path)

    with torch.device("meta"):
        model = cls(cfg)
    model.to(dt)
    model.to_empty(device=device)
    target = model.state_dict(keep_vars=True)
    loaded, skipped, unexpected = set(), [], []
    by_file: dict[str, list[str]] = {}
    for name, fn in files.items():
        by_file.setdefault(fn, []).append(name)
    # A published checkpoint is tens of GB: show progress on a terminal (tqdm disables itself otherwise).
    from tqdm.auto import tqdm
    bar = tqdm(total=len(files), desc="loading weights", unit="tensor", disable=None, leave=False)
    for fn, names in sorted(by_file.items()):
        full = os.path.join(path, fn)
        with _open(full) as f:
            present = set(f.keys())
            for name in names:
                bar.update(1)
                if name not in present:
                    raise CheckpointError(f"index maps {name!r} to {fn}, but that file lacks it")
                if name in mtp:
                    skipped.append(name)
                    continue
                key = name
                for a, b in _ALIASES.items():
                    key = key.replace(a, b)
                if key not in target:
                    unexpected.append(name)
                    continue
                dst = target[key]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(dst.shape):
                    raise CheckpointError(f"tensor {name!r} in {fn}: expected shape {tuple(dst.shape)}, "
                                          f"found {shape}")
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"tensor {name!r} in {fn} cannot be read (truncated file?): {e}") from None
                with torch.no_grad():
                    dst.copy_(t)
                loaded.add(key)
    bar.close()
    if skipped:
        log.info("skipped %d MTP tensors (model.layers.>=%d / model.mtp.*): not used for inference",
                 len(skipped), cfg.num_hidden_layers)
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


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def save_pretrained(model, path, max_shard_bytes: int = 4 << 30, tokenizer_dir=None) -> None:
    """Write config.json, safetensors shards (+ index when sharded) and tokenizer files, atomically."""
    from safetensors.torch import save_file
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        cfg = model.config
        dtype = next(model.parameters()).dtype
        cfg_out = cfg.replace(torch_dtype=str(dtype).replace("torch.", ""))
        cfg_out.to_json(os.path.join(tmp, "config.json"))
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        shards = _shard(state, max_shard_bytes)
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fn = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            # Expert weights view shared stacks: give safetensors standalone contiguous tensors.
            save_file({k: v.contiguous().clone().cpu() for k, v in shard.items()}, os.path.join(tmp, fn),
                      metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fn
                total += v.numel() * v.element_size()
        if n > 1:
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        src = tokenizer_dir or getattr(model, "source_dir", None)
        if src and os.path.abspath(src) != path:
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(src, name)):
                    shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        follow_umask(tmp)
        _swap_into_place(tmp, path)
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


def _swap_into_place(tmp: str, path: str) -> None:
    """Rename tmp -> path; an existing path is moved aside first and removed only after the rename succeeded."""
    if os.path.exists(path):
        old = path + ".old-" + os.path.basename(tmp)
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        # Keep tokenizer files that lived only in the old dir (saving over a checkpoint dir in place).
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(old, name)) and not os.path.exists(os.path.join(path, name)):
                shutil.copy2(os.path.join(old, name), os.path.join(path, name))
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
