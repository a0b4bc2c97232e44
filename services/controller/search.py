"""Online search of a model's skip set, across the fleet, without extra traffic.

Each round proposes a few neighbours of the incumbent skip set (keep one or two of
its sublayers, drop half of it, drop one, add one, swap one) and early exits (an exit
at layer E is the skip set of every sublayer from E up: near the incumbent's exit if
it is one, else one in the upper half of the model). Replicas score them, and the
incumbent, teacher-forced on text they served (`services.serve.scoring`). When every
candidate has enough scored positions, or the round times out, each is ranked by
the speedup model with its agreement's lower confidence bound and its estimated
draft cost; the best is adopted only if that beats the incumbent's speedup at its
upper bound: a candidate must win with confidence, not by luck. The state is a
small JSON document in Redis, so a new leader resumes the search and `status`
shows its progress.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

from services.common.redis_schema import exit_key, exit_layer_of, parse_skip_key, skip_key

PER_ROUND = 6


@dataclass
class Search:
    incumbent: str
    round: int = 0
    candidates: list[str] = field(default_factory=list)
    started_at: float = 0.0
    stale_rounds: int = 0  # rounds since the last adoption
    adopted: list[dict] = field(default_factory=list)  # newest last, a few kept
    last: list[dict] = field(default_factory=list)  # the last round's ranking

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Search:
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def trial(self) -> list[str]:
        """What replicas should score: the incumbent and this round's candidates."""
        return [self.incumbent, *self.candidates]

    def next_round(self, num_layers: int, seed: int, exits: bool = True) -> None:
        """Propose this round's candidates; early exits only with `exits`."""
        self.round += 1
        self.started_at = time.time()
        rng = random.Random(seed + self.round)
        self.candidates = neighbours(self.incumbent, num_layers, rng, exits)

    def due(self, counts: dict[str, int], min_positions: int, timeout_s: float) -> bool:
        """Whether this round has its evidence (or has waited long enough)."""
        if not self.candidates:
            return True
        if time.time() - self.started_at > timeout_s:
            return True
        return all(counts.get(k, 0) >= min_positions for k in self.trial())

    def conclude(self, ranked: list[dict], min_positions: int) -> str | None:
        """Adopt the best candidate if it beats the incumbent with confidence; returns it.
        `ranked`: per key, its `low` and `high` speedup bounds and `n`."""
        self.last = ranked
        by_key = {r["key"]: r for r in ranked}
        inc = by_key.get(self.incumbent)
        rivals = [r for r in ranked if r["key"] != self.incumbent and r["n"] >= min_positions]
        if inc is None or inc["n"] < min_positions or not rivals:
            self.stale_rounds += 1
            return None
        best = max(rivals, key=lambda r: r["low"])
        if best["low"] <= inc["high"]:
            self.stale_rounds += 1
            return None
        self.adopted = [
            *self.adopted[-9:],
            {
                "round": self.round,
                "from": self.incumbent,
                "to": best["key"],
                "at": time.time(),
                "speedup_low": best["low"],
                "incumbent_high": inc["high"],
            },
        ]
        self.incumbent, self.stale_rounds = best["key"], 0
        return best["key"]


def neighbours(key: str, num_layers: int, rng: random.Random, exits: bool = True) -> list[str]:
    """Up to PER_ROUND skip sets near `key`, each valid (not empty, not everything)."""
    attn, mlp = parse_skip_key(key)
    chosen = [("a", i) for i in attn] + [("m", i) for i in mlp]
    every = [(kind, i) for kind in "am" for i in range(num_layers)]
    free = [s for s in every if s not in chosen]
    moves = []
    if len(chosen) > 3:  # big jumps: a poor start is left in one round, not ten
        moves += [rng.sample(chosen, n) for n in (1, 2)]
    if len(chosen) > 1:
        moves.append(rng.sample(chosen, len(chosen) // 2))
        moves += [[s for s in chosen if s != rng.choice(chosen)] for _ in range(2)]
    if free:
        moves.append([*chosen, rng.choice(free)])
        if chosen:
            drop = rng.choice(chosen)
            moves.append([s for s in chosen if s != drop] + [rng.choice(free)])
    out = []
    for move in moves:
        a = sorted({i for kind, i in move if kind == "a"})
        m = sorted({i for kind, i in move if kind == "m"})
        k = skip_key(a, m)
        if (a or m) and len(a) + len(m) < 2 * num_layers and k != key and k not in out:
            out.append(k)
    if not exits:
        return out[:PER_ROUND]
    tries = [exit_key(e, num_layers) for e in exit_moves(key, num_layers, rng)]
    tries = [k for k in tries if k != key and k not in out]
    return out[: PER_ROUND - len(tries)] + tries


def exit_moves(key: str, num_layers: int, rng: random.Random) -> list[int]:
    """Exit layers to try: near the incumbent's when it is an early exit (two steps of
    1 to 4 layers), else one in the model's upper half, where exits can agree at all."""
    current = exit_layer_of(key, num_layers)
    if current is None:
        return [rng.randrange(num_layers // 2, num_layers)] if num_layers > 2 else []
    steps = rng.sample((-4, -2, -1, 1, 2, 4), 2)
    return sorted({current + d for d in steps if 1 <= current + d < num_layers})
