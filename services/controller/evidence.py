"""What the fleet's telemetry says, per model: acceptance, costs, candidate scores.

Windows from every replica are summed per (config version, mode, batch bucket) and
draft position, so a decision about the current config uses only what was seen
under it, and so are layer-draft tokens by draft confidence. Costs are the replicas'
latest measurements, averaged. Candidate scores (teacher-forced agreement) do not
depend on the config that was running, so they are summed across versions.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class ModeStats:
    steps: int = 0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def add(self, steps: int, drafted: list[int], accepted: list[int]) -> None:
        self.steps += steps
        for mine, theirs in ((self.drafted, drafted), (self.accepted, accepted)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += int(n)

    def rates(self, min_drafted: int = 20) -> list[float]:
        """Acceptance per draft position given the tokens before it were accepted, as the
        speedup model multiplies them, as far as positions have enough drafts. The counts
        say how many drafts reached position i (`drafted[i]`) and how many had its token
        and all before accepted (`accepted[i]`); those that reached it with all before
        accepted are at most min(drafted[i], accepted[i - 1]), so the rates err low."""
        out = []
        for i, (d, a) in enumerate(zip(self.drafted, self.accepted, strict=False)):
            told = d if i == 0 else min(d, self.accepted[i - 1])
            if told < min_drafted:
                break
            out.append(a / told)
        return out

    @property
    def acceptance(self) -> float:
        d = sum(self.drafted)
        return sum(self.accepted) / d if d else 0.0


@dataclass
class ModelEvidence:
    """Everything learned about one model."""

    # (version, mode, bucket) -> counts
    modes: dict[tuple[int, str, int], ModeStats] = field(
        default_factory=lambda: defaultdict(ModeStats)
    )
    costs: dict[str, dict] = field(default_factory=dict)  # replica -> its latest costs
    scores: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    # (version, mode) -> ([tokens], [agreed]) per confidence bin of layer drafts
    confidence: dict[tuple[int, str], tuple[list[int], list[int]]] = field(default_factory=dict)
    windows: int = 0

    def add(self, window: dict) -> None:
        self.windows += 1
        version = int(window.get("version", 0))
        for name, row in (window.get("modes") or {}).items():
            mode, b = name.rsplit("/", 1)
            self.modes[(version, mode, int(b))].add(
                int(row.get("steps", 0)), row.get("drafted", []), row.get("accepted", [])
            )
        if window.get("costs"):
            self.costs[str(window.get("replica"))] = window["costs"]
        for key, (hits, n) in (window.get("scores") or {}).items():
            self.scores[key][0] += int(hits)
            self.scores[key][1] += int(n)
        for mode, (tokens, agreed) in (window.get("confidence") or {}).items():
            mine = self.confidence.setdefault(
                (version, mode), ([0] * len(tokens), [0] * len(tokens))
            )
            for total, new in zip(mine, (tokens, agreed), strict=True):
                for i, n in enumerate(new[: len(total)]):
                    total[i] += int(n)

    def stats(self, version: int, mode: str, b: int) -> ModeStats:
        return self.modes.get((version, mode, b), ModeStats())

    def steps(self, version: int, b: int) -> int:
        return sum(s.steps for (v, _, bb), s in self.modes.items() if v == version and bb == b)

    def buckets(self, version: int) -> list[int]:
        return sorted({b for (v, _, b) in self.modes if v == version})

    def cost(self, table: str, key: str) -> float | None:
        """The replicas' mean measured cost (seconds) of `table` at `key`."""
        values = [c[table][key] for c in self.costs.values() if key in c.get(table, {})]
        return sum(values) / len(values) if values else None

    def relative_costs(self, mode: str, b: int) -> tuple[float | None, float]:
        """(one draft pass, one more verified token per sequence) relative to a plain
        decode step at bucket `b`, as the engine's policy computes them; the draft cost
        is None where unmeasured."""
        decode = self.cost("decode", str(b))
        if not decode:
            return None, 0.02 * b
        draft = self.cost("draft_pass", f"{mode}/{b}")
        per_token = self.cost("per_token", str(b))
        return (
            None if draft is None else draft / decode,
            0.02 * b if per_token is None else per_token * b / decode,
        )

    def agreement(self, key: str, z: float = 0.0) -> tuple[float, int]:
        """(agreement, positions) of a skip set; z > 0 gives the lower Wilson bound,
        z < 0 the upper one."""
        hits, n = self.scores.get(key, (0, 0))
        return wilson(hits, n, z), n


Z = 1.64  # one-sided 95% confidence bounds


def wilson(hits: int, n: int, z: float) -> float:
    """The Wilson score bound of a binomial proportion: lower for z > 0, upper for z < 0."""
    if n == 0:
        return 0.0 if z >= 0 else 1.0
    p = hits / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = abs(z) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half) if z > 0 else min(1.0, centre + half) if z < 0 else p


def parse_window(fields: dict) -> dict | None:
    """A telemetry window from its stream entry; None when damaged."""
    try:
        window = json.loads(fields["window"])
        return window if isinstance(window, dict) and "model" in window else None
    except (KeyError, TypeError, ValueError):
        return None
