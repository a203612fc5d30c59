"""Run preparation on the main process: tokenizer (reuse or learn), document split, tokenised-stream cache.

The cache `OUT/data/<key>-{train,val}.{tokens,starts}.npy` (or `--data-cache`) is keyed by the input files (path,
size, mtime), the split settings and the tokenizer, so a resumed or repeated run skips reading and tokenising, and
any change re-tokenises.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from ..models.checkpoint import sha256_file
from ..models.tokenizer import load_tokenizer
from .bpe import copy_tokenizer_dir, doc_separator_id, save_tokenizer_dir, train_bpe
from .data import corpus_fingerprint, read_documents, resolve_inputs, split_documents
from .packing import PackedRows, TokenStream, tokenize_documents
from .sft import is_chat_data, load_conversations, save_conversations

log = logging.getLogger("ringlinear.train")


@dataclass
class Prepared:
    tokenizer_dir: str
    train_path: str
    val_path: str
    info: dict


def prepare(cfg, tokenizer_src: str | None) -> Prepared:
    """tokenizer_src: a directory whose tokenizer to use (resumed checkpoint, --init-from, --tokenizer), or None to
    learn a BPE on the training documents."""
    out = cfg.out
    tok_dir = os.path.join(out, "tokenizer")
    files = resolve_inputs(cfg.data)
    fp = corpus_fingerprint(files, cfg.text_field)
    docs = None
    split = None
    if tokenizer_src:
        copy_tokenizer_dir(tokenizer_src, tok_dir)
    elif cfg.data_format == "chat" or (cfg.data_format == "auto" and is_chat_data(files)):
        raise ValueError("chat data (records with 'messages') is rendered by a checkpoint's chat template: give "
                         "--init-from CHECKPOINT or --tokenizer DIR")
    else:
        docs = read_documents(files, cfg.text_field)
        split = split_documents(docs, cfg.val_fraction, cfg.seed, cfg.max_corpus_mb)
        log.info("learning a %d-token byte-level BPE on %.1f MB of the training documents", cfg.vocab_size,
                 min(cfg.bpe_sample_mb, sum(map(len, split[0])) / 1e6))
        bpe = train_bpe(split[0], cfg.vocab_size, int(cfg.bpe_sample_mb * 1e6))
        save_tokenizer_dir(bpe, tok_dir)
    tok = load_tokenizer(tok_dir)
    sep = doc_separator_id(tok)
    if cfg.data_format == "chat" or (cfg.data_format == "auto" and is_chat_data(files)):
        return _prepare_chat(cfg, files, tok, tok_dir, sep)
    key_src = "|".join(map(str, (fp, cfg.seed, cfg.val_fraction, cfg.max_corpus_mb, sep,
                                 sha256_file(os.path.join(tok_dir, "tokenizer.json")))))
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    data_dir = cfg.data_cache or os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_path, val_path = (os.path.join(data_dir, f"{key}-{s}") for s in ("train", "val"))
    if TokenStream.exists(train_path) and TokenStream.exists(val_path):
        log.info("tokenised corpus from the cache %s", data_dir)
        n_docs = None
    else:
        if split is None:
            docs = read_documents(files, cfg.text_field)
            split = split_documents(docs, cfg.val_fraction, cfg.seed, cfg.max_corpus_mb)
        n_docs = (len(split[0]), len(split[1]))
        for docs_, path in ((split[0], train_path), (split[1], val_path)):
            tokenize_documents(tok.tokenizer, docs_, sep).save(path)
        if not cfg.data_cache:  # caches of earlier settings; a shared --data-cache keeps other runs' keys
            for name in os.listdir(data_dir):
                if not name.startswith(key) and name.endswith(".npy"):
                    os.remove(os.path.join(data_dir, name))
    info = {"files": len(files), "default_corpus": not cfg.data, "docs": n_docs, "vocab": tok.vocab_size,
            "sep_id": sep}
    return Prepared(tok_dir, train_path, val_path, info)


def load_streams(p: Prepared) -> tuple[TokenStream, TokenStream]:
    return TokenStream.load(p.train_path), TokenStream.load(p.val_path)


def training_rows(p: Prepared, seq_len: int):
    """(train rows, held-out rows) with the `row(i)` / `len` interface: packed documents, or whole conversations."""
    if p.info.get("format") == "chat":
        from .sft import PackedConversations, load_saved_conversations
        pad = p.info["pad_id"] if p.info.get("pad_id") is not None else p.info["sep_id"]
        return tuple(PackedConversations(load_saved_conversations(path), seq_len, pad)
                     for path in (p.train_path, p.val_path))
    train, val = load_streams(p)
    return PackedRows(train, seq_len), PackedRows(val, seq_len, partial=True)


def _prepare_chat(cfg, files, tok, tok_dir, sep) -> Prepared:
    """SFT: conversations rendered with the chat template, assistant-only targets (ringlinear.train.sft), split
    into train / held-out by a seeded permutation of conversations, saved for every process to read."""
    import numpy as np
    convs, report = load_conversations(files, tok, sep, cfg.seq_len)
    log.info(report.line())
    if not convs:
        raise ValueError(f"no usable conversation in the chat data ({report.line()})")
    order = np.random.default_rng(cfg.seed).permutation(len(convs)).tolist()
    n_val = min(max(int(round(len(convs) * cfg.val_fraction)), 1 if cfg.val_fraction > 0 else 0), len(convs) - 1)
    data_dir = os.path.join(cfg.out, "data")
    os.makedirs(data_dir, exist_ok=True)
    paths = (os.path.join(data_dir, "chat-train.npz"), os.path.join(data_dir, "chat-val.npz"))
    save_conversations([convs[i] for i in order[n_val:]], paths[0])
    save_conversations([convs[i] for i in order[:n_val]], paths[1])
    info = {"files": len(files), "default_corpus": False, "docs": (len(convs) - n_val, n_val), "vocab": tok.vocab_size,
            "sep_id": sep, "format": "chat", "skipped": dict(report.skipped), "pad_id": tok.pad_token_id}
    return Prepared(tok_dir, paths[0], paths[1], info)
