"""End to end on a GPU: the engine's greedy output with drafting on equals drafting off,
token for token, with attention and KV writes on the Triton kernels."""

from __future__ import annotations

import pytest
import torch

from services.engine import DraftConfig, Engine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "List three uses of copper.",
    "hi",
]


@pytest.fixture(scope="module")
def cuda_engine() -> Engine:
    return Engine.from_pretrained("default", dtype="bfloat16", device="cuda")


def _drafts(num_layers: int) -> list[DraftConfig]:
    last = num_layers - 1
    return [
        DraftConfig(mode="skip", skip_attn=(1, last // 2), skip_mlp=(last // 2 + 1,), max_draft=4),
        DraftConfig(mode="early_exit", exit_layer=num_layers // 2, max_draft=5),
        DraftConfig(mode="ngram", max_draft=4),
    ]


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_drafting_on_equals_off(cuda_engine: Engine, batch: int) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = PROMPTS[:batch]
    off = [o.token_ids for o in cuda_engine.generate(prompts, params, "off", chat=True)]
    for cfg in _drafts(cuda_engine.model.num_layers):
        outs = cuda_engine.generate(prompts, params, cfg, chat=True)
        assert [o.token_ids for o in outs] == off, cfg
