"""The `auto` drafting policy: per sequence and step, the draft expected to pay most.

Expected gain of drafting k tokens in a mode: the tokens a verification yields,
1 + a1 + a1*a2 + ... (a_i: the sequence's running acceptance at draft position
i in that mode), divided by the step's cost, k draft passes plus a
verification of k + 1 tokens, in units of one plain decode step at the current
batch size. An n-gram proposal shorter than the room left may be continued by the
layer draft (`ngram+skip`): n-gram acceptance and no draft cost for its tokens, the
layer draft's for the rest. Costs are measured as the engine runs. Where nothing
beats 1 (plain decoding), as at large batches where verification stops being nearly
free, the sequence drafts nothing.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LAYER_MODES = ("skip", "early_exit")
CONFIDENCE_BINS = 10  # a layer draft's top probability, in bins of 0.1
# Optimistic for the skip draft (0.8), so that it is tried and measured; still a probability.
PRIOR_ACCEPT = {"ngram": (1.0, 2.0), "skip": (1.6, 2.0), "early_exit": (1.0, 2.0)}
DECAY = 0.9  # older acceptance counts fade, so a sequence's changing text is followed


def bucket(batch: int) -> int:
    return next((b for b in BUCKETS if batch <= b), BUCKETS[-1])


def confidence_bin(confidence: float) -> int:
    return min(max(int(confidence * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)


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

    def update(self, drafted: int, accepted: int, start: int = 0) -> None:
        """`drafted` tokens at positions from `start`, of which the first `accepted` were."""
        while len(self.counts) < start + drafted:
            self.counts.append([0.0, 0.0])
        for i in range(drafted):
            c = self.counts[start + i]
            c[0] = c[0] * DECAY + (1.0 if i < accepted else 0.0)
            c[1] = c[1] * DECAY + 1.0


@dataclass
class Costs:
    """Measured step costs per batch bucket, as exponential moving averages (seconds)."""

    decode: dict[int, float] = field(default_factory=dict)  # verify with no drafts
    decode_batch: dict[int, float] = field(default_factory=dict)  # their mean batch size
    per_token: dict[int, float] = field(default_factory=dict)  # each extra verified token
    draft_pass: dict[tuple[str, int], float] = field(default_factory=dict)
    # What verifying k drafted tokens for every sequence adds to a plain step, per k.
    verify_extra: dict[tuple[int, int], float] = field(default_factory=dict)

    @staticmethod
    def _ema(table: dict, key, value: float, floor: float = 0.0, weight: float = 0.2) -> None:
        """Move the average a step towards `value`, clipped to three times the average (or
        `floor`): one stall (a collection, a noisy neighbour) must not make drafting look
        so dear that it stops, and with it the measurements that would correct it. A
        lasting change still comes through, by up to 40% a step."""
        old = table.get(key)
        if old is None:
            table[key] = value
            return
        value = min(value, 3.0 * max(old, floor))
        table[key] = old + weight * (value - old)

    def observe_verify(self, batch: int, tokens: int, seconds: float) -> None:
        b = bucket(batch)
        if tokens == batch:
            self._ema(self.decode, b, seconds)
            self._ema(self.decode_batch, b, float(batch))
        elif b in self.decode:
            # A bucket's batch sizes differ (sequences finish one by one): set the pass
            # against a plain one of its own size, the bucket's scaled in proportion.
            # Plain passes cost less than that in small batches, which errs towards
            # dearer drafts; unscaled, a batch of 12 set against plain passes of 16 made
            # drafting look free.
            plain = self.decode[b] * batch / self.decode_batch.get(b, float(batch))
            extra = max(0.0, seconds - plain)
            floor = 0.01 * self.decode[b]
            self._ema(self.per_token, b, extra / (tokens - batch), floor=floor)
            k, uneven = divmod(tokens - batch, batch)
            if not uneven:
                self._ema(self.verify_extra, (b, k), extra, floor=floor)

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

    def extra_costs(self, batch: int, length: int) -> list[float]:
        """What verifying k = 1..length drafted tokens per sequence adds to a plain step,
        relative to it: as measured at each k where it has been, else k times the average
        per token. A pass's cost grows faster than its tokens once its products stop being
        bound by reading the weights; never decreasing in k."""
        b = bucket(batch)
        decode = self.decode.get(b)
        _, per_token = self.relative("ngram", batch, 0.0)
        out, floor = [], 0.0
        for k in range(1, length + 1):
            seen = self.verify_extra.get((b, k)) if decode else None
            floor = max(floor, k * per_token if seen is None else seen / decode)
            out.append(floor)
        return out


def best_length(
    rates: list[float],
    draft_cost: float | list[float],
    token_cost: float | list[float],
    min_k: int = 1,
) -> tuple[float, int]:
    """(expected speedup, k) for k = 0 (plain decoding, speedup 1) or min_k..len(rates):
    tokens per verification over the step's cost, both relative to plain decoding.
    `draft_cost`: of one draft pass, or of the pass for each position. `token_cost`: of
    each verified draft token, or of verifying k of them for each k (`Costs.extra_costs`)."""
    costs = draft_cost if isinstance(draft_cost, list) else [draft_cost] * len(rates)
    if isinstance(token_cost, list):
        extra = token_cost
    else:
        extra = [k * token_cost for k in range(1, len(rates) + 1)]
    best, tokens, survive, drafting = (1.0, 0), 1.0, 1.0, 0.0
    for k, (a, d, e) in enumerate(zip(rates, costs, extra, strict=False), start=1):
        survive *= a
        tokens += survive
        drafting += d
        if k >= min_k:
            best = max(best, (tokens / (1.0 + drafting + e), k))
    return best


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
