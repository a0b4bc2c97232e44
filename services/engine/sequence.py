"""One request's state as it moves through the engine."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import torch

from services.engine.kv_pool import BlockTable
from services.engine.params import SamplingParams
from services.engine.policy import PRIOR_ACCEPT, Acceptance


@dataclass
class Stats:
    steps: int = 0  # full-model passes after the prompt
    drafted: int = 0
    accepted: int = 0
    cached_prompt_tokens: int = 0
    prompt_tokens: int = 0
    queue_seconds: float = 0.0  # from arrival to admission

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
        }


class Sequence:
    """Prompt and output tokens, the KV blocks that hold them, and why it finished.

    The KV of every token but the newest is committed in `table`; the newest
    (`last`) is written by the next pass, which also yields its successor.
    """

    def __init__(
        self,
        seq_id: str,
        prompt: list[int],
        params: SamplingParams,
        table: BlockTable,
        *,
        device: torch.device | str | None = None,
    ):
        self.id = seq_id
        self.prompt = prompt
        self.output: list[int] = []
        self.params = params
        self.table = table
        self.finish_reason: str | None = None
        self.arrived = time.monotonic()
        self.stats = Stats(prompt_tokens=len(prompt))
        self.need = 0  # tokens of KV this sequence may ever hold, reserved at admission
        self.text_end: int | None = None  # where a stop string begins in the output text
        self._acceptance: dict[str, Acceptance] = {}
        self.generator: torch.Generator | None = None
        if not params.greedy:  # where the logits are (default: the KV pool's device)
            self.generator = seeded(params.seed, device or table.pool.kv[0].device)

    def acceptance(self, mode: str) -> Acceptance:
        """This sequence's running acceptance per draft position in `mode`."""
        if mode not in self._acceptance:
            self._acceptance[mode] = Acceptance(PRIOR_ACCEPT.get(mode, (1.0, 2.0)))
        return self._acceptance[mode]

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
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output)

    def append(self, tokens: list[int], eos_ids: frozenset[int]) -> None:
        """Add accepted tokens, stopping at the first end of sequence or the length limit."""
        stops = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stops |= eos_ids
        for t in tokens:
            self.output.append(t)
            if t in stops:
                self.finish_reason = "stop"
                return
            if self.remaining == 0:
                self.finish_reason = "length"
                return


def seeded(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device`, since CUDA sampling takes a CUDA generator; without a seed
    an unpredictable one, drawn without touching PyTorch's global generator."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator
