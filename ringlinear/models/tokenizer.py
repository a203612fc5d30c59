"""The checkpoint's tokenizer through the `tokenizers` library, and its chat template through jinja2; and the
tokenizers ringlinear makes itself (training runs, tiny test checkpoints): a byte-level BPE trainer and the files
that `load_tokenizer` reads back, with the special tokens and Ring-style chat template they share.

Rendering follows what transformers does for `apply_chat_template`: a sandboxed jinja2 environment with
trim_blocks/lstrip_blocks, the loopcontrols extension, a `tojson` filter that keeps non-ASCII, and the globals
`raise_exception` and `strftime_now`; variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`tools` plus any extra keyword (e.g. `enable_thinking`).
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import training_run_hint

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|role_end|>"]  # ids 0, 1, 2 of the tokenizers made here
# Ring-2.0 style turns: <role>HUMAN</role>...<|role_end|>; the generation prompt is <role>ASSISTANT</role>. With
# `tools`, a system turn lists them (the conversation's own system message first); an assistant turn's tool calls
# follow its text as <tool_call>{"name": ..., "arguments": {...}}</tool_call> (the format the server parses back);
# a tool result is an OBSERVATION turn wrapped in <tool_response>. Without tools the text is what it always was.
CHAT_TEMPLATE = (
    "{% if tools %}<role>SYSTEM</role>"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\nTo call a function, answer <tool_call>{\"name\": NAME, \"arguments\": {ARGUMENTS}}</tool_call>. "
    "Functions:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|role_end|>{% endif %}"
    "{% for m in messages %}"
    "{% if not (tools and loop.first and m['role'] == 'system') %}"
    "{% set role = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT', 'tool': 'OBSERVATION'}"
    "[m['role']] %}"
    "<role>{{ role }}</role>"
    "{% if m['role'] == 'tool' %}<tool_response>{{ m['content'] }}</tool_response>{% else %}{{ m['content'] }}"
    "{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{\"name\": {{ c['function']['name'] | tojson }}, "
    "\"arguments\": {% if c['function']['arguments'] is string %}{{ c['function']['arguments'] }}"
    "{% else %}{{ c['function']['arguments'] | tojson }}{% endif %}}</tool_call>{% endfor %}"
    "<|role_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)

_SURROGATE = re.compile("[\ud800-\udfff]")
# Pre-tokenizers that drop no character of the input (they only cut it, or re-spell it one for one).
_LOSSLESS_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Metaspace", "UnicodeScripts", "Sequence"}


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


class RingTokenizer:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}{training_run_hint(model_dir)}")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizers file: {e}") from None
        cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        model_cfg = _read_json(os.path.join(model_dir, "config.json"))
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.chat_template = _chat_template(model_dir, cfg)
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if not ids and self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            ids = [self.token_to_id(self.eos_token)]
        self.stop_token_ids: list[int] = [int(i) for i in ids]
        self.eos_token_id = self.stop_token_ids[0] if self.stop_token_ids else None
        pad = model_cfg.get("pad_token_id", gen.get("pad_token_id"))
        if pad is None and self.pad_token is not None:
            pad = self.token_to_id(self.pad_token)
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.max_chars_per_token = _max_chars_per_token(self.tokenizer)
        # encode_batch_fast (tokenizers >= 0.20; no offsets) and encode_batch release the GIL, `encode` does not:
        # a long prompt tokenised on a worker thread then leaves the server's event loop running.
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, tok: str):
        return self.tokenizer.token_to_id(tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        m = _SURROGATE.search(text)
        if m:
            raise ValueError(f"the text is not valid Unicode: a lone surrogate {m.group()!a} at character {m.start()}")
        ids = self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def max_chars(self, num_tokens: int) -> int | None:
        """Characters that `num_tokens` tokens can hold at most, or None when the tokenizer proves no bound: a
        longer text certainly encodes to more tokens (the server's length check before tokenising)."""
        return None if self.max_chars_per_token is None else num_tokens * self.max_chars_per_token

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            tools=None, **kwargs):
        """Template variables: messages, add_generation_prompt, tools, bos_token, eos_token, then `kwargs` (which
        may also override bos_token / eos_token)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json lacks 'chat_template')")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **kwargs,
                     "add_generation_prompt": add_generation_prompt, "tools": tools}
        text = render_chat_template(self.chat_template, messages, **variables)
        return self.encode(text) if tokenize else text


def render_chat_template(src: str, messages: list[dict], **variables) -> str:
    """A chat template's text rendered the way transformers renders it (module docstring); jinja2's errors
    (TemplateSyntaxError, TemplateError from `raise_exception`, ...) propagate."""
    return _compiled(src).render(**variables, messages=messages)


def _max_chars_per_token(tk) -> int | None:
    """The most input characters one token can stand for, where the tokenizer's structure proves a bound.

    Byte-level BPE with no normalizer (which could shrink the text), pre-tokenizers that drop nothing, every one
    of the 256 byte symbols in the vocabulary (so no byte is ever dropped or fused into an unknown token), no
    added token that strips neighbouring whitespace and no truncation: then each token spells out its piece of
    the input, one symbol per byte, and a byte is at most one character, so a token covers at most as many
    characters as its vocabulary string is long. Anything else: None (the caller tokenises and counts).
    """
    if tk.normalizer is not None or tk.truncation is not None or type(tk.model).__name__ != "BPE":
        return None
    if tk.pre_tokenizer is None:
        return None
    types, stack = set(), [json.loads(tk.pre_tokenizer.__getstate__())]
    while stack:
        p = stack.pop()
        if p.get("type") not in _LOSSLESS_PRE_TOKENIZERS or p.get("behavior") == "Removed":
            return None
        types.add(p["type"])
        stack.extend(p.get("pretokenizers", []))
    vocab = tk.get_vocab(with_added_tokens=True)
    if "ByteLevel" not in types or not set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys():
        return None
    if any(t.lstrip or t.rstrip for t in tk.get_added_tokens_decoder().values()):
        return None
    return max(len(t) for t in vocab)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def _chat_template(model_dir: str, cfg: dict):
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{name, template}, ...]: use "default"
        named = {d.get("name"): d.get("template") for d in t}
        t = named.get("default") or next(iter(named.values()), None)
    return t


_CACHE: dict[str, object] = {}


def _compiled(src: str):
    if src in _CACHE:
        return _CACHE[src]

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    tpl = env.from_string(src)
    _CACHE[src] = tpl
    return tpl


def load_tokenizer(model_dir: str) -> RingTokenizer:
    return RingTokenizer(os.fspath(model_dir))


def train_byte_level_bpe(texts, vocab_size: int, length: int | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation, every byte encodable) learnt from `texts`, with
    SPECIAL_TOKENS at ids 0, 1, 2. `length`: how many texts, for the trainer's bookkeeping."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def write_tokenizer_files(out_dir: str, tok: Tokenizer, eos_ids=(1, 2), chat_template: str = CHAT_TEMPLATE) -> None:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template) and generation_config.json (stop ids)
    for a tokenizer made by `train_byte_level_bpe`: what `load_tokenizer` and `ringlinear generate` read."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0],
                   "eos_token": SPECIAL_TOKENS[2], "pad_token": SPECIAL_TOKENS[1], "add_bos_token": False,
                   "add_eos_token": False, "chat_template": chat_template}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": list(eos_ids), "pad_token_id": 1}, f, indent=2)


class StreamDecoder:
    """Incremental detokenisation: `push(id)` returns the newly printable text (holds back partial UTF-8)."""

    def __init__(self, tok: RingTokenizer, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete byte sequence at the end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
