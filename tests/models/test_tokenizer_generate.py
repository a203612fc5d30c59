"""Tokenizer files, chat template, stop ids, streaming decode; generate() against an independent greedy loop."""
import pytest
import torch

from ringlinear import generate
from ringlinear.cli import main
from ringlinear.models.modeling import RingLinearForCausalLM
from ringlinear.models.tokenizer import StreamDecoder, load_tokenizer
from ringlinear.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tg") / "m"), seed=2)


def test_tokenizer_and_template(ckpt):
    tok = load_tokenizer(ckpt)
    assert tok.stop_token_ids == [1, 2]  # both eos ids of generation_config.json
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<role>SYSTEM</role>be brief<|role_end|><role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>"
    ids = tok.encode(text)
    assert 2 in ids  # <|role_end|> is one special token
    with pytest.raises(ValueError, match="messages must be"):
        tok.apply_chat_template([{"content": "no role"}])


def test_stream_decoder_equals_full_decode(ckpt):
    tok = load_tokenizer(ckpt)
    s = "naïve café — 数字 0 1 2, emoji 🙂 done"
    ids = tok.encode(s)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == s
    assert all("\ufffd" not in p for p in pieces)


@torch.no_grad()
def test_greedy_generate_equals_argmax_loop(ckpt):
    m = RingLinearForCausalLM.from_pretrained(ckpt)
    prompts = [[5, 9, 33, 40], [7, 8]]
    out = generate(m, prompts, max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    for p, got, lps in zip(prompts, out.sequences, out.logprobs):
        seq = list(p)
        for t in range(6):
            lg = m(torch.tensor([seq])).logits[0, -1]  # no cache: recompute the whole prefix
            nxt = int(torch.argmax(lg))
            assert got[t] == nxt
            assert abs(lps[t] - torch.log_softmax(lg, -1)[nxt].item()) < 1e-4
            seq.append(nxt)
    assert out.finish_reasons == ["length", "length"]


@torch.no_grad()
def test_sampling_seeded_and_stops(ckpt):
    m = RingLinearForCausalLM.from_pretrained(ckpt)
    a = generate(m, [[5, 6, 7]], max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=4)
    b = generate(m, [[5, 6, 7]], max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=4)
    assert a.sequences == b.sequences
    first = a.sequences[0][0]
    c = generate(m, [[5, 6, 7]], max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=4,
                 stop_token_ids=[first])
    assert c.sequences == [[first]] and c.finish_reasons == ["stop"]
    with pytest.raises(ValueError, match="top_p"):
        generate(m, [[5]], max_new_tokens=2, top_p=0.0)


def test_cli_info_and_generate(ckpt, capsys):
    assert main(["info", "--model", ckpt, "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "layer pattern" in out and "LLSSS" in out
    assert main(["generate", "--model", ckpt, "--chat", "hello", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["generate", "--model", ckpt + "-missing", "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err  # the directory, not "no tokenizer.json"
