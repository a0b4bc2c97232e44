"""The upstream's `GenerateResponse`s as OpenAI's replies: whole, or as streamed chunks.

One `Reply` per request. With n > 1 the upstream interleaves the responses of every
choice, each naming its `index`, and each choice ends with its own final response, whose
usage is that choice's: the reply's usage sums completion, drafted and accepted tokens
over the choices, and counts the prompt once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from services.common import api
from services.gen.selfspec.v1 import generation_pb2 as pb

FINISH_REASONS = {code: name for name, code in api.FINISH_REASONS.items()}
COMPLETION, CHAT = "text_completion", "chat.completion"


@dataclass
class _Choice:
    text: str = ""
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: pb.Usage = field(default_factory=pb.Usage)
    offset: int = 0  # characters streamed so far: completions' text_offset
    started: bool = False  # a chat stream's first delta carries the role


class Reply:
    """Builds the reply to one request of `kind` (COMPLETION or CHAT)."""

    def __init__(self, kind: str, request: pb.GenerateRequest, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("cmpl-" if kind == COMPLETION else "chatcmpl-") + request.request_id
        self.created = int(time.time())
        self.logprobs = request.HasField("logprobs")
        self.choices: dict[int, _Choice] = {}

    def _choice(self, response: pb.GenerateResponse) -> _Choice:
        choice = self.choices.setdefault(response.index, _Choice())
        choice.usage = response.usage
        if response.finish_reason:
            choice.finish_reason = FINISH_REASONS.get(response.finish_reason, "stop")
        return choice

    # -- whole -----------------------------------------------------------------------

    def add(self, response: pb.GenerateResponse) -> None:
        choice = self._choice(response)
        choice.text += response.text
        choice.logprobs.extend(response.logprobs)

    def whole(self) -> dict:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            if self.kind == COMPLETION:
                body = {"text": c.text, "logprobs": self._completion_logprobs(c, c.logprobs)}
            else:
                message = {"role": "assistant", "content": c.text}
                body = {"message": message, "logprobs": self._chat_logprobs(c.logprobs)}
            choices.append({"index": index, **body, "finish_reason": c.finish_reason})
        return {**self._head(self.kind), "choices": choices, "usage": self.usage()}

    # -- streamed --------------------------------------------------------------------

    def chunk(self, response: pb.GenerateResponse) -> dict:
        """The chunk that carries `response`; completions' text_offset runs on."""
        c = self._choice(response)
        index = response.index
        if self.kind == COMPLETION:
            logprobs = self._completion_logprobs(c, response.logprobs)
            choice = {"index": index, "text": response.text, "logprobs": logprobs}
            c.offset += len(response.text)
        else:
            delta = {"content": response.text}
            if not c.started:
                delta = {"role": "assistant", **delta}
                c.started = True
            logprobs = self._chat_logprobs(response.logprobs)
            choice = {"index": index, "delta": delta, "logprobs": logprobs}
        choice["finish_reason"] = FINISH_REASONS.get(response.finish_reason)
        return {**self._head(self._chunk_kind()), "choices": [choice]}

    def usage_chunk(self) -> dict:
        """`stream_options.include_usage`: the last chunk, with no choices."""
        return {**self._head(self._chunk_kind()), "choices": [], "usage": self.usage()}

    def _chunk_kind(self) -> str:
        return COMPLETION if self.kind == COMPLETION else "chat.completion.chunk"

    # -------------------------------------------------------------------------------

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        u = api.summed_usage([self.choices[i].usage for i in sorted(self.choices)])
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "drafted_tokens": u.drafted_tokens,
            "accepted_tokens": u.accepted_tokens,
        }

    def _chat_logprobs(self, items) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**_alternative(t), "top_logprobs": _tops(t)} for t in items]}

    def _completion_logprobs(self, choice: _Choice, items) -> dict | None:
        """OpenAI's legacy shape; text_offset counts from `choice.offset`."""
        if not self.logprobs:
            return None
        offsets, at = [], choice.offset
        for t in items:
            offsets.append(at)
            at += len(t.token)
        return {
            "tokens": [t.token for t in items],
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in items],
            "text_offset": offsets,
        }


def _alternative(t: pb.TokenLogprob | pb.TopLogprob) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}


def _tops(t: pb.TokenLogprob) -> list[dict]:
    return [_alternative(a) for a in t.top]


def event(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


DONE = event("[DONE]")
