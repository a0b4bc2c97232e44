"""Drafting never changes greedy output: every mode equals drafting `off`, token for token.
The early exit goes through an exit adapter (`random_exit`), as a trained one would."""

from __future__ import annotations

import pytest
from backend_cases import backend_params
from engine_helpers import FreeDrafts, random_exit

from services.engine import DraftConfig, Engine, SamplingParams

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
        # At the middle layer, through the engine's exit adapter (`random_exit`).
        DraftConfig(mode="early_exit", max_draft=5),
        DraftConfig(mode="ngram", max_draft=4),
        DraftConfig(mode="auto", skip_attn=(1,), skip_mlp=(last // 2,), max_draft=4),
    ]


# The default model on every CPU backend (Triton's interpreter is too slow for it: the
# tiny models below cover that backend). `onednn` and `torch` run few-row passes a row
# at a time, slowly: PyTorch's bfloat16 path gets one prompt, the fast ones the suite.
# `gguf`: the `cpu` backend on the GGUF's own quantized blocks.
FAST = backend_params(("bfloat16", "gguf"), ("cpu",)) + backend_params(("float32",), ("onednn",))
SLOW = backend_params(("bfloat16",), ("torch",))  # the rest run on the tiny model below


def _default(which) -> Engine:
    name, dtype = which
    kinds = {"weights": "gguf"} if dtype == "gguf" else {"dtype": dtype}
    eng = Engine.from_pretrained("default", backend=name, kv_cache_bytes=64 << 20, **kinds)
    eng.drafting.policy.costs = FreeDrafts()  # `auto` drafts on every machine, however fast it is
    return eng


@pytest.fixture(scope="module", params=FAST)
def fast_engine(request) -> Engine:
    return _default(request.param)


def _modes_on(eng: Engine) -> list[DraftConfig]:
    """Every mode, on a backend with fast few-row products. One that runs them a row at a
    time (oneDNN: minutes a run on this model) gets `auto`, which drafts n-grams, skipped
    layers and both in one run, and leaves the modes one by one to the tiny models."""
    every = modes(eng.model.num_layers)
    return every[-1:] if eng.model.backend.rowwise else every


def test_default_model_batch_1(fast_engine):
    _prompts_drafted_equal_off(fast_engine, PROMPTS[:3], max_tokens=24)


@pytest.mark.parametrize("which", SLOW)
def test_default_model_batch_1_row_by_row(which):
    _prompts_drafted_equal_off(_default(which), PROMPTS[:1], max_tokens=8)


def _prompts_drafted_equal_off(eng: Engine, prompts: list[str], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for prompt in prompts:
        [base] = eng.generate([prompt], params, "off", chat=True)
        with random_exit(eng):
            for cfg in _modes_on(eng):
                [out] = eng.generate([prompt], params, cfg, chat=True)
                assert out.token_ids == base.token_ids, (cfg, prompt)
    assert eng.pool.num_free == eng.pool.num_blocks


@pytest.mark.timeout(1200)  # onednn prefills short prompts a row at a time: minutes
def test_default_model_batch_8_matches_each_alone(fast_engine):
    """Eight prompts of different lengths together, drafted, equal each prompt alone, off."""
    eng = fast_engine
    # A row-at-a-time backend runs each of a batch's rows alone: fewer tokens keep it to
    # a minute, and still take every kind of draft.
    params = SamplingParams(max_tokens=8 if eng.model.backend.rowwise else 20, ignore_eos=True)
    alone = [eng.generate([p], params, "off", chat=True)[0].token_ids for p in PROMPTS]
    assert len({len(eng.encode(p, chat=True)) for p in PROMPTS}) == len(PROMPTS)
    with random_exit(eng):
        for cfg in [DraftConfig(mode="off"), *_modes_on(eng)]:
            outs = eng.generate(PROMPTS, params, cfg, chat=True)
            assert [o.token_ids for o in outs] == alone, cfg
            if cfg.mode != "off":
                assert sum(o.stats["accepted_tokens"] for o in outs) > 0, cfg
    assert eng.pool.num_free == eng.pool.num_blocks


@pytest.mark.parametrize("batch", [1, 8])
def test_tiny_architectures(tiny, batch):
    kind, _, eng = tiny
    _drafting_equals_off(eng, batch, max_tokens=24)


# Triton's interpreter costs about a millisecond per operation of a program: here it runs
# float32 only (its products are float32 under the interpreter anyway); CUDA runs both in
# `make gpu-check`.
TINY_BACKENDS = backend_params(("bfloat16", "float32"), ("cpu", "onednn", "torch"))
TINY_BACKENDS += backend_params(("float32",), ("triton",))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("which", TINY_BACKENDS)
def test_every_backend_drafts_exactly(which, batch, tiny_checkpoint):
    """Forcing each backend this machine can run: greedy output of every drafting mode
    equals `off`, on a tiny random Llama (Triton through its interpreter on a CPU)."""
    name, dtype = which
    path = tiny_checkpoint("llama")
    eng = Engine.from_pretrained(str(path), dtype=dtype, backend=name, kv_cache_bytes=8 << 20)
    assert eng.model.backend.name == name
    _drafting_equals_off(eng, batch, max_tokens=5 if name == "triton" else 20)


def _drafting_equals_off(eng: Engine, batch: int, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(5 + 9 * i)] for i in range(batch)]
    alone = [eng.generate([p], params, "off")[0].token_ids for p in prompts]
    eng.drafting.policy.costs = FreeDrafts()
    with random_exit(eng):
        for cfg in modes(eng.model.num_layers):
            outs = eng.generate(prompts, params, cfg)
            assert [o.token_ids for o in outs] == alone, cfg
    assert eng.pool.num_free == eng.pool.num_blocks
