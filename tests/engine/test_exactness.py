"""Drafting never changes greedy output: every mode equals drafting `off`, token for token."""

from __future__ import annotations

import pytest

from services.engine import DraftConfig, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Summarise: the meeting moved the launch to May because the supplier was late. "
    "The team will send weekly updates until the launch.",
    "List three uses of copper.",
    "Explain recursion to a ten year old.",
    "Translate 'good morning' into Spanish, French and German.",
    "hi",
    "Write a haiku about the sea, then explain its imagery line by line.",
]


def modes(num_layers: int) -> list[DraftConfig]:
    last = num_layers - 1
    return [
        DraftConfig(mode="skip", skip_attn=(1, last // 2), skip_mlp=(last // 2 + 1,), max_draft=4),
        DraftConfig(mode="skip", skip_attn=(0,), max_draft=3, shortlist=256, threshold=0.3),
        DraftConfig(mode="early_exit", exit_layer=num_layers // 2, max_draft=5),
        DraftConfig(mode="ngram", max_draft=4),
        DraftConfig(mode="auto", skip_attn=(1,), skip_mlp=(last // 2,), max_draft=4),
    ]


def test_default_model_batch_1(engine):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for prompt in PROMPTS[:3]:
        [base] = engine.generate([prompt], params, "off", chat=True)
        for cfg in modes(engine.model.num_layers):
            [out] = engine.generate([prompt], params, cfg, chat=True)
            assert out.token_ids == base.token_ids, (cfg, prompt)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_default_model_batch_8_matches_each_alone(engine):
    """Eight prompts of different lengths together, drafted, equal each prompt alone, off."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    alone = [engine.generate([p], params, "off", chat=True)[0].token_ids for p in PROMPTS]
    assert len({len(engine.encode(p, chat=True)) for p in PROMPTS}) == len(PROMPTS)
    for cfg in [DraftConfig(mode="off"), *modes(engine.model.num_layers)]:
        outs = engine.generate(PROMPTS, params, cfg, chat=True)
        assert [o.token_ids for o in outs] == alone, cfg
        if cfg.mode != "off":
            assert sum(o.stats["accepted_tokens"] for o in outs) > 0, cfg
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("batch", [1, 8])
def test_tiny_architectures(tiny, batch):
    kind, _, eng = tiny
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(5 + 9 * i)] for i in range(batch)]
    alone = [eng.generate([p], params, "off")[0].token_ids for p in prompts]
    for cfg in modes(eng.model.num_layers):
        outs = eng.generate(prompts, params, cfg)
        assert [o.token_ids for o in outs] == alone, (kind, cfg)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_bfloat16_drafting_equals_off(bf16_engine):
    """bfloat16 weights through the engine's kernels: each row of a product is computed the
    same whatever the number of rows, so drafting stays exact here too."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    alone = [bf16_engine.generate([p], params, "off", chat=True)[0].token_ids for p in PROMPTS]
    for cfg in modes(bf16_engine.model.num_layers):
        outs = bf16_engine.generate(PROMPTS, params, cfg, chat=True)
        assert [o.token_ids for o in outs] == alone, cfg
        [one] = bf16_engine.generate([PROMPTS[0]], params, cfg, chat=True)
        assert one.token_ids == alone[0], cfg
    assert bf16_engine.pool.num_free == bf16_engine.pool.num_blocks
