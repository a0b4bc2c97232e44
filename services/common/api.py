"""Between the public API's messages and the engine's parameters.

The gateway validates with these functions before a request costs anything; the
engine replica converts with the same ones, so both sides agree on every field.
Errors are `ValueError`s whose message names the field.
"""

from __future__ import annotations

import math
from dataclasses import fields

from google.protobuf import json_format

from services.common.params import DraftConfig, SamplingParams
from services.gen.selfspec.v1 import generation_pb2 as pb

MAX_PROMPT_CHARS = 1 << 20  # text, summed over messages
MAX_PROMPT_TOKEN_IDS = 1 << 17
MAX_MESSAGES = 1024
MAX_ID_CHARS = 256  # request and session ids

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_INT_DRAFT_FIELDS = {"max_draft", "shortlist", "ngram_max", "ngram_min", "exit_layer"}
_LIST_DRAFT_FIELDS = {"skip_attn", "skip_mlp"}


def validate(req: pb.GenerateRequest) -> None:
    """Everything that can be checked without the model; raises ValueError."""
    for name in ("request_id", "session_id"):
        value = getattr(req, name)
        if len(value) > MAX_ID_CHARS:
            raise ValueError(f"{name} is longer than {MAX_ID_CHARS} characters")
        # Ids travel as gRPC metadata, which carries printable ASCII only.
        if not all(" " <= c <= "~" for c in value):
            raise ValueError(f"{name} may hold printable ASCII characters only")
    prompt(req)
    sampling_params(req)
    draft_override(req)


def prompt(req: pb.GenerateRequest | pb.TokenizeRequest) -> str | list[int] | list[dict]:
    """The prompt, in the form `Engine.add_request` takes (`Engine.encode` too, for
    Tokenize, whose requests have no prompt_token_ids)."""
    kind = req.WhichOneof("input")
    if kind is None:
        raise ValueError("one of prompt, prompt_token_ids or messages is required")
    if kind == "prompt":
        _check_chars("prompt", len(req.prompt))
        if not req.prompt:
            raise ValueError("prompt is empty")
        return req.prompt
    if kind == "prompt_token_ids":
        ids = list(req.prompt_token_ids.ids)
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        if len(ids) > MAX_PROMPT_TOKEN_IDS:
            raise ValueError(f"prompt_token_ids has more than {MAX_PROMPT_TOKEN_IDS} ids")
        return ids
    messages = req.messages.messages
    if not messages:
        raise ValueError("messages is empty")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"messages has more than {MAX_MESSAGES} entries")
    _check_chars("messages", sum(len(m.content) for m in messages))
    return [{"role": m.role, "content": m.content} for m in messages]


def chat_options(req: pb.GenerateRequest | pb.TokenizeRequest) -> dict:
    """The chat template's options of a request with messages, as `Engine.add_request` and
    `Engine.encode` take them; none for a prompt. add_generation_prompt, when unset, is
    true unless the request continues the last message (the engine refuses both set)."""
    if req.WhichOneof("input") != "messages":
        return {}
    messages = req.messages
    go_on = messages.continue_final_message
    add = messages.add_generation_prompt if messages.HasField("add_generation_prompt") else None
    return {
        "add_generation_prompt": not go_on if add is None else add,
        "continue_final_message": go_on,
    }


def detokenize_ids(req: pb.DetokenizeRequest) -> list[int]:
    """The ids to decode, within the limit of a prompt's; the replica checks them against
    the vocabulary."""
    if len(req.token_ids) > MAX_PROMPT_TOKEN_IDS:
        raise ValueError(f"token_ids has more than {MAX_PROMPT_TOKEN_IDS} ids")
    return list(req.token_ids)


def token_logprobs(decode, token_ids: list[int], logprobs) -> list[pb.TokenLogprob]:
    """The engine's logprobs (`TokenLogprob`s, one per token id) as the proto's, with each
    token's text from `decode([id])`, the alternatives' too."""
    return [
        pb.TokenLogprob(
            token_id=t,
            token=decode([t]),
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=i, token=decode([i]), logprob=v) for i, v in lp.top],
        )
        for t, lp in zip(token_ids, logprobs, strict=True)
    ]


def _check_chars(field: str, n: int) -> None:
    if n > MAX_PROMPT_CHARS:
        raise ValueError(f"{field} has {n} characters; the limit is {MAX_PROMPT_CHARS}")


def sampling_params(req: pb.GenerateRequest) -> SamplingParams:
    """The request's sampling fields; unset ones keep `SamplingParams`' defaults, which
    also checks them against its limits (params.MAX_TOKENS_LIMIT and the rest)."""
    given = {f.name: _value(req, f.name) for f in fields(SamplingParams) if _has(req, f.name)}
    return SamplingParams(**given)


def _value(req: pb.GenerateRequest, name: str):
    """A field as plain Python: repeated fields as lists, which is what SamplingParams takes."""
    value = getattr(req, name)
    return list(value) if hasattr(value, "__len__") and not isinstance(value, str) else value


def _has(req: pb.GenerateRequest, name: str) -> bool:
    """Optional scalars count when set; repeated fields and bools when non-empty."""
    value = getattr(req, name)
    if isinstance(value, bool) or hasattr(value, "__len__"):
        return bool(value)
    return req.HasField(name)


def draft_override(req: pb.GenerateRequest) -> dict | None:
    """The per-request drafting override as `DraftConfig` fields, checked for names and
    ranges here; layer numbers are checked by the replica, which knows the model."""
    if not req.HasField("draft"):
        return None
    raw = json_format.MessageToDict(req.draft)
    known = {f.name for f in fields(DraftConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"draft: unknown setting {', '.join(map(repr, unknown))}; "
            f"known settings are {', '.join(sorted(known))}"
        )
    override = {key: _draft_value(key, value) for key, value in raw.items()}
    try:
        DraftConfig(**{"mode": "off", **override})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"draft: {exc}") from None
    return override


def _draft_value(key: str, value):
    """Struct numbers arrive as floats; integer settings must hold whole numbers."""
    if key in _LIST_DRAFT_FIELDS:
        if not isinstance(value, list):
            raise ValueError(f"draft.{key} must be a list of layer numbers")
        return tuple(_whole(f"draft.{key}", v) for v in value)
    if key in _INT_DRAFT_FIELDS:
        return None if value is None and key == "exit_layer" else _whole(f"draft.{key}", value)
    if key == "mode" and not isinstance(value, str):
        raise ValueError("draft.mode must be a string")
    if key == "threshold" and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError("draft.threshold must be a number")
    return value


def _whole(name: str, value) -> int:
    whole = isinstance(value, int | float) and math.isfinite(value) and value == int(value)
    if isinstance(value, bool) or not whole:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def usage(stats: dict, completion_tokens: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=stats.get("prompt_tokens", 0),
        cached_prompt_tokens=stats.get("cached_prompt_tokens", 0),
        completion_tokens=completion_tokens,
        drafted_tokens=stats.get("drafted_tokens", 0),
        accepted_tokens=stats.get("accepted_tokens", 0),
        verify_steps=stats.get("steps", 0),
        draft_fallback=stats.get("draft_fallback", False),
        preemptions=stats.get("preemptions", 0),
    )


SUMMED_USAGE = ("completion_tokens", "drafted_tokens", "accepted_tokens", "verify_steps")


def summed_usage(usages: list[pb.Usage]) -> pb.Usage:
    """The usage of a request's choices (in choice order) together: what each produced,
    summed; its prompt, counted once; the rest as the first choice's."""
    whole = pb.Usage()
    if not usages:
        return whole
    whole.CopyFrom(usages[0])
    for name in SUMMED_USAGE:
        setattr(whole, name, sum(getattr(u, name) for u in usages))
    whole.prompt_tokens = max(u.prompt_tokens for u in usages)
    whole.cached_prompt_tokens = max(u.cached_prompt_tokens for u in usages)
    return whole


def draft_dict(cfg: DraftConfig) -> dict:
    """A config as plain JSON values, for `ModelInfo.default_draft`."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
