"""KV taken as sequences grow: a pool too small for everyone preempts and recomputes."""

from __future__ import annotations

import pytest
from engine_helpers import EIGHT_CHATS as PROMPTS
from engine_helpers import Case, assert_no_blocks_held, run_together

from services.engine import DraftConfig, Engine, SamplingParams

TOKENS = 40  # long against the prompts, so that sequences outgrow what admitted them
PARAMS = SamplingParams(max_tokens=TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def small(bf16_engine) -> Engine:
    """The default model as served (bfloat16) with a pool that holds about three of these
    sequences."""
    longest = max(len(bf16_engine.encode(p, chat=True)) for p in PROMPTS) + TOKENS + 5
    blocks = 3 * -(-longest // 16)
    kv = bf16_engine.pool.kv[0]
    per_block = kv[:16].numel() * kv.element_size() * bf16_engine.model.num_layers
    return Engine.from_pretrained("default", dtype="bfloat16", kv_cache_bytes=blocks * per_block)


@pytest.fixture(scope="module")
def alone(small) -> list[list[int]]:
    """Each prompt served by itself, without drafting: the reference."""
    return [run_together(small, [Case(p, PARAMS, "off")])[0].output for p in PROMPTS]


@pytest.mark.parametrize(
    "draft", ["off", DraftConfig(mode="skip", skip_attn=(1, 14), max_draft=4)], ids=str
)
def test_eight_sequences_in_a_pool_for_three(small, alone, draft):
    together = run_together(small, [Case(p, PARAMS, draft) for p in PROMPTS])
    assert [s.output for s in together] == alone
    assert sum(s.stats.preemptions for s in together) > 0
    assert all(s.finish_reason == "length" for s in together)
    assert_no_blocks_held(small)
