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

from .bpe import copy_tokenizer_dir, doc_separator_id, save_tokenizer_dir, train_bpe
from .data import corpus_fingerprint, read_documents, resolve_inputs, split_documents
from .packing import TokenStream, tokenize_documents

log = logging.getLogger("ringlinear.train")


@dataclass
class Prepared:
    tokenizer_dir: str
    train_path: str
    val_path: str
    info: dict


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def prepare(cfg, tokenizer_src: str | None) -> Prepared:
    """tokenizer_src: a directory whose tokenizer to use (resumed checkpoint, --init-from, --tokenizer), or None to
    learn a BPE on the training documents."""
    from ..models.tokenizer import load_tokenizer
    out = cfg.out
    tok_dir = os.path.join(out, "tokenizer")
    files = resolve_inputs(cfg.data)
    fp = corpus_fingerprint(files, cfg.text_field)
    docs = None
    split = None
    if tokenizer_src:
        copy_tokenizer_dir(tokenizer_src, tok_dir)
    else:
        docs = read_documents(files, cfg.text_field)
        split = split_documents(docs, cfg.val_fraction, cfg.seed, cfg.max_corpus_mb)
        log.info("learning a %d-token byte-level BPE on %.1f MB of the training documents", cfg.vocab_size,
                 min(cfg.bpe_sample_mb, sum(map(len, split[0])) / 1e6))
        bpe = train_bpe(split[0], cfg.vocab_size, int(cfg.bpe_sample_mb * 1e6))
        save_tokenizer_dir(bpe, tok_dir)
    tok = load_tokenizer(tok_dir)
    sep = doc_separator_id(tok)
    key_src = "|".join(map(str, (fp, cfg.seed, cfg.val_fraction, cfg.max_corpus_mb, sep,
                                 _file_sha(os.path.join(tok_dir, "tokenizer.json")))))
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
