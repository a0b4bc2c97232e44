"""One request's state as it moves through the engine."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import torch

from services.common.params import SEED_LIMIT, SamplingParams
from services.engine.detokenizer import OutputText
from services.engine.kv_pool import BlockTable
from services.engine.logprobs import TokenLogprob


@dataclass
class Stats:
    steps: int = 0  # full-model passes after the prompt
    drafted: int = 0
    accepted: int = 0
    cached_prompt_tokens: int = 0
    prompt_tokens: int = 0
    queue_seconds: float = 0.0  # from arrival to admission
    preemptions: int = 0  # times its KV was given up for others and recomputed
    draft_fallback: bool = False  # ran with the default drafting, over the configs cap

    def record(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "prompt_tokens": self.prompt_tokens,
            "queue_seconds": self.queue_seconds,
            "preemptions": self.preemptions,
            "draft_fallback": self.draft_fallback,
        }


class Sequence:
    """Prompt and output tokens, the KV blocks that hold them, and why it finished.

    The KV of every token but the newest is committed in `table`; the newest
    (`last`) is written by the next pass, which also yields its successor. `text`, when
    given, decodes the output as it grows and ends it at a stop string.
    """

    def __init__(
        self,
        seq_id: str,
        prompt: list[int],
        params: SamplingParams,
        table: BlockTable,
        *,
        text: OutputText | None = None,
        device: torch.device | str | None = None,
        index: int = 0,
    ):
        """`index`: which of the request's `params.n` choices this is."""
        self.id = seq_id
        self.index = index
        self.prompt = prompt
        self.output: list[int] = []
        # One per output token when the request asks for logprobs (logprobs.record).
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.params = params
        self.table = table
        # The draft model's KV (`drafting.draft_model`), made when it first drafts.
        self.draft_table: BlockTable | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it failed, when finish_reason is "error"
        self.text = text
        self.admitted = 0  # admission order, for choosing whom to preempt
        self.arrived = time.monotonic()
        self.stats = Stats(prompt_tokens=len(prompt))
        self.need = 0  # tokens of KV this sequence may ever hold
        self.generator: torch.Generator | None = None
        if not params.greedy:  # where the logits are (default: the KV pool's device)
            seed = None if params.seed is None else (params.seed + index) % SEED_LIMIT
            self.generator = seeded(seed, device or table.pool.kv[0].device)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def last(self) -> int:
        return self.output[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_target(self) -> int:
        """Tokens whose KV a prefill writes: the prompt, or after a preemption everything
        but the newest token, which the next step processes as usual."""
        return self.num_tokens - 1 if self.output else len(self.prompt)

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output)

    def draft_room(self, max_draft: int, max_positions: int) -> int:
        """How many tokens a step may draft: within max_tokens, less the one token every
        step adds, and within the model's context."""
        return max(0, min(max_draft, self.remaining - 1, max_positions - self.num_tokens))

    def append(self, tokens: list[int], eos_ids: frozenset[int]) -> int:
        """Add accepted tokens, stopping at the first stop token or string, or the length
        limit; returns how many were added."""
        stops = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stops |= eos_ids
        for n, t in enumerate(tokens, 1):
            self.output.append(t)
            if self.text is not None and self.text.add(t) or t in stops:
                self.finish("stop")
                return n
            if self.remaining == 0:
                self.finish("length")
                return n
        return len(tokens)

    def free_draft(self) -> None:
        """Let go of the draft model's KV, wherever `table` is let go of or given up: the
        draft catches up from the tokens when it next drafts."""
        if self.draft_table is not None:
            self.draft_table.free()
            self.draft_table = None

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        if self.text is not None:
            self.text.finish()


def seeded(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device`, since CUDA sampling takes a CUDA generator; without a seed
    an unpredictable one, drawn without touching PyTorch's global generator."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator
