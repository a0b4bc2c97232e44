"""What the engine drafted and kept, per mode, batch bucket and draft position: the
figures a fleet controller reads, and the engine's metrics."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

from services.common.speedup import bucket

CONFIDENCE_BINS = 10  # a layer draft's top probability, in bins of 0.1


def confidence_bin(confidence: float) -> int:
    return min(max(int(confidence * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)


@dataclass
class Telemetry:
    """What the engine drafted and kept, per mode, batch bucket and draft position, and
    how often each mode was chosen: the figures a fleet controller reads.

    `confidence[mode]` is ([tokens], [agreed]) per confidence bin of greedy layer
    drafts: tokens whose fate verification told (those up to the first rejection), and
    those the full model agreed with. A token the draft dropped under its threshold
    counts too when everything before it was accepted, since the verification's next
    token says what the full model chose there; so a threshold can be judged from below
    as well as from above."""

    drafted: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    accepted: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    decisions: dict[tuple[str, int], int] = field(default_factory=dict)
    confidence: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
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

    def record_confidence(
        self,
        mode: str,
        confidence: list[float],
        accepted: int,
        dropped: tuple[int, float] | None,
        next_token: int,
    ) -> None:
        """One greedy layer draft's tokens by confidence, and whether each was accepted."""
        told = [(c, j < accepted) for j, c in enumerate(confidence[: accepted + 1])]
        if dropped is not None and accepted == len(confidence):
            told.append((dropped[1], dropped[0] == next_token))
        with self._lock:
            tokens, agreed = self.confidence.setdefault(
                mode, ([0] * CONFIDENCE_BINS, [0] * CONFIDENCE_BINS)
            )
            for c, ok in told:
                tokens[confidence_bin(c)] += 1
                agreed[confidence_bin(c)] += ok

    def snapshot(self) -> Telemetry:
        """A consistent copy of the running totals, for readers on other threads."""
        with self._lock:
            return Telemetry(
                copy.deepcopy(self.drafted),
                copy.deepcopy(self.accepted),
                dict(self.decisions),
                copy.deepcopy(self.confidence),
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
        for mode, (tokens, agreed) in self.confidence.items():
            old = earlier.confidence.get(mode, ([0] * CONFIDENCE_BINS, [0] * CONFIDENCE_BINS))
            delta = (
                [a - b for a, b in zip(tokens, old[0], strict=True)],
                [a - b for a, b in zip(agreed, old[1], strict=True)],
            )
            if any(delta[0]):
                window.confidence[mode] = delta
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
