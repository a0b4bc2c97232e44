"""Per-token logprobs: the full model's, whatever was drafted, aligned with the output.

Measured (greedy, logprobs=5, every drafting mode against `off`, default model): the
logprobs and top ids of drafted runs are bit-identical to `off`'s on `cpu` bfloat16,
`cpu` gguf and `onednn` float32, and on the tiny Llama on `torch` bfloat16 and `triton`
float32: the verification rows are computed by row-invariant kernels, as `off`'s single
rows are. So equal means equal here. A teacher-forced pass run as a verification runs
(`bulk=False`) is bit-identical too (measured 0.0 in `off`, `skip` and `ngram`, sampled);
the many-row products of a bulk pass differ by up to 1.7e-5 and are not what we test.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import FreeDrafts
from test_exactness import modes

from services.engine import DraftConfig, Engine, SamplingParams

PROMPTS = ["What is the capital of France?", "List three uses of copper."]


@pytest.fixture(scope="module")
def eng(engine) -> Engine:
    """The default model, with `auto` drafting on any machine however fast."""
    costs, engine.drafting.policy.costs = engine.drafting.policy.costs, FreeDrafts()
    yield engine
    engine.drafting.policy.costs = costs


def drafted(eng: Engine) -> list[DraftConfig]:
    return [DraftConfig(mode="off"), *modes(eng.model.num_layers)]


@pytest.mark.parametrize("stop", [(), (" is",)])
def test_drafted_logprobs_equal_off(eng, stop):
    """EOS live, and a stop string that ends the output inside a draft."""
    params = SamplingParams(max_tokens=16, logprobs=5, stop=stop)
    for prompt in PROMPTS[:1]:
        [base] = eng.generate([prompt], params, "off", chat=True)
        for cfg in drafted(eng):
            [out] = eng.generate([prompt], params, cfg, chat=True)
            assert out.token_ids == base.token_ids, cfg
            assert len(out.logprobs) == len(out.token_ids), cfg
            for got, want in zip(out.logprobs, base.logprobs, strict=True):
                assert got.logprob == want.logprob, cfg
                assert got.top == want.top, cfg
    assert eng.pool.num_free == eng.pool.num_blocks


def test_greedy_tokens_are_the_top_alternative(eng):
    params = SamplingParams(max_tokens=16, logprobs=5, ignore_eos=True)
    [out] = eng.generate(PROMPTS[:1], params, "ngram", chat=True)
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert len(lp.top) == 5
        assert lp.top[0] == (token, lp.logprob)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.logprob <= 0


@pytest.mark.parametrize("mode", ["off", "skip"])
def test_sampled_logprobs_are_the_models(eng, mode):
    """Sampled tokens carry the raw model's logprobs (before temperature, top-p and min-p),
    as a teacher-forced pass over prompt and output gives them."""
    params = SamplingParams(
        max_tokens=16, temperature=1.3, top_p=0.9, min_p=0.05, seed=3, logprobs=2
    )
    [out] = eng.generate(PROMPTS[:1], params, mode, chat=True)
    prompt = eng.encode(PROMPTS[0], chat=True)
    tokens = prompt + out.token_ids
    [logits] = eng.runner.forced([tokens], start=[len(prompt) - 1], bulk=False)
    forced = torch.log_softmax(logits[:-1].float(), -1)
    want = forced.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    assert torch.equal(got, want), (got - want).abs().max()
    assert [[i for i, _ in lp.top] for lp in out.logprobs] == forced.topk(2).indices.tolist()


def test_logprobs_zero_gives_no_alternatives_and_none_gives_none(eng):
    [zero] = eng.generate(PROMPTS[:1], SamplingParams(max_tokens=6, logprobs=0), "ngram")
    assert len(zero.logprobs) == len(zero.token_ids)
    assert all(lp.top == [] for lp in zero.logprobs)
    [none] = eng.generate(PROMPTS[:1], SamplingParams(max_tokens=6), "ngram")
    assert none.logprobs is None


def test_streamed_deltas_carry_their_tokens_logprobs(eng):
    params = SamplingParams(max_tokens=20, logprobs=1, ignore_eos=True)
    [whole] = eng.generate(PROMPTS[1:], params, "ngram", chat=True)

    async def stream():
        deltas = []
        async for delta in eng.submit(PROMPTS[1], params, "ngram", chat=True):
            assert len(delta.logprobs) == len(delta.token_ids)
            deltas.append(delta)
        return deltas

    deltas = asyncio.run(stream())
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert [lp for d in deltas for lp in d.logprobs] == whole.logprobs
    eng.shutdown()  # back to stepping on the caller's thread, as the other tests expect
