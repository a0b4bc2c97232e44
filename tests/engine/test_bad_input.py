"""Bad requests get a ValueError that says what is allowed, and leave nothing allocated."""

from __future__ import annotations

import pytest

from services.engine import DraftConfig, ModelLoadError, SamplingParams
from services.engine.engine import Engine


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_sampling_params_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "warp"}, "mode"),
        ({"max_draft": 0}, "max_draft"),
        ({"max_draft": 1000}, "max_draft"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_draft_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DraftConfig(**kwargs)


def draft_errors(num_layers):
    return [
        (DraftConfig(mode="skip", skip_attn=(num_layers,)), "layers"),
        (DraftConfig(mode="skip", skip_mlp=(-1,)), "layers"),
        (
            DraftConfig(
                mode="skip", skip_attn=tuple(range(num_layers)), skip_mlp=tuple(range(num_layers))
            ),
            "every sublayer",
        ),
        (DraftConfig(mode="early_exit", exit_layer=num_layers), "exit_layer"),
    ]  # a mode alone (no layers) drafts: test_draft_configs.py


def test_engine_refuses_bad_requests_and_keeps_no_blocks(engine):
    free = engine.pool.num_free
    context = engine.model.max_positions
    ok = SamplingParams(max_tokens=4)
    cases = [
        (([""], ok, "off"), "empty"),
        (([[]], ok, "off"), "empty"),
        (([[1] * context], ok, "off"), "context"),
        (([[1, 2, 3]], SamplingParams(max_tokens=context), "off"), "max_tokens"),
        (([[engine.model.vocab_size]], ok, "off"), "token ids"),
        (([], ok, "off"), "no prompts"),
        ((["hi"], ok, {"bogus": 1}), "unknown draft"),
    ]
    cases += [((["hi"], ok, cfg), msg) for cfg, msg in draft_errors(engine.model.num_layers)]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(*args)
        assert engine.pool.num_free == free


def test_a_request_that_can_never_fit_is_refused_and_a_big_batch_waits(engine):
    small = Engine(engine.model, engine.tokenizer, engine.model_path, kv_cache_bytes=6 << 20)
    capacity = small.pool.num_blocks * small.pool.block_size
    with pytest.raises(ValueError, match="lower max_tokens"):
        small.generate(["hello"], SamplingParams(max_tokens=capacity))
    outs = small.generate([[1, 2, 3]] * 8, SamplingParams(max_tokens=20, ignore_eos=True), "off")
    assert len({tuple(o.token_ids) for o in outs}) == 1 and len(outs[0].token_ids) == 20
    assert small.pool.num_free == small.pool.num_blocks


def test_model_paths_are_checked(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine.from_pretrained(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="gguf"):
        Engine.from_pretrained(str(tmp_path / "notes.txt"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not supported"):
        Engine.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        Engine.from_pretrained("default", dtype="int3")
