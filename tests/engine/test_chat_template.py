"""The chat template's options, as vLLM takes them, and models that have no template."""

from __future__ import annotations

import copy

import pytest

from services.engine import prompts

TURNS = [{"role": "user", "content": "Name a colour."}]
PARTIAL = "The colour I pick is"


def test_continue_final_message_leaves_the_assistant_turn_open(engine):
    messages = [*TURNS, {"role": "assistant", "content": PARTIAL}]
    ids = engine.encode(messages, add_generation_prompt=False, continue_final_message=True)
    assert engine.tokenizer.decode(ids).endswith(PARTIAL)
    closed = engine.encode(messages, add_generation_prompt=False)
    assert len(closed) > len(ids) and closed[: len(ids)] == ids  # the end-of-turn follows
    assert not set(engine.eos_ids) & set(ids[-3:])


def test_add_generation_prompt_opens_the_assistant_turn(engine):
    opened = engine.encode(TURNS)
    bare = engine.encode(TURNS, add_generation_prompt=False)
    assert len(opened) > len(bare) and opened[: len(bare)] == bare
    assert engine.encode(TURNS[0]["content"], chat=True) == opened


@pytest.mark.parametrize(
    ("messages", "options", "words"),
    [
        ([*TURNS, {"role": "assistant", "content": PARTIAL}], {}, "add_generation_prompt"),
        (TURNS, {"add_generation_prompt": False}, "must be the assistant's"),
    ],
)
def test_contradictory_options_are_refused_by_name(engine, messages, options, words):
    with pytest.raises(ValueError, match=words):
        engine.encode(messages, continue_final_message=True, **options)


def test_a_model_without_a_chat_template_refuses_messages(engine):
    tokenizer = copy.copy(engine.tokenizer)
    tokenizer.chat_template = None
    message = "no chat template: send a prompt, not messages"
    for prompt, chat in [(TURNS, False), ("hi", True)]:
        with pytest.raises(ValueError, match=message):
            prompts.encode(tokenizer, prompt, engine.model.vocab_size, chat)
    assert prompts.encode(tokenizer, "hi", engine.model.vocab_size) == engine.encode("hi")
