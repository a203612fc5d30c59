"""The one corpus, tokenizer and tokenised cache every run of a sweep shares, and the retrieval evaluation set.

OUT/corpus/corpus.jsonl holds (a) the natural documents (the embedded stdlib sources or `--data`), files drawn at
random up to the size the largest run needs, then concatenated in path order (neighbouring files of one package
together) into pieces of about `group_rows` training rows, and (b) the synthetic retrieval documents, a fixed
fraction of the characters. Grouping keeps most rows a single segment: a long context for the attention to use. The
Trainer then splits, learns the BPE once (OUT/tokenizer) and tokenises once (OUT/data); every run reuses both
(`--tokenizer`, `--data-cache`).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from ..train.data import read_documents, resolve_inputs
from .retrieval import Item, RetrievalSpec, build_eval_set, training_documents

log = logging.getLogger("ringlinear.sweep")

CHARS_PER_TOKEN = 3.2  # byte-level BPE of a few thousand tokens on code: sizes the corpus before a tokenizer exists


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        write(f)
    os.replace(tmp, path)


def build_corpus(data: list[str], out_dir: str, seed: int, max_chars: float, group_chars: int,
                 spec: RetrievalSpec, seq_len: int) -> dict:
    """Write out_dir/corpus.jsonl (atomically) and return its statistics."""
    files = resolve_inputs(data)
    rng = np.random.default_rng([seed, 7])
    natural_budget = max_chars * (1 - spec.fraction)
    chosen, size = [], 0
    for i in rng.permutation(len(files)):
        if size >= natural_budget:
            break
        chosen.append(int(i))
        size += os.path.getsize(files[i])
    # a directory's .jsonl/.parquet files are read as records with a 'text' field; the sweep has no --text-field
    docs = read_documents([files[i] for i in sorted(chosen)],
                          remedy="leave such files out of --data (a glob such as 'DIR/**/*.py' takes only code)")
    groups, cur, cur_len = [], [], 0
    for d in docs:
        cur.append(d)
        cur_len += len(d)
        if cur_len >= group_chars:
            groups.append("\n\n".join(cur))
            cur, cur_len = [], 0
    if cur:
        groups.append("\n\n".join(cur))
    nat = sum(map(len, groups))
    synth = training_documents(seed, int(nat * spec.fraction / (1 - spec.fraction)), seq_len, spec) \
        if spec.fraction > 0 else []
    records = groups + synth
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "corpus.jsonl")

    def write(f):
        for j in rng.permutation(len(records)):
            f.write(json.dumps({"text": records[j]}) + "\n")
    _atomic_write(path, write)
    stats = {"path": path, "files": len(chosen), "files_available": len(files), "natural_docs": len(docs),
             "natural_pieces": len(groups), "natural_chars": nat, "synthetic_docs": len(synth),
             "synthetic_chars": sum(map(len, synth)), "default_corpus": not data}
    _atomic_write(os.path.join(out_dir, "corpus.json"), lambda f: json.dump(stats, f, indent=2))
    log.info("corpus: %d of %d files (%.1f MB) in %d pieces + %d synthetic retrieval documents (%.1f MB)",
             len(chosen), len(files), nat / 1e6, len(groups), len(synth), stats["synthetic_chars"] / 1e6)
    return stats


def load_corpus_stats(out_dir: str) -> dict | None:
    p = os.path.join(out_dir, "corpus.json")
    if not (os.path.exists(p) and os.path.exists(os.path.join(out_dir, "corpus.jsonl"))):
        return None
    with open(p) as f:
        return json.load(f)


def prepare_shared(base_cfg) -> dict:
    """Learn the tokenizer (first time only) and tokenise the corpus into the shared cache, as every run will.
    base_cfg: the TrainConfig of any run, with out = the sweep directory. Returns data statistics."""
    from ..train.packing import PackedRows
    from ..train.prepare import load_streams, prepare
    from .flops import mean_keys_per_query
    tok_dir = os.path.join(base_cfg.out, "tokenizer")
    have = os.path.exists(os.path.join(tok_dir, "tokenizer.json"))
    prep = prepare(base_cfg.replace(tokenizer=tok_dir if have else ""), tok_dir if have else None)
    train, val = load_streams(prep)
    rows = PackedRows(train, base_cfg.seq_len)
    return {"tokenizer_dir": prep.tokenizer_dir, "vocab": prep.info["vocab"], "train_tokens": int(train.tokens.size),
            "val_tokens": int(val.tokens.size), "train_rows": len(rows),
            "mean_keys": mean_keys_per_query(rows)}


def eval_set(out: str, tokenizer_dir: str, seq_len: int, spec: RetrievalSpec, seed: int) -> str:
    """OUT/retrieval_eval.json: the tokenised evaluation documents every run is scored on (built once)."""
    path = os.path.join(out, "retrieval_eval.json")
    if not os.path.exists(path):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        items = build_eval_set(tok, seq_len, spec, seed)
        _atomic_write(path, lambda f: json.dump([[it.task, list(it.cell), it.ids, it.answers] for it in items], f))
    return path


def load_eval_set(path: str) -> list[Item]:
    with open(path) as f:
        return [Item(t, tuple(c), ids, ans) for t, c, ids, ans in json.load(f)]
