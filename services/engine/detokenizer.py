"""A sequence's output text, decoded as its tokens arrive and cut at the first stop string.

Decoding the whole output again after every step costs time quadratic in its length.
Here each token decodes a short window instead (as in Hugging Face's text-generation-
inference and vLLM): the text of `ids[prefix:]` minus that of `ids[prefix:read]`, where
the window starts at the previous emission, so tokenizers that print a token differently
at the start of a text (leading spaces) still give the same text as one decode of all ids.
Text that ends inside a UTF-8 character waits for the token that completes it.
"""

from __future__ import annotations


class OutputText:
    """Text of the tokens added so far; `stopped` once a stop string completed in it."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`
        self._read = 0
        self._longest = max((len(s) for s in stops), default=0)

    def add(self, token: int) -> bool:
        """Append one token's text; True when that completes a stop string, and then the
        text is cut where the stop string begins."""
        self.ids.append(token)
        before = len(self.text)
        self.text += self._new_text(final=False)
        if not self.stops or len(self.text) == before:
            return False
        # Only a stop string that ends in the new text can be new: look from there.
        start = max(0, before - self._longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def finish(self) -> None:
        """The output ended: text held back for an incomplete character comes out as is."""
        if not self.stopped:
            self.text += self._new_text(final=True)

    def ready(self, finished: bool) -> str:
        """The text that may be shown now: all of it once finished; before that, without a
        tail that could still grow into a stop string."""
        if finished or not self.stops:
            return self.text
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return self.text[:-k]
        return self.text

    def _new_text(self, final: bool) -> str:
        shown = self._decode(self.ids[self._prefix : self._read])
        whole = self._decode(self.ids[self._prefix :])
        if len(whole) <= len(shown) or (whole.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return whole[len(shown) :]

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)


def decode(tokenizer, ids: list[int]) -> str:
    """The one way the engine turns token ids into text: special tokens left out, and no
    clean-up of spaces (which would make a text depend on where it was cut)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
