"""Measured step costs: what a plain decode step, each extra verified token and each
draft pass take, per batch bucket. The `auto` policy weighs drafts with them."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from services.common.speedup import bucket

WINDOW = 9  # the latest measurements a cost is the median of


@dataclass
class Costs:
    """Measured step costs per batch bucket, each the median of its latest measurements
    (seconds)."""

    decode: dict[int, float] = field(default_factory=dict)  # verify with no drafts
    decode_batch: dict[int, float] = field(default_factory=dict)  # their mean batch size
    per_token: dict[int, float] = field(default_factory=dict)  # each extra verified token
    draft_pass: dict[tuple[str, int], float] = field(default_factory=dict)
    # What verifying k drafted tokens for every sequence adds to a plain step, per k.
    verify_extra: dict[tuple[int, int], float] = field(default_factory=dict)
    _recent: dict[tuple, deque] = field(default_factory=dict, repr=False, compare=False)

    def _observe(self, table: dict, key, value: float) -> None:
        """The cost at `key` becomes the median of its latest WINDOW measurements. Stalls
        (a collection, a noisy neighbour, a first pass's page faults) move it not at all,
        where they pulled an average up: drafting then looked dear, was chosen less, and
        so was measured too seldom to come back. A lasting change comes through in half
        a window."""
        recent = self._recent.setdefault((id(table), key), deque(maxlen=WINDOW))
        recent.append(value)
        table[key] = statistics.median(recent)

    def observe_verify(self, batch: int, tokens: int, seconds: float) -> None:
        b = bucket(batch)
        if tokens == batch:
            self._observe(self.decode, b, seconds)
            self._observe(self.decode_batch, b, float(batch))
        elif b in self.decode:
            # A bucket's batch sizes differ (sequences finish one by one): set the pass
            # against a plain one of its own size, the bucket's scaled in proportion.
            # Plain passes cost less than that in small batches, which errs towards
            # dearer drafts; unscaled, a batch of 12 set against plain passes of 16 made
            # drafting look free.
            plain = self.decode[b] * batch / self.decode_batch.get(b, float(batch))
            extra = max(0.0, seconds - plain)
            self._observe(self.per_token, b, extra / (tokens - batch))
            k, uneven = divmod(tokens - batch, batch)
            if not uneven:
                self._observe(self.verify_extra, (b, k), extra)

    def observe_draft(self, mode: str, batch: int, seconds_per_pass: float) -> None:
        self._observe(self.draft_pass, (mode, bucket(batch)), seconds_per_pass)

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
