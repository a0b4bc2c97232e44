"""A request's prompt as token ids: text, token ids or chat messages, checked against the
model's vocabulary and context before the request is queued."""

from __future__ import annotations

from services.common.params import SamplingParams

ROLES = ("system", "user", "assistant")


def encode(
    tokenizer,
    prompt: str | list[int] | list[dict],
    vocab_size: int,
    chat: bool = False,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Token ids of a prompt: text (wrapped as one user turn when `chat`), token ids, or
    chat messages (`{"role", "content"}` dicts, formatted with the chat template, under
    the two options of `apply_chat_template`)."""
    options = (add_generation_prompt, continue_final_message)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        if chat:
            turn = [{"role": "user", "content": prompt}]
            return encode(tokenizer, turn, vocab_size, False, *options)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    elif prompt and all(isinstance(m, dict) for m in prompt):
        ids = apply_chat_template(tokenizer, prompt, *options)
    else:
        ids = list(prompt)
    if not ids:
        raise ValueError("prompt is empty")
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
    return ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Messages formatted by the model's chat template, as vLLM does: opening the
    assistant's turn after them (`add_generation_prompt`), or leaving the last message,
    the assistant's, open for the model to continue (`continue_final_message`)."""
    if not has_chat_template(tokenizer):
        raise ValueError("this model has no chat template: send a prompt, not messages")
    for i, m in enumerate(messages):
        if set(m) != {"role", "content"} or not all(isinstance(v, str) for v in m.values()):
            raise ValueError(f"messages[{i}] must have string 'role' and 'content' only")
        if m["role"] not in ROLES:
            raise ValueError(
                f"messages[{i}].role must be system, user or assistant, not {m['role']!r}"
            )
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt exclude each other: "
                "set add_generation_prompt to false to continue the last message"
            )
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                "continue_final_message continues the last message, which must be the "
                f"assistant's, not the {messages[-1]['role']}'s"
            )
    ids = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tokenize=True,
    )
    # Newer tokenizers return a BatchEncoding here, older ones the list of ids.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def check_fits(prompt: list[int], params: SamplingParams, limit: int) -> None:
    """Refuse a request whose prompt and `max_tokens` exceed the model's context `limit`."""
    if len(prompt) >= limit:
        raise ValueError(f"prompt has {len(prompt)} tokens; the model's context is {limit}")
    if len(prompt) + params.max_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"model's context of {limit} tokens; "
            f"lower max_tokens to at most {limit - len(prompt)}"
        )
