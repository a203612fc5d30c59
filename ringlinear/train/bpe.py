"""The tokenizer of a training run: the checkpoint's own, a given one, or a byte-level BPE learnt from the corpus.

The files written (`tokenizer.json`, `tokenizer_config.json` with the Ring-style chat template,
`generation_config.json` with the two stop ids) are the ones `load_tokenizer` and `ringlinear generate` read, and
`ringlinear.testing` writes for its tiny checkpoints: the same special tokens at the same ids.
"""
from __future__ import annotations

import logging
import os

from ..testing import SPECIAL_TOKENS, write_tokenizer_files
from .data import take_bytes

log = logging.getLogger("ringlinear.train")

DOC_SEP = "<|endoftext|>"  # appended to every document; a stop id, so generation ends where documents end


def train_bpe(docs: list[str], vocab_size: int, sample_bytes: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, any byte encodable) learnt from the first `sample_bytes` of
    `docs` (already shuffled by the caller, so the sample is spread over the corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    sample = take_bytes(docs, sample_bytes)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    return tok


def save_tokenizer_dir(tok, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer_files(out_dir, tok, eos_ids=(SPECIAL_TOKENS.index(DOC_SEP), SPECIAL_TOKENS.index("<|role_end|>")))
    return out_dir


def copy_tokenizer_files(src: str, out_dir: str) -> None:
    """Whatever tokenizer files (tokenizer.json, configs, chat template) `src` has."""
    import shutil

    from ..models.checkpoint import TOKENIZER_FILES
    os.makedirs(out_dir, exist_ok=True)
    if os.path.samefile(src, out_dir):  # e.g. --tokenizer OUT/tokenizer --out OUT: already in place
        return
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))


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
