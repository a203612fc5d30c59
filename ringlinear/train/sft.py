"""Supervised fine-tuning on chat data: `.jsonl` records with OpenAI-style `messages`, rendered by the checkpoint's
own chat template, with the loss on assistant tokens only, whole conversations packed into rows (`cu_seqlens`).

Which tokens are the assistant's: for assistant message i the template is rendered twice, the conversation before
it with the generation prompt (its prefix) and the conversation through it; the characters between the two are
that turn (its content and the template's end-of-turn marker). The whole conversation is tokenised once and a
token is a target when its characters lie in such a span. This needs a template whose rendering of a conversation
begins with the rendering of every shorter prefix of it ("prefix-stable"); a record for which that fails is counted
and skipped, not guessed at.

Every record that cannot be used is counted under a reason and reported in one line; none is dropped silently.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .packing import Row

log = logging.getLogger("ringlinear.train")

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Conversation:
    ids: np.ndarray   # [n] int32 token ids of the rendered conversation (+ the separator)
    mask: np.ndarray  # [n] bool: the token is an assistant token (a training target)


@dataclass
class SFTReport:
    used: int = 0
    skipped: Counter = field(default_factory=Counter)

    def line(self) -> str:
        if not self.skipped:
            return f"chat data: {self.used} conversations"
        why = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"chat data: {self.used} conversations; skipped {sum(self.skipped.values())}: {why}"


def _check_messages(rec) -> tuple[list[dict] | None, str | None]:
    """(messages, None) or (None, reason)."""
    if not isinstance(rec, dict) or "messages" not in rec:
        return None, "without a 'messages' list"
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        return None, "with an empty or non-list 'messages'"
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m:
            return None, "with a message missing its role"
        if m["role"] not in ROLES:
            return None, "with an unknown role"
        if not isinstance(m.get("content", ""), str):
            return None, "with non-string content"
    if not any(m["role"] == "assistant" for m in msgs):
        return None, "without an assistant message"
    return [{**m, "content": m.get("content", "")} for m in msgs], None


def read_chat_records(files: list[str]):
    """Yield (path:line, record or None, reason) for every non-empty line of the `.jsonl` files."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line), None
                except json.JSONDecodeError:
                    yield f"{path}:{n}", None, "that are not valid JSON"


def render_with_mask(tok, messages: list[dict], sep_id: int) -> Conversation | str:
    """Token ids of the whole conversation (+ sep_id) and the assistant mask, or the reason it cannot be used."""
    try:
        full = tok.apply_chat_template(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else \
                tok.apply_chat_template([], add_generation_prompt=True)
            through = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                return "whose chat template rendering is not prefix-stable"
            spans.append((len(before), len(through)))
    except Exception:  # noqa: BLE001  (a template error is the record's problem: counted, the rest goes on)
        return "the chat template rejected"
    enc = tok.tokenizer.encode(full, add_special_tokens=False)
    ids = np.asarray(enc.ids + [sep_id], dtype=np.int32)
    mask = np.zeros(ids.size, dtype=bool)
    offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    for a, b in spans:
        mask[:-1] |= (offs[:, 0] >= a) & (offs[:, 1] <= b) & (offs[:, 1] > offs[:, 0])
    if not mask.any():
        return "with no assistant tokens after tokenisation"
    return Conversation(ids, mask)


def load_conversations(files: list[str], tok, sep_id: int, seq_len: int) -> tuple[list[Conversation], SFTReport]:
    """Every usable conversation of the files (in order) and the report of the others."""
    report = SFTReport()
    convs = []
    for _where, rec, reason in read_chat_records(files):
        msgs = None
        if reason is None:
            msgs, reason = _check_messages(rec)
        if reason is None:
            out = render_with_mask(tok, msgs, sep_id)
            if isinstance(out, str):
                reason = out
            elif out.ids.size - 1 > seq_len:  # the separator may spill over: it is never a target
                reason = f"longer than --seq-len {seq_len}"
            else:
                convs.append(out)
                continue
        report.skipped[f"records {reason}"] += 1
    report.used = len(convs)
    return convs, report


class PackedConversations:
    """Whole conversations packed first-fit (in the given order) into rows of at most `seq_len` tokens; each
    conversation is a segment; the rest of a row is padding whose targets are ignored. Labels: the next token where
    it is an assistant token, else -100. Same `row(i)` interface as `packing.PackedRows`."""

    def __init__(self, convs: list[Conversation], seq_len: int, pad_id: int):
        self.L, self.pad = seq_len, pad_id
        self.rows: list[list[Conversation]] = []
        fill: list[int] = []
        for c in convs:
            n = min(c.ids.size, seq_len)
            for r, used in enumerate(fill):  # first fit keeps rows dense without reordering much
                if used + n <= seq_len:
                    self.rows[r].append(c)
                    fill[r] += n
                    break
            else:
                self.rows.append([c])
                fill.append(n)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> Row:
        ids, labels, starts = [], [], []
        for c in self.rows[i]:
            n = min(c.ids.size, self.L)
            starts.append(len(ids))
            x = c.ids[:n].astype(np.int64)
            y = np.full(n, -100, dtype=np.int64)
            tgt = c.mask[1:n + 1] if c.ids.size > n else np.append(c.mask[1:n], False)
            nxt = c.ids[1:n + 1] if c.ids.size > n else np.append(c.ids[1:n], 0)
            y[tgt] = nxt[tgt]
            ids.extend(x.tolist())
            labels.extend(y.tolist())
        pad = self.L - len(ids)
        if pad > 0:
            starts.append(len(ids))
            ids.extend([self.pad] * pad)
            labels.extend([-100] * pad)
        return Row(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), starts)


def is_chat_data(files: list[str]) -> bool:
    """True when every input is .jsonl and the first record of the first file has `messages` (and no `text`)."""
    if not files or not all(f.endswith(".jsonl") for f in files):
        return False
    for _where, rec, _ in read_chat_records(files[:1]):
        return isinstance(rec, dict) and "messages" in rec and "text" not in rec
    return False


def save_conversations(convs: list[Conversation], path: str) -> None:
    """One .npz (ids, mask, offsets), written to a temp name and renamed."""
    sizes = np.asarray([c.ids.size for c in convs], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(sizes)]) if convs else np.zeros(1, dtype=np.int64)
    ids = np.concatenate([c.ids for c in convs]) if convs else np.zeros(0, dtype=np.int32)
    mask = np.concatenate([c.mask for c in convs]) if convs else np.zeros(0, dtype=bool)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, ids=ids, mask=mask, offsets=off)
    import os
    os.replace(path + ".tmp", path)


def load_saved_conversations(path: str) -> list[Conversation]:
    z = np.load(path)
    off = z["offsets"]
    return [Conversation(z["ids"][a:b], z["mask"][a:b]) for a, b in zip(off[:-1], off[1:])]
