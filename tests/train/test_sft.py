"""Chat SFT data: assistant-only targets found through the checkpoint's own chat template, whole conversations packed
into rows, every unusable record counted under its reason."""
import json

import numpy as np
import pytest

from ringlinear.models.tokenizer import load_tokenizer
from ringlinear.testing import make_tiny_checkpoint
from ringlinear.train.sft import PackedConversations, load_conversations, render_with_mask


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tiny_checkpoint(str(tmp_path_factory.mktemp("sft") / "tiny")))


def _decode(tok, ids):
    return tok.decode(ids.tolist(), skip_special_tokens=False)


def test_mask_covers_exactly_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 and 4?"},
            {"role": "assistant", "content": "8 of course"}]
    conv = render_with_mask(tok, msgs, sep_id=1)
    target_text = _decode(tok, conv.ids[conv.mask])
    assert target_text == "5<|role_end|>8 of course<|role_end|>"
    assert conv.ids[-1] == 1 and not conv.mask[-1]


def test_bad_records_counted_and_long_ones_skipped(tok, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    recs = [good, {"text": "no messages"}, {"messages": [{"content": "no role"}]},
            {"messages": [{"role": "user", "content": ["not", "a string"]}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]}]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    convs, report = load_conversations([str(p)], tok, sep_id=1, seq_len=128)
    assert report.used == len(convs) == 1
    assert sum(report.skipped.values()) == 6
    line = report.line()
    for reason in ("without a 'messages' list", "missing its role", "non-string content", "without an assistant",
                   "longer than --seq-len 128", "not valid JSON"):
        assert reason in line


def test_packed_rows_keep_conversations_whole(tok):
    rng = np.random.default_rng(0)
    convs = []
    for i in range(12):
        msgs = [{"role": "user", "content": " ".join(["q"] * int(rng.integers(1, 20)))},
                {"role": "assistant", "content": " ".join(["a"] * int(rng.integers(1, 20)))}]
        convs.append(render_with_mask(tok, msgs, sep_id=1))
    rows = PackedConversations(convs, seq_len=96, pad_id=1)
    seen = 0
    for i in range(len(rows)):
        r = rows.row(i)
        assert r.input_ids.size == r.labels.size == 96
        bounds = r.seg_starts + [96]
        for a, b in zip(bounds[:-1], bounds[1:]):
            seg = r.input_ids[a:b]
            match = [c for c in convs if c.ids.size == b - a and np.array_equal(c.ids, seg)]
            if match:  # a whole conversation: targets are its next assistant tokens
                c = match[0]
                exp = np.where(np.append(c.mask[1:], False), np.append(c.ids[1:], 0), -100)
                assert np.array_equal(r.labels[a:b], exp)
                seen += 1
            else:  # the padding at the row's end
                assert b == 96 and (r.labels[a:b] == -100).all()
    assert seen == len(convs)


def test_sft_run_from_a_checkpoint(tmp_path, tok):
    """`ringlinear train` on chat records with --init-from: the checkpoint's tokenizer and template, loss on the
    assistant tokens only, bad records reported, the loss falls."""
    from ringlinear.testing import make_tiny_checkpoint
    from ringlinear.train import train
    from ringlinear.train.config import get_train_preset
    from ringlinear.train.report import read_metrics
    ckpt = make_tiny_checkpoint(str(tmp_path / "base"))
    recs = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]
    recs.append({"messages": [{"role": "user", "content": "no answer"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg = get_train_preset("tiny-test").replace(data=[str(data)], init_from=ckpt, out=str(tmp_path / "sft"), steps=12,
                                                seq_len=64, batch_size=4, lr=3e-3, eval_every=0, save_every=0,
                                                progress=False, plot=False, warmup_steps=1)
    s = train(cfg)
    assert s["step"] == 12
    losses = [m["loss"] for m in read_metrics(tmp_path / "sft" / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < losses[0]
    import os
    assert os.path.exists(tmp_path / "sft" / "final" / "tokenizer.json")


def test_chat_data_without_a_tokenizer_is_a_clear_error(tmp_path):
    from ringlinear.train import train
    from ringlinear.train.config import get_train_preset
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                             {"role": "assistant", "content": "y"}]}) + "\n")
    cfg = get_train_preset("tiny-test").replace(data=[str(data)], out=str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="chat template"):
        train(cfg)
