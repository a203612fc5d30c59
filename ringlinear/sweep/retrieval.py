"""Synthetic retrieval: MQAR (multi-query associative recall) and passkey retrieval, generated from a seed.

Protocol (docs/sweep.md): small LM-trained models score ~0 on these zero-shot, so a fixed fraction of every run's
training text is synthetic documents of both tasks (the same documents for every ratio). Evaluation uses fresh
documents from another seed, at key-value counts up to twice the largest trained one and at lengths up to 4x the
training row length (extrapolation). A query counts as correct when the model's greedy next token equals the
document's token at every position of the answer (teacher forcing over the answer's tokens: what greedy decoding
would produce).

MQAR document:    "Pairs: kqx:41 bam:07 ... <filler> Queries: bam:07 kqx:41 ..."   (every value after a query key)
Passkey document: "<intro> <filler> The pass key is 48213. Remember it. 48213 is the pass key. <filler>
                   What is the pass key? The pass key is 48213."                     (the last 5 digits)
"""
from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field

import numpy as np

FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
          " There and back again.")
PASSKEY_INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it."


@dataclass
class RetrievalSpec:
    fraction: float = 0.1          # share of the training characters that is synthetic (half MQAR, half passkey)
    train_kv_max: int = 16         # MQAR training documents hold 2..train_kv_max pairs
    eval_kv: list = field(default_factory=lambda: [8, 16, 32])
    mqar_lengths: list = field(default_factory=lambda: [0.5, 1.0, 2.0])       # x seq_len
    passkey_lengths: list = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # x seq_len
    depths: list = field(default_factory=lambda: [0.1, 0.5, 0.9])
    mqar_docs: int = 16            # documents per MQAR cell (each asks every key)
    passkey_docs: int = 16         # documents per passkey (length, depth) cell

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- documents
def _keys(rng, n: int) -> list[str]:
    out: list[str] = []
    seen = set()
    while len(out) < n:
        k = "".join(rng.choice(list(string.ascii_lowercase), 3))
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


def _filler(n: int, start: int = 0) -> str:
    return "".join(FILLER[(start + i) % len(FILLER)] for i in range(n))


def mqar_document(rng, n_kv: int, n_filler: int) -> tuple[str, list[tuple[int, int]]]:
    """Text and the character spans of the answers (every value in the query part)."""
    keys = _keys(rng, n_kv)
    vals = [f"{v:02d}" for v in rng.integers(0, 100, n_kv)]
    text = "Pairs:" + "".join(f" {k}:{v}" for k, v in zip(keys, vals)) + "." + _filler(n_filler) + " Queries:"
    spans = []
    for i in rng.permutation(n_kv):
        text += f" {keys[i]}:"
        spans.append((len(text), len(text) + 2))
        text += vals[i]
    return text + ".", spans


def passkey_document(rng, n_before: int, n_after: int) -> tuple[str, list[tuple[int, int]]]:
    key = str(int(rng.integers(10000, 100000)))
    text = (PASSKEY_INTRO + _filler(n_before) + f" The pass key is {key}. Remember it. {key} is the pass key."
            + _filler(n_after, n_before) + " What is the pass key? The pass key is ")
    return text + key + ".", [(len(text), len(text) + len(key))]


def _units(text: str) -> int:
    """Word and punctuation count: a tokenizer-free stand-in for a length in tokens."""
    return len(re.findall(r"\w+|[^\w\s]", text))


_FILLER_UNITS = _units(_filler(len(FILLER))) / len(FILLER)


def training_documents(seed: int, n_chars: int, seq_len: int, spec: RetrievalSpec) -> list[str]:
    """Synthetic training documents (MQAR and passkey alternately) totalling about `n_chars` characters, each
    short enough to fit a row of `seq_len` tokens (sized in words; the tokenizer does not exist yet)."""
    rng = np.random.default_rng([seed, 0])
    docs, size = [], 0
    while size < n_chars:
        if len(docs) % 2 == 0:
            n_kv = int(rng.integers(2, spec.train_kv_max + 1))
            room = 0.6 * seq_len - (2 * 3 * n_kv + 4)
            text, _ = mqar_document(rng, n_kv, int(rng.integers(0, max(room / _FILLER_UNITS, 0) + 1)))
        else:
            n_fill = int(rng.integers(seq_len // 8, int(0.75 * seq_len)) / _FILLER_UNITS)
            before = int(rng.integers(0, n_fill + 1))
            text, _ = passkey_document(rng, before, n_fill - before)
        docs.append(text)
        size += len(text)
    return docs


# ---------------------------------------------------------------------- evaluation set
@dataclass
class Item:
    task: str       # "mqar" or "passkey"
    cell: tuple     # mqar: (n_kv, length); passkey: (length, depth)
    ids: list       # token ids of the document
    answers: list   # per query: [first, last] token indices of its answer (first >= 1)


def answer_tokens(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """[first, last] indices of the tokens overlapping the character span."""
    a, b = span
    hit = [j for j, (s, e) in enumerate(offsets) if s < b and e > a]
    if not hit or hit[0] < 1:
        raise ValueError(f"answer span {span} is not preceded by a token")
    return [hit[0], hit[-1]]


def _encode(tok, text: str, spans) -> tuple[list[int], list[list[int]]]:
    enc = tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [answer_tokens(enc.offsets, s) for s in spans]


def _fit_filler(tok, build, target: int) -> int:
    """Largest number of filler sentences whose document (build(n) -> text) stays within `target` tokens."""
    def n_tok(n):
        return len(tok.encode(build(n), add_special_tokens=False).ids)
    base = n_tok(0)
    if base > target:
        return -1
    per = max((n_tok(20) - base) / 20, 1e-6)
    n = max(int((target - base) / per), 0)
    while n > 0 and n_tok(n) > target:
        n -= 1
    while n_tok(n + 1) <= target:
        n += 1
    return n


def build_eval_set(tok, seq_len: int, spec: RetrievalSpec, seed: int) -> list[Item]:
    """`tok`: a `tokenizers.Tokenizer`. Cells whose shortest document exceeds their length are left out."""
    items: list[Item] = []
    for n_kv in spec.eval_kv:
        for mult in spec.mqar_lengths:
            length = int(round(mult * seq_len))
            rng = np.random.default_rng([seed, 1, n_kv, length])
            for doc_seed in rng.integers(0, 2 ** 62, spec.mqar_docs):
                def build(n, doc_seed=doc_seed):
                    return mqar_document(np.random.default_rng(doc_seed), n_kv, n)
                n = _fit_filler(tok, lambda n: build(n)[0], length)
                if n < 0:  # the pairs and queries alone are longer than the cell
                    break
                ids, ans = _encode(tok, *build(n))
                items.append(Item("mqar", (n_kv, length), ids, ans))
    for mult in spec.passkey_lengths:
        length = int(round(mult * seq_len))
        for depth in spec.depths:
            rng = np.random.default_rng([seed, 2, length, int(depth * 1000)])
            for doc_seed in rng.integers(0, 2 ** 62, spec.passkey_docs):
                def build(n, doc_seed=doc_seed, depth=depth):
                    before = int(round(depth * n))
                    return passkey_document(np.random.default_rng(doc_seed), before, n - before)
                n = _fit_filler(tok, lambda n: build(n)[0], length)
                if n < 0:
                    break
                ids, ans = _encode(tok, *build(n))
                items.append(Item("passkey", (length, depth), ids, ans))
    return items


# ---------------------------------------------------------------------- scoring
def score(items: list[Item], predict, max_batch_tokens: int = 16384) -> list[list[bool]]:
    """predict(seqs, positions) -> for each sequence, the greedy next-token ids at the given positions.
    Returns, per item, whether each query's answer tokens were all predicted."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    out: list[list[bool]] = [[] for _ in items]
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(items[order[j]].ids) <= max_batch_tokens:
            j += 1
        batch = order[i:j]
        pos = [[p - 1 for a, b in items[k].answers for p in range(a, b + 1)] for k in batch]
        preds = predict([items[k].ids for k in batch], pos)
        for k, ps, pr in zip(batch, pos, preds):
            got, ids = dict(zip(ps, pr)), items[k].ids
            out[k] = [all(got[p - 1] == ids[p] for p in range(a, b + 1)) for a, b in items[k].answers]
        i = j
    return out


def tables(items: list[Item], correct: list[list[bool]]) -> dict:
    """Fraction of queries answered: mqar[n_kv][length], passkey[length][depth], passkey_by_length[length]."""
    hits: dict = {}
    for it, c in zip(items, correct):
        keys = [(it.task, *it.cell)] + ([("passkey_by_length", it.cell[0])] if it.task == "passkey" else [])
        for key in keys:
            h = hits.setdefault(key, [0, 0])
            h[0] += sum(c)
            h[1] += len(c)
    acc: dict = {"mqar": {}, "passkey": {}, "passkey_by_length": {}}
    for (task, *cell), (h, n) in hits.items():
        d = acc[task]
        for k in cell[:-1]:
            d = d.setdefault(str(k), {})
        d[str(cell[-1])] = h / n
    return acc


def model_predictor(model, autocast):
    """predict() for `score`: right-padded batch, one forward, logits only at the asked positions."""
    import torch
    dev = next(model.parameters()).device

    @torch.no_grad()
    def predict(seqs, positions):
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = True
        with autocast():
            hid = model(ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=1,
                        output_hidden_states=True).hidden_states  # [B, T, h]
            bi = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], device=dev)
            pi = torch.tensor([p for ps in positions for p in ps], device=dev)
            pred = model.compute_logits(hid[bi, pi]).argmax(-1).tolist()
        out, k = [], 0
        for ps in positions:
            out.append(pred[k:k + len(ps)])
            k += len(ps)
        return out
    return predict


def evaluate_model(model, items: list[Item], autocast, max_batch_tokens: int = 16384) -> dict:
    was = model.training
    model.eval()
    try:
        correct = score(items, model_predictor(model, autocast), max_batch_tokens)
    finally:
        model.train(was)
    return tables(items, correct)
