"""The `auto` drafting policy: per sequence and step, the draft expected to pay most.

Expected gain of drafting k tokens in a mode: the tokens a verification yields,
1 + a1 + a1*a2 + ... (a_i: the sequence's running acceptance at draft position
i in that mode), divided by the step's cost, k draft passes plus a
verification of k + 1 tokens, in units of one plain decode step at the current
batch size. Costs are measured as the engine runs. Where nothing beats 1
(plain decoding), as at large batches where verification stops being nearly
free, the sequence drafts nothing.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PRIOR_ACCEPT = {"ngram": (1.0, 2.0), "skip": (3.0, 2.0), "early_exit": (1.0, 2.0)}
DECAY = 0.9  # older acceptance counts fade, so a sequence's changing text is followed


def bucket(batch: int) -> int:
    return next((b for b in BUCKETS if batch <= b), BUCKETS[-1])


@dataclass
class Acceptance:
    """Running (accepted, drafted) counts per draft position, with a prior."""

    prior: tuple[float, float]
    counts: list[list[float]] = field(default_factory=list)

    def rate(self, i: int) -> float:
        a, n = self.prior
        if i < len(self.counts):
            a, n = a + self.counts[i][0], n + self.counts[i][1]
        return a / n

    def update(self, drafted: int, accepted: int) -> None:
        while len(self.counts) < drafted:
            self.counts.append([0.0, 0.0])
        for i in range(drafted):
            c = self.counts[i]
            c[0] = c[0] * DECAY + (1.0 if i < accepted else 0.0)
            c[1] = c[1] * DECAY + 1.0


@dataclass
class Costs:
    """Measured step costs per batch bucket, as exponential moving averages (seconds)."""

    decode: dict[int, float] = field(default_factory=dict)  # verify with no drafts
    per_token: dict[int, float] = field(default_factory=dict)  # each extra verified token
    draft_pass: dict[tuple[str, int], float] = field(default_factory=dict)

    @staticmethod
    def _ema(table: dict, key, value: float, weight: float = 0.2) -> None:
        old = table.get(key)
        table[key] = value if old is None else old + weight * (value - old)

    def observe_verify(self, batch: int, tokens: int, seconds: float) -> None:
        b = bucket(batch)
        if tokens == batch:
            self._ema(self.decode, b, seconds)
        elif b in self.decode:
            self._ema(self.per_token, b, max(0.0, seconds - self.decode[b]) / (tokens - batch))

    def observe_draft(self, mode: str, batch: int, seconds_per_pass: float) -> None:
        self._ema(self.draft_pass, (mode, bucket(batch)), seconds_per_pass)

    def snapshot(self) -> dict:
        """The measured costs as plain data (seconds), for the fleet's telemetry; copied
        with retries because the engine's thread may add a key meanwhile."""
        for _ in range(5):
            try:
                return {
                    "decode": {str(b): v for b, v in list(self.decode.items())},
                    "per_token": {str(b): v for b, v in list(self.per_token.items())},
                    "draft_pass": {f"{m}/{b}": v for (m, b), v in list(self.draft_pass.items())},
                }
            except RuntimeError:  # a dict changed size while copied
                continue
        return {"decode": {}, "per_token": {}, "draft_pass": {}}

    def relative(self, mode: str, batch: int, prior_draft: float) -> tuple[float, float]:
        """(one draft pass, one more verified token for every sequence), relative to a plain
        decode step at this batch size. Unmeasured costs take optimistic priors, so the
        policy drafts and so measures them."""
        b = bucket(batch)
        decode = self.decode.get(b)
        if not decode:
            return prior_draft, 0.02 * b
        draft = self.draft_pass.get((mode, b))
        draft = prior_draft if draft is None else draft / decode
        per_token = self.per_token.get(b)
        return draft, (0.02 * b if per_token is None else per_token * b / decode)


def best_length(rates: list[float], draft_cost: float, token_cost: float) -> tuple[float, int]:
    """(expected speedup, k) for k = 0..len(rates), k = 0 being plain decoding (speedup 1):
    tokens per verification over the step's cost, both relative to plain decoding."""
    best, tokens, survive = (1.0, 0), 1.0, 1.0
    for k, a in enumerate(rates, start=1):
        survive *= a
        tokens += survive
        best = max(best, (tokens / (1.0 + k * (draft_cost + token_cost)), k))
    return best


@dataclass
class Telemetry:
    """What the engine drafted and kept, per mode, batch bucket and draft position, and
    how often each mode was chosen: the figures a fleet controller reads."""

    drafted: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    accepted: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    decisions: dict[tuple[str, int], int] = field(default_factory=dict)
    # Readers on other threads (the fleet link) copy under it; the engine never waits long.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, mode: str, batch: int, drafted: int, accepted: int) -> None:
        key = (mode if drafted else "off", bucket(batch))
        with self._lock:
            self.decisions[key] = self.decisions.get(key, 0) + 1
            for table, n in ((self.drafted, drafted), (self.accepted, accepted)):
                counts = table.setdefault(key, [])
                counts.extend([0] * (n - len(counts)))
                for i in range(n):
                    counts[i] += 1

    def snapshot(self) -> Telemetry:
        """A consistent copy of the running totals, for readers on other threads."""
        with self._lock:
            return Telemetry(
                copy.deepcopy(self.drafted), copy.deepcopy(self.accepted), dict(self.decisions)
            )

    def since(self, earlier: Telemetry) -> Telemetry:
        """The counts added after `earlier` (a snapshot): one telemetry window."""
        window = Telemetry()
        for key, steps in self.decisions.items():
            window.decisions[key] = steps - earlier.decisions.get(key, 0)
        for name in ("drafted", "accepted"):
            mine, old = getattr(self, name), getattr(earlier, name)
            for key, counts in mine.items():
                before = old.get(key, [])
                getattr(window, name)[key] = [
                    c - (before[i] if i < len(before) else 0) for i, c in enumerate(counts)
                ]
        window.decisions = {k: v for k, v in window.decisions.items() if v}
        return window

    def as_dict(self) -> dict:
        return {
            f"{mode}/b{b}": {
                "steps": self.decisions.get((mode, b), 0),
                "drafted_per_position": self.drafted.get((mode, b), []),
                "accepted_per_position": self.accepted.get((mode, b), []),
            }
            for mode, b in sorted(self.decisions)
        }
