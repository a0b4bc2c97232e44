"""Our forward pass computes what `transformers` computes."""

from __future__ import annotations

import pytest
import torch
from backend_cases import backend_params

from services.engine import Engine, SamplingParams
from services.engine.kv_pool import BlockTable
from services.engine.sequence import Sequence

PROMPTS = [
    "What is the capital of France?",
    "Name a colour.",
    "Write a short poem about autumn leaves.",
    "Give me two tips for learning a new language.",
]


def test_greedy_equals_transformers_generate(engine):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32)
    for prompt in PROMPTS:
        ids = engine.encode(prompt, chat=True)
        # Both stop at the end-of-sequence token, which both include.
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        ref = ref[0, len(ids) :].tolist()
        [out] = engine.generate([ids], SamplingParams(max_tokens=24), "off")
        assert out.token_ids == ref, prompt


def prefill_logits(eng: Engine, ids: list[int]) -> torch.Tensor:
    """The logits at every position of `ids`, from one prefill by `eng`."""
    seq = Sequence("t", ids, SamplingParams(), BlockTable(eng.pool))
    try:
        return eng.runner.prefill(seq, chunk=len(ids), all_logits=True)
    finally:
        seq.table.free()


def test_logits_agree_on_tiny_architectures(tiny):
    kind, hf, eng = tiny
    ids = [(11 * j) % 500 + 1 for j in range(60)]  # longer than mistral's window of 40
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = prefill_logits(eng, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("which", backend_params(("bfloat16",), ("cpu", "onednn", "torch")))
def test_bfloat16_stays_as_close_to_float32_as_transformers_does(which):
    """bfloat16 cannot equal float32, nor another implementation's bfloat16 bit for bit:
    on each CPU backend our bfloat16 pass over the default model must stray from
    `transformers`' float32 logits no further than `transformers`' own bfloat16 pass does
    (within 1.5 times), and pick the same top token at nearly every position."""
    from transformers import AutoModelForCausalLM

    name, dtype = which
    eng = Engine.from_pretrained("default", dtype=dtype, backend=name, kv_cache_bytes=16 << 20)
    ids = eng.encode(PROMPTS[2], chat=True) + eng.encode(PROMPTS[3], chat=True)
    hf = AutoModelForCausalLM.from_pretrained(eng.model_path, dtype=torch.float32)
    with torch.no_grad():
        exact = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
        theirs = hf.to(torch.bfloat16)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    ours = prefill_logits(eng, ids).float().log_softmax(-1)

    def stray(logprobs: torch.Tensor) -> float:
        return (logprobs - exact).abs().mean().item()

    assert stray(ours) <= 1.5 * stray(theirs), (stray(ours), stray(theirs))
    same_top = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert same_top >= 0.9, same_top
