"""Structured output: a request's grammar compiled by xgrammar against the tokenizer's vocabulary, a token mask
applied to its logits row on the logits' device before sampling, and a matcher advanced with every sampled token.

The grammar kinds are `SamplingParams.structured`'s: any JSON object, a JSON schema, or tagged JSON (a literal
begin tag, JSON valid under one of several schemas, an end tag: a forced tool call). JSON is compiled without free
whitespace (xgrammar's `any_whitespace=False`: `{"a": 1, "b": [2, 3]}`), so a weak model cannot pad the output
with whitespace forever. The tokenizer's stop ids are the grammar's: they are allowed only once the grammar is
complete, and once one is accepted the matcher is terminated (the request stops).

xgrammar is optional: this module imports it when a compiler is first made; without it, `GrammarError` carries
`XGRAMMAR_MISSING`. Special added tokens (`<|role_end|>`, ...) enter xgrammar's vocabulary as empty strings,
which it treats as special: no grammar can emit them inside JSON.
"""
from __future__ import annotations

import json
import threading

import torch

XGRAMMAR_MISSING = "structured output needs xgrammar: pip install 'ringlinear[serve]'"


class GrammarError(ValueError):
    """A grammar the library refuses (or no library): the message is safe to show to a client."""


def _xgr():
    try:
        import xgrammar
    except ImportError:
        raise GrammarError(XGRAMMAR_MISSING) from None
    return xgrammar


def available() -> bool:
    try:
        _xgr()
    except GrammarError:
        return False
    return True


def _vocab_type(xgr, tokenizer):
    """xgrammar's name for how the vocabulary spells bytes, from the `tokenizers` decoder."""
    decoder = json.loads(tokenizer.tokenizer.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


class GrammarCompiler:
    """One per engine (made on first use; thread-safe). `compile` results are cached by xgrammar, keyed by the
    grammar text, so the check in `LLMEngine.prepare` (worker thread) and the request's matcher (engine thread)
    compile once."""

    def __init__(self, tokenizer, vocab_size: int):
        xgr = _xgr()
        self.xgr = xgr
        self.vocab_size = vocab_size
        special = {i for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items() if t.special}
        encoded = [""] * vocab_size  # ids past the tokenizer's vocabulary (lm_head padding) stay special
        for tok, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items():
            if i < vocab_size and i not in special:
                encoded[i] = tok
        info = xgr.TokenizerInfo(encoded, _vocab_type(xgr, tokenizer), vocab_size=vocab_size,
                                 stop_token_ids=list(tokenizer.stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info)
        self._lock = threading.Lock()

    def compile(self, spec: dict):
        """spec (`SamplingParams.structured`, shape already checked) -> xgrammar CompiledGrammar, or GrammarError
        with the library's reason."""
        xgr = self.xgr
        try:
            with self._lock:
                if spec["type"] == "json_object":
                    return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                if spec["type"] == "json_schema":
                    return self._compiler.compile_json_schema(json.dumps(spec["schema"]),
                                                              any_whitespace=False)
                schemas = [xgr.Grammar.from_json_schema(json.dumps(s), any_whitespace=False)
                           for s in spec["schemas"]]
                body = schemas[0] if len(schemas) == 1 else xgr.Grammar.union(*schemas)
                grammar = xgr.Grammar.concat(_literal(xgr, spec["begin"]), body, _literal(xgr, spec["end"]))
                return self._compiler.compile_grammar(grammar)
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001  (xgrammar raises RuntimeError / ValueError subclasses)
            raise GrammarError(f"the grammar library rejected it: {str(e).strip().splitlines()[0]}") from None

    def matcher(self, spec: dict) -> "Matcher":
        return Matcher(self.xgr.GrammarMatcher(self.compile(spec)))


def _literal(xgr, text: str):
    if not text:
        return xgr.Grammar.from_ebnf('root ::= ""')
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self.m = matcher

    def accept(self, token: int) -> None:
        if not self.m.accept_token(token):  # the mask allowed only accepted tokens: this is an engine bug
            raise RuntimeError(f"structured output: the grammar refused token {token} that its mask allowed")

    @property
    def terminated(self) -> bool:
        return self.m.is_terminated()


def apply_masks(logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
    """Set logits[rows[j], t] = -inf for every token t that matchers[j] does not allow next, in place, on the
    logits' device. logits [n, V] fp32. The bitmask ([n, ceil(V / 32)] int32) is filled on the host and copied
    over once."""
    xgr = _xgr()
    n, V = logits.shape
    bitmask = xgr.allocate_token_bitmask(n, V)
    for r, m in zip(rows, matchers):
        m.m.fill_next_token_bitmask(bitmask, r)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=V, indices=list(rows))
