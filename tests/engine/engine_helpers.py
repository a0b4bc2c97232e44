"""Running many requests at once, each with its own settings, on a real engine."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field, replace

import torch

from services.engine import Engine, SamplingParams, exit_adapter
from services.engine.drafting.costs import Costs
from services.engine.sequence import Sequence

# Eight short chat prompts of different lengths, for batches.
EIGHT_CHATS = [
    "What is the capital of France?",
    "List three uses of copper.",
    "Explain recursion to a ten year old.",
    "hi",
    "Name a prime number above ten.",
    "Write a haiku about the sea.",
    "What colour is the sky on Mars?",
    "Say OK.",
]


@dataclass
class Case:
    prompt: str | list[int]
    params: SamplingParams
    draft: object = None
    session_id: str | None = None
    request_id: str | None = None
    chat: bool = True
    kwargs: dict = field(default_factory=dict)


def run_together(eng: Engine, cases: list[Case]) -> list[Sequence]:
    """Queue every case, then step the engine until all have finished."""
    seqs = [
        eng.add_request(
            c.prompt,
            c.params,
            c.draft,
            chat=c.chat,
            session_id=c.session_id,
            request_id=c.request_id,
        )
        for c in cases
    ]
    while not all(s.finished for s in seqs):
        eng.step_once()
    return seqs


def stream_together(eng: Engine, cases: list[Case]) -> list[tuple[str, list[int], str]]:
    """Stream every case at once through `Engine.submit`: (text, token ids, finish reason),
    each joined from the deltas."""

    async def one(c: Case):
        text, ids, reason = "", [], None
        async for delta in eng.submit(
            c.prompt, c.params, c.draft, chat=c.chat, session_id=c.session_id
        ):
            text, ids, reason = text + delta.text, ids + delta.token_ids, delta.finish_reason
        return text, ids, reason

    async def all_of():
        return await asyncio.gather(*(one(c) for c in cases))

    return asyncio.run(all_of())


def assert_no_blocks_held(eng: Engine) -> None:
    """Nothing queued or running, and every block back in the pool once sessions go."""
    assert not eng.scheduler.has_work, eng.stats()
    eng.scheduler.clear_sessions()
    assert eng.pool.num_free == eng.pool.num_blocks


class FreeDrafts(Costs):
    """Costs for which drafting is free: `auto` then drafts as far as it may and chooses
    its mode by acceptance alone, the same on every run and every machine (not by how long
    a pass took here), and its layer drafts are long enough for every mistake to show."""

    def relative(self, mode: str, batch: int, prior_draft: float) -> tuple[float, float]:
        return 0.0, 0.0

    def extra_costs(self, batch: int, length: int) -> list[float]:
        return [0.0] * length


@contextlib.contextmanager
def random_exit(eng: Engine, seed: int = 0):
    """The engine with a random exit adapter (not the identity) at its middle layer, the
    layer the mode name `early_exit` then exits at: exactness cannot depend on what an
    adapter has learnt, and a random one changes which tokens are drafted."""
    d = eng.model.config.hidden_size
    adapter = exit_adapter.initial(eng.model.num_layers // 2, "test", d, 2 * d, seed)
    up = torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    drafter = eng.runner.layer_drafter
    before, drafter.exit = drafter.exit, replace(adapter, up=up)
    try:
        yield drafter.exit
    finally:
        drafter.exit = before
