"""Drafting across tokenizers (universal assisted generation): a draft model whose
token ids mean other text than the target's reads the target's text in its own ids,
and what it drafts is written back in the target's.

Both ways go through text, over a short look-behind window only, so a step costs the
same however long the sequence. Reading: the target's tokens past an anchor are decoded
and encoded with the draft's tokenizer, after the draft ids of the text up to the anchor,
which moves up as the sequence grows. Writing back: the target's last tokens are decoded,
the draft's new text appended, and the whole encoded with the target's tokenizer; where
that reproduces the window, the ids after it are the proposal. Where it does not (the
draft's text merged with the target's last token, or the target wrote the window in
ids its tokenizer would not choose), the new text is encoded alone.

The draft ids need not be the draft tokenizer's own encoding of the whole text, only a
faithful one: drafts are checked by the target, so they cost speed when off, never
exactness. Drafts across tokenizers are greedy, proposals with certainty as n-gram
ones are, which speculative sampling takes exactly (a point mass); the draft's own
distributions are over other ids and cannot be used.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.sequence import Sequence

WINDOW = 8  # target tokens re-read each step, and those a proposal must reproduce
# A probe of what the draft's tokenizer must write back unchanged: words, digits,
# punctuation, whitespace runs and characters outside ASCII.
PROBE = "Hello, world!\n  x = [1, 2.5]  # ünïcödé, 你好 — ok?\n\n"


@dataclass
class _Anchor:
    """Draft ids of the target's text up to its first `tokens` tokens."""

    tokens: int = 0
    ids: list[int] = field(default_factory=list)


def _text(tokenizer, ids: list[int]) -> str:
    """`ids` as text, special tokens and spacing as they are."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


class Retokenizer:
    """The target's tokens in the draft's ids, and the draft's tokens in the target's."""

    def __init__(self, target_tokenizer, draft_tokenizer) -> None:
        self.target = target_tokenizer
        self.draft = draft_tokenizer
        self._anchors: weakref.WeakKeyDictionary[Sequence, _Anchor] = weakref.WeakKeyDictionary()

    def context(self, seq: Sequence) -> list[int]:
        """The draft's ids for `seq`'s tokens."""
        anchor = self._anchors.setdefault(seq, _Anchor())
        tokens = seq.tokens
        self._advance(anchor, tokens)
        return anchor.ids + _ids(self.draft, _text(self.target, tokens[anchor.tokens :]))

    def _advance(self, anchor: _Anchor, tokens: list[int]) -> None:
        """Move the anchor up to a window before the end, once there is a window's worth
        to move, so that each step re-reads little: to a word's start within a window
        before that where there is one (text without spaces has none)."""
        end = len(tokens) - WINDOW
        if end - anchor.tokens < WINDOW:
            return
        starts = (c for c in range(end, end - WINDOW, -1) if self._starts_word(tokens[c]))
        cut = next(starts, end)
        text = _text(self.target, tokens[anchor.tokens : cut])
        if text.endswith("\ufffd"):
            return  # the cut splits a character's bytes: wait for a later one
        anchor.ids += _ids(self.draft, text)
        anchor.tokens = cut

    def _starts_word(self, token: int) -> bool:
        """Whether `token`'s text begins with whitespace: both tokenizers split words
        there, so encoding the text on each side apart gives what encoding it whole does."""
        return _text(self.target, [token])[:1].isspace()

    def to_target(self, seq: Sequence, context: list[int], drafted: list[int]) -> list[int]:
        """The target's ids for the text `drafted` (draft ids) adds after `context` (the
        draft's ids for `seq`'s tokens); empty where they cannot continue `seq`'s tokens."""
        if not drafted:
            return []
        behind = context[-WINDOW:]
        before = _text(self.draft, behind)
        after = _text(self.draft, behind + drafted)
        if not after.startswith(before):
            return []
        text = after[len(before) :]
        window = seq.tokens[-WINDOW:]
        ids = _ids(self.target, _text(self.target, window) + text)
        if ids[: len(window)] == window:
            return ids[len(window) :]
        # The window reads otherwise (the target wrote it in ids its tokenizer would not,
        # or the new text merges with its end): the new text alone, its boundary unknown.
        return _ids(self.target, text)


def check_text(target_tokenizer, draft_tokenizer) -> None:
    """Refuse a draft tokenizer that cannot write the target's text back unchanged (one
    without byte fallback loses what it does not know), saying why."""
    probe = PROBE
    if getattr(target_tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": PROBE}]
        probe += target_tokenizer.apply_chat_template(messages, tokenize=False)
    back = _text(draft_tokenizer, _ids(draft_tokenizer, probe))
    if back != probe:
        raise ValueError(
            "the draft model's tokenizer cannot write the target's text back unchanged "
            f"({probe!r} came back as {back!r}); a draft model with another tokenizer "
            "needs one that keeps any text, such as a byte-level BPE"
        )
