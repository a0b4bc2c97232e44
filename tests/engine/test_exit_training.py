"""The trained exit (`exit_adapter`, `exit_training`, `selfspec train-draft`): training
raises an exit's agreement with the full model above the untrained exit and repeats
exactly from its seed; a trained exit is loaded with its model and drafts exactly; one
trained on another model is refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from services.engine import Engine, SamplingParams, checkpoint, exit_adapter, exit_training

LAYER = 2  # of the tiny model's 4
STEPS = 300
PIECES = 200  # of 64 tokens; a tenth held out


def pieces(count: int, seed: int) -> list[list[int]]:
    """Token lists with some structure (runs of a few repeating phrases), as text has."""
    rng = random.Random(seed)
    phrases = [[rng.randrange(1, 500) for _ in range(rng.randrange(2, 6))] for _ in range(24)]
    out = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < 64:
            ids += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(1, 500)]
        out.append(ids[:64])
    return out


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    eng = Engine.from_pretrained(str(path), dtype="bfloat16", kv_cache_bytes=8 << 20)
    return eng, path, checkpoint.model_key(path)


@pytest.fixture(scope="module")
def text() -> list[list[int]]:
    return pieces(PIECES, 0)


@pytest.fixture(scope="module")
def trained(tiny, text) -> exit_adapter.ExitAdapter:
    eng, _, key = tiny
    return exit_training.train(eng, key, LAYER, steps=STEPS, pieces=text, quiet=True)


def test_training_raises_agreement_above_the_untrained_exit(trained):
    facts = trained.facts
    # Over 1,000 held-out positions, both exits read the same ones: 0.05 is a clear rise.
    assert facts["held_out_positions"] > 1000
    assert facts["agreement"] > facts["agreement_untrained"] + 0.05, facts
    assert facts["seed"] == 0 and facts["steps"] == STEPS
    assert facts["positions"] > 0 and facts["held_out_positions"] > 0
    assert facts["data_s"] >= 0 and facts["train_s"] > 0


def test_training_repeats_exactly_from_its_seed(tiny, text, trained):
    eng, _, key = tiny
    again = exit_training.train(eng, key, LAYER, steps=STEPS, pieces=text, quiet=True)
    for name in ("gain", "down", "up"):
        assert torch.equal(getattr(again, name), getattr(trained, name)), name
    other = exit_training.train(eng, key, LAYER, steps=STEPS, seed=1, pieces=text, quiet=True)
    assert not torch.equal(other.up, trained.up)


def test_the_head_trained_through_is_the_engines(tiny):
    """Training reads the model's final norm and LM head as one matrix (`Head`): it must
    give the logits the engine's own head gives."""
    eng, _, _ = tiny
    below, logits = eng.runner.forced_states(pieces(2, 5), eng.model.num_layers)
    torch.testing.assert_close(exit_training.Head(eng.model)(below.float()), logits)


def test_a_trained_exit_is_loaded_and_drafts_exactly(tiny, trained):
    _, path, _ = tiny
    trained.save(path / exit_adapter.FILE)
    try:
        eng = Engine.from_pretrained(str(path), dtype="bfloat16", kv_cache_bytes=8 << 20)
    finally:
        (path / exit_adapter.FILE).unlink()
    assert eng.runner.layer_drafter.exit.layer == LAYER
    assert eng.draft_config("early_exit").exit_layer == LAYER  # the mode's name alone
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [p[:16] for p in pieces(8, 7)]
    off = eng.generate(prompts, params, "off")
    with_exit = eng.generate(prompts, params, "early_exit")
    assert [o.token_ids for o in with_exit] == [o.token_ids for o in off]
    eng.runner.layer_drafter.exit = None
    plain = eng.generate(prompts, params, "early_exit")
    assert [o.token_ids for o in plain] == [o.token_ids for o in off]

    def accepted(outs):
        return [o.stats["accepted_tokens"] for o in outs]

    # The drafts went through the adapter. (Whether they are accepted more is a matter
    # of text: a random model's own output is nothing like what it was trained on here.)
    assert accepted(with_exit) != accepted(plain)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_an_exit_trained_on_another_model_is_refused(tiny, trained, tmp_path):
    _, path, _ = tiny
    elsewhere = tmp_path / exit_adapter.FILE
    trained.save(elsewhere)
    with pytest.raises(ValueError, match="another|not this one") as refused:
        exit_adapter.ExitAdapter.load(elsewhere, "0123456789ab")
    assert "selfspec train-draft" in str(refused.value)
    other = exit_training.train(
        Engine.from_pretrained(str(path), dtype="bfloat16", kv_cache_bytes=8 << 20),
        "0123456789ab",
        LAYER,
        steps=2,
        pieces=pieces(4, 0),
        quiet=True,
    )
    other.save(path / exit_adapter.FILE)
    try:
        with pytest.raises(ValueError, match="selfspec train-draft"):
            Engine.from_pretrained(str(path), dtype="bfloat16", kv_cache_bytes=8 << 20)
    finally:
        (path / exit_adapter.FILE).unlink()


def test_selfspec_train_draft_on_the_default_model(tmp_path):
    """The command end to end on the default model, on a small budget of local text."""
    out = tmp_path / "exit.safetensors"
    args = ["train-draft", "--model", "default", "--weights", "bf16", "--exit-layer", "8"]
    args += ["--steps", "20", "--answer-tokens", "8", "--text-tokens", "1024"]
    args += ["--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["steps"] == 20 and facts["positions"] > 1000
    # Two of the 24 answers are held out, and reported apart.
    assert 0 < facts["answer_positions"] < facts["held_out_positions"]
    assert 0 <= facts["agreement_answers"] <= 1 and 0 <= facts["agreement_answers_untrained"] <= 1
    assert "train-draft: training 20/20" in r.stderr and "agrees with the full model" in r.stderr
    assert "on its held-out answers" in r.stderr
    key = checkpoint.model_key(checkpoint.resolve("default"))
    adapter = exit_adapter.ExitAdapter.load(out, key)
    assert adapter.layer == 8 and adapter.facts == facts


def test_a_tenth_of_each_kind_of_text_is_held_out():
    train, held, answers = exit_training.held_out(124, 24, seed=0)
    assert sorted(train + held) == list(range(124))
    assert answers == 2 and all(i < 24 for i in held[:2]) and all(i >= 24 for i in held[2:])
    assert len(held) == 2 + 10
    assert exit_training.held_out(124, 24, seed=1)[1] != held  # drawn from the seed
    # Without answers, one group: the same draw as a shuffle of all the pieces.
    order = list(range(50))
    random.Random(3).shuffle(order)
    assert exit_training.held_out(50, 0, seed=3) == (order[:45], order[45:], 0)
