"""What a request's owner gets back, and how it is told.

`Engine.generate` returns a `Completion` per prompt; `Engine.submit` streams `Delta`s,
which `DeltaQueue` carries from the engine's thread to the caller's event loop. Every
change reaches an owner through `notify`, on the engine's thread after each step that
changes its request. Text, stop strings included, comes from the sequence's
`OutputText` (detokenizer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from services.engine.logprobs import TokenLogprob
from services.engine.scheduler import Request
from services.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: dict
    index: int = 0  # which of the request's choices
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


def completion(seq: Sequence) -> Completion:
    """A finished sequence's whole output."""
    return Completion(
        token_ids=list(seq.output),
        text=seq.text.text,
        finish_reason=seq.finish_reason or "length",
        stats=seq.stats.as_dict(),
        index=seq.index,
        logprobs=None if seq.logprobs is None else list(seq.logprobs),
    )


@dataclass
class Delta:
    """What a request produced since its last delta."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stats: dict
    error: str | None = None  # why, when finish_reason is "error"
    index: int = 0  # which of the request's choices
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


class DeltaStream:
    """Turns a sequence's growing output into deltas of tokens and text. Text that could
    still become a stop string, or ends inside a character, waits (`OutputText.ready`)."""

    def __init__(self) -> None:
        self.sent_tokens = 0
        self.sent_text = ""

    def delta(self, seq: Sequence, finished: bool) -> Delta | None:
        text = seq.text.ready(finished)
        new_tokens = seq.output[self.sent_tokens :]
        if not new_tokens and not finished and text == self.sent_text:
            return None
        delta = Delta(
            seq.id,
            new_tokens,
            text[len(self.sent_text) :],
            seq.finish_reason if finished else None,
            seq.stats.as_dict(),
            seq.error if finished else None,
            seq.index,
            None if seq.logprobs is None else seq.logprobs[self.sent_tokens :],
        )
        self.sent_tokens, self.sent_text = len(seq.output), text
        return delta


class DeltaQueue:
    """One request's deltas, of its `n` choices interleaved as they come, handed from the
    engine's thread (`put`, its `on_update`) to the event loop that created the queue,
    which iterates them up to the last choice's last one."""

    def __init__(self, n: int = 1) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._streams = [DeltaStream() for _ in range(n)]
        self._running = n  # choices whose last delta was not taken yet
        self.finished = False  # every choice's last delta was taken

    def put(self, seq: Sequence, finished: bool) -> None:
        delta = self._streams[seq.index].delta(seq, finished)
        if delta is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def __aiter__(self) -> DeltaQueue:
        return self

    async def __anext__(self) -> Delta:
        if self.finished:
            raise StopAsyncIteration
        delta = await self._queue.get()
        self._running -= delta.finish_reason is not None
        self.finished = self._running == 0
        return delta


def notify(request: Request, seq: Sequence, finished: bool) -> None:
    """Tell a request's owner; a failing callback never takes the engine down."""
    if request.on_update is not None:
        try:
            request.on_update(seq, finished)
        except Exception:
            log.exception("update callback of request %s failed", request.request_id)
