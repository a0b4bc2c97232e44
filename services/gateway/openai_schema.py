"""OpenAI's request bodies, with vLLM's extensions, and their translation to `GenerateRequest`.

The bodies are checked here for their shape (a field of the wrong type is refused naming
it); their values are checked by `api.validate`, the same as a gRPC call's. Fields that
OpenAI or vLLM define and selfspec does not implement are refused by name when set to
anything but their neutral value, rather than ignored: a client that asks for a presence
penalty must not get text sampled without one. Fields no one here knows (OpenAI adds new
ones, such as `store` or `metadata`, which clients send along) are ignored with a warning
in the log, as vLLM does, and a field sent as null counts as not sent.

Defaults are OpenAI's: temperature 1, and at most 16 tokens for a completion. A chat
completion without `max_tokens` (or `max_completion_tokens`) gets CHAT_MAX_TOKENS: vLLM's
"the rest of the context" needs the prompt's length, which only the replica knows.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from services.gen.selfspec.v1 import generation_pb2 as pb

COMPLETION_MAX_TOKENS = 16
CHAT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 1.0
MAX_LOGPROBS = 20
UINT32 = (1 << 32) - 1


class RequestError(ValueError):
    """A body the gateway refuses before it costs anything: 400, naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


log = logging.getLogger(__name__)


class _Strict(BaseModel):
    """A body's part: nulls are unset, unknown fields are logged and dropped."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            log.warning("%s: ignoring unknown fields %s", cls.__name__, ", ".join(unknown))
        return {k: v for k, v in data.items() if v is not None}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What completions and chat completions share."""

    model: str | None = None  # None: the one served
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's; -1 or 0: no limit
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, and not used
    # selfspec's own, in the body as vLLM takes its extensions
    draft: dict[str, Any] | None = None
    session_id: str | None = None
    # refused unless neutral (see _refuse_unsupported)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # an image part reaches the check that names it
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, and not used


class ChatBody(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class TokenizeBody(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeBody(_Strict):
    model: str | None = None
    tokens: list[int]


def parse(body_type: type[BaseModel], data: Any) -> Any:
    """`data` (parsed JSON) as `body_type`; a RequestError naming the first bad field."""
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    try:
        return body_type.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = ".".join(str(part) for part in error["loc"])
        param = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "missing":
            raise RequestError(f"{path} is required", param) from None
        raise RequestError(f"{path}: {error['msg']}", param) from None


# -- to GenerateRequest ------------------------------------------------------------------


def completion_request(body: CompletionBody) -> pb.GenerateRequest:
    _refuse_unsupported(body)
    _refuse_if("echo", body.echo, "leave it out: the reply holds the completion only")
    _refuse_if("suffix", body.suffix, "selfspec does not insert text")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of is not supported unless equal to n; use n", "best_of")
    req = _sampling(body, body.max_tokens, COMPLETION_MAX_TOKENS)
    _prompt(req, body.prompt)
    if body.logprobs is not None:
        req.logprobs = _logprobs("logprobs", body.logprobs)
    return req


def chat_request(body: ChatBody) -> pb.GenerateRequest:
    _refuse_unsupported(body)
    for name in ("tools", "functions"):
        _refuse_if(name, getattr(body, name), "selfspec does not call tools")
    for name in ("tool_choice", "function_call"):
        _refuse_if(name, getattr(body, name) not in (None, "none"), "selfspec does not call tools")
    if body.response_format not in (None, {"type": "text"}):
        raise RequestError("response_format: only {'type': 'text'} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens
    max_tokens = body.max_tokens if max_tokens is None else max_tokens
    req = _sampling(body, max_tokens, CHAT_MAX_TOKENS)
    req.messages.CopyFrom(messages(body.messages, body))
    if body.logprobs:
        req.logprobs = _logprobs("top_logprobs", body.top_logprobs or 0)
    return req


def messages(turns: list[ChatMessage], options: ChatBody | TokenizeBody) -> pb.Messages:
    if options.add_generation_prompt and options.continue_final_message:
        raise RequestError(
            "continue_final_message excludes add_generation_prompt: set that to false",
            "continue_final_message",
        )
    out = pb.Messages(
        add_generation_prompt=options.add_generation_prompt,
        continue_final_message=options.continue_final_message,
    )
    for i, turn in enumerate(turns):
        out.messages.add(role=turn.role, content=_content(i, turn.content))
    return out


def _content(i: int, content: str | list[ContentPart] | None) -> str:
    """Text, or text parts joined by newlines, as vLLM joins them; other parts refused."""
    if content is None:
        raise RequestError(f"messages.{i}.content is required", "messages")
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise RequestError(
                f"messages.{i}.content.{j}: only parts of type 'text' are supported, "
                f"not {part.type!r}",
                "messages",
            )
    return "\n".join(part.text for part in content)


def _sampling(body: _Sampling, max_tokens: int | None, default_max: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        max_tokens=unsigned("max_tokens", default_max if max_tokens is None else max_tokens),
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        n=unsigned("n", body.n),
        ignore_eos=body.ignore_eos,
        session_id=body.session_id or "",
    )
    if body.top_p is not None:
        req.top_p = body.top_p
    if body.top_k is not None and body.top_k != -1:
        req.top_k = unsigned("top_k", body.top_k)
    if body.min_p is not None:
        req.min_p = body.min_p
    if body.seed is not None:
        req.seed = unsigned("seed", body.seed, (1 << 64) - 1)
    req.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop or [])
    req.stop_token_ids.extend(unsigned("stop_token_ids", t) for t in body.stop_token_ids or [])
    if body.draft is not None:
        req.draft.update(body.draft)
    return req


def _prompt(req: pb.GenerateRequest, prompt) -> None:
    """One prompt, as text or as token ids. Several prompts in one body are refused: one
    request is one sequence here (ask for choices with `n`)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise RequestError(
                f"prompt holds {len(prompt)} prompts; selfspec takes one per request: send "
                "one request each (or n for several completions of one prompt)",
                "prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(unsigned("prompt", t) for t in prompt)
        if not prompt:
            raise RequestError("prompt is empty", "prompt")


def _logprobs(name: str, value: int) -> int:
    if not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}", name)
    return value


def unsigned(name: str, value: int, limit: int = UINT32) -> int:
    if not 0 <= value <= limit:
        raise RequestError(f"{name} must be between 0 and {limit}, got {value}", name)
    return value


_NEUTRAL = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
}


def _refuse_unsupported(body: _Sampling) -> None:
    for name, neutral in _NEUTRAL.items():
        _refuse_if(name, getattr(body, name) not in neutral, "selfspec does not implement it")


def _refuse_if(name: str, condition, why: str) -> None:
    if condition:
        raise RequestError(f"{name} is not supported: {why}; leave it out", name)
