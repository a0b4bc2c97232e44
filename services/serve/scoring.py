"""Score skip-set candidates on a replica without extra traffic.

The full model already chose every token of the sequences a replica served (or, when
sampling, generated them): teacher-forced over that text, a candidate draft's
next-token choice either agrees with the full model's or not, and agreement
estimates the acceptance of its drafts. The replica keeps a few finished sequences
as samples, with the full model's choices computed once, and scores each candidate
at most once on each sample, so evidence is never counted twice. Scoring runs in
spare moments (the engine idle; on a saturated replica, a small share of its time),
one pass at a time, between steps.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from services.common.redis_schema import parse_skip_key

log = logging.getLogger(__name__)

MIN_OUTPUT = 8  # a sample needs this many generated tokens to be worth scoring
MAX_TOKENS = 256  # per sample: bounds one scoring pass
SAMPLES = 16  # kept per replica, newest first out
PER_PASS = 4  # samples scored together in one pass


@dataclass
class Sample:
    tokens: list[int]
    start: int  # the first row whose next token was generated, not given
    finished: bool = False
    targets: object = None  # the full model's choice after each token from start (a tensor)
    scored: set[str] = field(default_factory=set)  # candidate keys scored on it


class CandidateScorer:
    """Collects finished sequences from a running engine and scores candidates on them."""

    def __init__(self, engine, busy_share: float = 0.02) -> None:
        self.engine = engine
        # A saturated replica never idles: it still scores, but with passes taking at most
        # this share of its time (a pass holds up the decode loop while it runs).
        self.busy_share = busy_share
        self.samples: dict[str, Sample] = {}  # sequence id -> sample, oldest first
        self.scores: dict[str, list[int]] = {}  # candidate key -> [agreeing, scored]
        self._lock = threading.Lock()  # `take` runs on the link's thread
        self._next_busy = time.monotonic() + 5.0  # when a pass may next run while busy

    def observe(self) -> None:
        """Copy the tokens of running sequences (a cheap read, no lock); those that have
        left the running set since are finished samples."""
        running = set()
        for _, seq in list(self.engine.scheduler.running):
            running.add(seq.id)
            if len(seq.output) < MIN_OUTPUT:
                continue
            tokens = list(seq.tokens)
            cut = max(0, len(tokens) - MAX_TOKENS)  # keep the newest: they hold the output
            self.samples[seq.id] = Sample(tokens[cut:], max(0, len(seq.prompt) - 1 - cut))
        for sid, sample in self.samples.items():
            sample.finished = sample.finished or sid not in running
        while len(self.samples) > SAMPLES:
            self.samples.pop(next(iter(self.samples)))

    def spare(self) -> bool:
        """Whether now is a spare moment: the engine idle, or busy but owed a pass."""
        return not self.engine.scheduler.has_work or time.monotonic() >= self._next_busy

    def run(self, candidates: list[str]) -> bool:
        """One pass (see `step`) if now is a spare moment; returns whether one ran."""
        if not self.spare():
            return False
        busy = self.engine.scheduler.has_work
        t0 = time.monotonic()
        ran = self.step(candidates)
        if ran and busy:
            self._next_busy = time.monotonic() + (time.monotonic() - t0) / self.busy_share
        return ran

    def step(self, candidates: list[str]) -> bool:
        """Score the first candidate with unscored samples on up to PER_PASS of them (one
        pass, after one more for the full model's choices if needed). Returns whether a
        pass ran."""
        for key in candidates:
            todo = [s for s in self.samples.values() if s.finished and key not in s.scored]
            if todo:
                return self._score(key, todo[:PER_PASS])
        return False

    def _score(self, key: str, todo: list[Sample]) -> bool:
        attn, mlp = parse_skip_key(key)
        layers = self.engine.model.num_layers
        if any(not 0 <= i < layers for i in (*attn, *mlp)):
            for s in todo:
                s.scored.add(key)  # never scorable here: do not try again
            return False
        from services.engine.drafting import forced
        from services.engine.model import LayerPlan

        engine, runner = self.engine, self.engine.runner
        fresh = [s for s in todo if s.targets is None]
        if fresh:
            tokens, start = [s.tokens for s in fresh], [s.start for s in fresh]
            targets = engine.between_steps(forced.full_choices, runner, tokens, start)
            if targets is None:
                return True  # no KV room to spare now; try later
            for s, t in zip(fresh, targets, strict=True):
                s.targets = t
        got = engine.between_steps(
            forced.agreement,
            runner,
            [s.tokens for s in todo],
            [s.targets for s in todo],
            [s.start for s in todo],
            LayerPlan(frozenset(attn), frozenset(mlp)),
        )
        if got is None:
            return True
        for s in todo:
            s.scored.add(key)
        with self._lock:
            total = self.scores.setdefault(key, [0, 0])
            total[0] += got[0]
            total[1] += got[1]
        return True

    def take(self) -> dict[str, list[int]]:
        """The scores since the last call, for a telemetry window."""
        with self._lock:
            scores, self.scores = self.scores, {}
        return scores
