"""Retrieval generators are seeded and right; scoring is right on hand-built examples; the model predictor agrees
with plain full-logit forwards."""
import re

import numpy as np
import pytest
import torch

from ringlinear.sweep.retrieval import (FILLER, Item, RetrievalSpec, build_eval_set, model_predictor, mqar_document,
                                        passkey_document, score, tables, training_documents)


def test_training_documents_are_seeded_and_sized():
    spec = RetrievalSpec(train_kv_max=8)
    a, b = training_documents(0, 20000, 128, spec), training_documents(0, 20000, 128, spec)
    assert a == b and a != training_documents(1, 20000, 128, spec)
    assert sum(map(len, a)) >= 20000 and a[0].startswith("Pairs:") and a[1].startswith("There is an important")
    n_kv = [len(re.findall(r" [a-z]{3}:\d\d", d.split("Queries:")[0])) for d in a[::2]]
    assert min(n_kv) >= 2 and max(n_kv) <= 8


def test_mqar_answers_are_the_values_of_their_keys():
    rng = np.random.default_rng(3)
    text, spans = mqar_document(rng, 12, 4)
    pairs = dict(re.findall(r" ([a-z]{3}):(\d\d)", text.split("Queries:")[0]))
    assert len(pairs) == 12 and len(spans) == 12
    for a, b in spans:
        key = text[a - 4:a - 1]  # " kqx:" precedes the value
        assert text[a - 1] == ":" and text[a:b] == pairs[key]
    assert sorted(text[a - 4:a - 1] for a, _ in spans) == sorted(pairs)  # every key asked once


def test_passkey_answer_is_the_key():
    text, [(a, b)] = passkey_document(np.random.default_rng(5), 3, 7)
    key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
    assert text[a:b] == key and text.endswith(key + ".") and text.count(key) == 3


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    t.train_from_iterator(training_documents(0, 50000, 256, RetrievalSpec()), trainer=tr)
    return t


def test_eval_set_lengths_answers_and_seed(tok):
    spec = RetrievalSpec(eval_kv=[4, 64], mqar_lengths=[1.0, 2.0], passkey_lengths=[0.5, 2.0], depths=[0.1, 0.9],
                         mqar_docs=3, passkey_docs=2)
    items = build_eval_set(tok, 128, spec, seed=0)
    assert items == build_eval_set(tok, 128, spec, seed=0)
    assert items != build_eval_set(tok, 128, spec, seed=1)
    cells = {(it.task, it.cell) for it in items}
    assert ("mqar", (64, 128)) not in cells  # 64 pairs and their queries do not fit 128 tokens: left out
    assert {("mqar", (4, 128)), ("mqar", (4, 256)), ("passkey", (64, 0.1)), ("passkey", (256, 0.9))} <= cells
    for it in items:
        length = it.cell[1] if it.task == "mqar" else it.cell[0]
        assert length - 8 <= len(it.ids) <= length, (it.cell, len(it.ids))  # within a filler sentence
        text = tok.decode(it.ids)
        for a, b in it.answers:
            ans = tok.decode(it.ids[a:b + 1]).strip()
            if it.task == "passkey":
                assert re.fullmatch(r"\d{5}", ans) and text.count(ans) == 3
            else:
                key = tok.decode(it.ids[:a]).rsplit(" ", 1)[1].rstrip(":")
                assert re.search(rf" {key}:{ans}\b", text.split("Queries:")[0]), (key, ans)
        if it.task == "passkey":  # depth: the share of the filler sentences before the key
            head, tail = text.split(" The pass key is", 1)
            n_before, n_after = (sum(x.count(f) for f in FILLER) for x in (head, tail))
            n = n_before + n_after
            assert abs(n_before - it.cell[1] * n) <= 0.5 + 1e-9, (n_before, n, it.cell)


def test_scoring_by_hand():
    # next-token predictor that is right everywhere except at positions listed in `wrong`
    items = [Item("mqar", (2, 10), [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [[2, 3], [6, 6], [8, 9]]),
             Item("passkey", (10, 0.5), [1, 2, 3, 4, 5, 6, 7, 8], [[5, 7]]),
             Item("passkey", (10, 0.5), [9, 9, 9, 9], [[1, 1]]),
             Item("passkey", (20, 0.5), [4, 3, 2, 1, 0], [[3, 4]])]
    wrong = {(0, 2): 99, (1, 6): 99, (3, 3): 99}  # (item, position predicted from): wrong token

    def predict(seqs, positions):
        out = []
        for s, ps in zip(seqs, positions):
            k = next(i for i, it in enumerate(items) if it.ids == s)
            out.append([wrong.get((k, p), s[p + 1]) for p in ps])
        return out
    got = score(items, predict, max_batch_tokens=12)  # small batches: several calls
    # item 0: answer [2,3] predicted from 1 and 2 -> position 2 wrong; [6,6] right; [8,9] right
    # item 1: [5,7] from 4, 5, 6 -> 6 wrong; item 2: right; item 3: [3,4] from 2, 3 -> 3 wrong
    assert got == [[False, True, True], [False], [True], [False]]
    t = tables(items, got)
    assert t["mqar"] == {"2": {"10": 2 / 3}}
    assert t["passkey"] == {"10": {"0.5": 0.5}, "20": {"0.5": 0.0}}
    assert t["passkey_by_length"] == {"10": 0.5, "20": 0.0}


def test_model_predictor_matches_full_forwards():
    import contextlib

    from ringlinear.models.presets import get_preset
    from ringlinear.models.modeling import RingLinearForCausalLM
    cfg = get_preset("tiny").replace(torch_dtype="float32")
    model = RingLinearForCausalLM.from_config(cfg, dtype=torch.float32, seed=1).eval()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 4, 13)]
    positions = [[0, 5, 8], [3], [2, 12, 7]]
    got = model_predictor(model, contextlib.nullcontext)(seqs, positions)
    for s, ps, g in zip(seqs, positions, got):
        with torch.no_grad():
            full = model(torch.tensor([s])).logits[0]
        assert g == [int(full[p].argmax()) for p in ps]
