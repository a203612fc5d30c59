"""The tokenizer of a training run: the checkpoint's own, a given one, or a byte-level BPE learnt from the corpus.

The files written are those `load_tokenizer` and `ringlinear generate` read (`models/tokenizer.py`): the same
special tokens at the same ids and the Ring-style chat template; documents end with <|endoftext|>, a stop id.
"""
from __future__ import annotations

import os

from ..models.checkpoint import copy_tokenizer_files
from ..models.tokenizer import SPECIAL_TOKENS, train_byte_level_bpe, write_tokenizer_files
from .data import take_bytes

DOC_SEP = "<|endoftext|>"  # appended to every document; a stop id, so generation ends where documents end


def train_bpe(docs: list[str], vocab_size: int, sample_bytes: int):
    """A byte-level BPE learnt from the first `sample_bytes` of `docs` (already shuffled by the caller, so the
    sample is spread over the corpus)."""
    sample = take_bytes(docs, sample_bytes)
    return train_byte_level_bpe(sample, vocab_size, length=len(sample))


def save_tokenizer_dir(tok, out_dir: str) -> str:
    write_tokenizer_files(out_dir, tok, eos_ids=(SPECIAL_TOKENS.index(DOC_SEP), SPECIAL_TOKENS.index("<|role_end|>")))
    return out_dir


def copy_tokenizer_dir(src: str, out_dir: str) -> str:
    """The tokenizer of a checkpoint/tokenizer directory, which must have a tokenizer.json."""
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {src}: pass --tokenizer DIR with one")
    copy_tokenizer_files(src, out_dir)
    return out_dir


def doc_separator_id(tok) -> int:
    """Id appended after each document: the tokenizer's eos (first stop id), else <|endoftext|>."""
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    i = tok.token_to_id(DOC_SEP)
    if i is None:
        raise ValueError("the tokenizer has no eos token (generation_config eos_token_id / tokenizer_config "
                         "eos_token) and no <|endoftext|>: cannot mark document ends")
    return int(i)
