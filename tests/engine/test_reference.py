"""Our forward pass computes what `transformers` computes."""

from __future__ import annotations

import torch

from services.engine import SamplingParams

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


def test_logits_agree_on_tiny_architectures(tiny):
    kind, hf, eng = tiny
    ids = [(11 * j) % 500 + 1 for j in range(60)]  # longer than mistral's window of 40
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    from services.engine.kv_pool import BlockTable
    from services.engine.sequence import Sequence

    seq = Sequence("t", ids, SamplingParams(), BlockTable(eng.pool))
    try:
        ours = eng.runner.prefill(seq, chunk=len(ids), all_logits=True)
    finally:
        seq.table.free()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
