"""The replica's side of the fleet: telemetry out to Redis, drafting configs in.

`FleetLink` runs beside an engine on one background thread; the engine's loop never
touches Redis. Each interval the link diffs the engine's telemetry totals into a
window (drafted and accepted tokens per draft position, per mode and batch bucket,
with the measured costs, candidate scores and layer-draft tokens by confidence) and
queues it in a bounded deque; the queue is flushed with XADD (trimmed with MAXLEN ~)
whenever Redis answers, and the oldest windows are dropped when it has been away for
long.

Configs arrive on the announcement channel, and by polling the current record as a
fallback. A record is validated (ours, hash intact, every field of its exact type,
layers that exist, lengths in range) before the engine applies it between steps; a
bad one is refused and reported to `selfspec:v1:rejections`, and the last good
config stays. Without Redis the engine keeps serving with that config and its own
`auto` adaptation.

A second thread scores the controller's skip-set candidates in spare moments
(see `services.serve.scoring`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque

from services.common import redis_schema as rs
from services.serve.scoring import CandidateScorer

log = logging.getLogger(__name__)


class FleetLink:
    """Connects one engine replica to the fleet through Redis.

    `FleetLink(engine, redis_url, model, replica_id, draft_model=NAME).start()`;
    `stop()` when done;
    `version` is the config version the engine runs (0: none from the fleet yet).
    """

    def __init__(
        self,
        engine,
        redis_url: str | None = None,
        model: str = "default",
        replica_id: str | None = None,
        *,
        draft_model: str = "",
        interval_s: float = 1.0,
        poll_s: float = 1.0,
        score: bool = True,
        queue_windows: int = 300,
    ) -> None:
        self.engine = engine
        self.url = rs.redis_url(redis_url)
        self.model = model
        # The engine's draft model by name, for the controller; "" when it has none.
        self.draft_model = _draft_model_name(engine, draft_model)
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.interval_s = interval_s
        self.poll_s = poll_s
        self.connected = False
        self.rejected: dict[int, str] = {}  # version -> why, for records refused
        self._windows: deque[dict] = deque(maxlen=queue_windows)  # oldest dropped first
        self._redis = rs.connect(self.url, timeout=1.0)
        self._pubsub = None
        self._refusal = ""  # the last refusal reported
        self._previous = engine.telemetry.snapshot()
        self._window_start = time.time()
        self._candidates: list[str] = []
        self._scorer = CandidateScorer(engine) if score else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- the surface -------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The fleet config version the engine has applied; 0 before the first."""
        return self.engine.config_version

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, name="fleet-link", daemon=True)]
        if self._scorer is not None:
            self._threads.append(
                threading.Thread(target=self._score_loop, name="fleet-score", daemon=True)
            )
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop the threads, flushing the last window if Redis answers."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        self._cut_window()
        self._guard(self._flush)
        self._close_pubsub()

    # -- the link thread -----------------------------------------------------------------

    def _run(self) -> None:
        next_window = next_poll = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_window:
                self._cut_window()
                next_window = now + self.interval_s
                self._guard(self._heartbeat)
                self._guard(self._flush)
            if now >= next_poll:
                next_poll = now + self.poll_s
                self._guard(self._poll)
            if not self._guard(self._listen):
                self._stop.wait(min(0.5, self.poll_s))  # Redis away: retry soon, not hot

    def _guard(self, fn) -> bool:
        """Run one Redis interaction; a failure marks the link down and is retried later."""
        import redis

        try:
            fn()
        # AuthenticationError is a ConnectionError: caught first, for its own message.
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            self._refused(exc)
            return False
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if self.connected:
                log.warning("fleet: lost Redis at %s (%s); serving on", rs.describe(self.url), exc)
            self.connected = False
            self._close_pubsub()
            return False
        except redis.RedisError:
            log.exception("fleet: Redis refused a command")
            return False
        if not self.connected:
            log.info("fleet: connected to Redis at %s", rs.describe(self.url))
        self.connected = True
        return True

    def _refused(self, exc: Exception) -> None:
        """Redis refused our credential or a command: say what to check, once, not at every
        retry; a refused login counts as Redis away."""
        import redis

        hint = rs.refused_hint(exc, self.url)
        if hint != self._refusal:
            log.error("fleet: %s", hint)
        self._refusal = hint
        if isinstance(exc, redis.AuthenticationError):
            self.connected = False
            self._close_pubsub()

    def _cut_window(self) -> None:
        now = self.engine.telemetry.snapshot()
        window = now.since(self._previous)
        self._previous = now
        modes = {
            f"{mode}/{b}": {
                "steps": window.decisions.get((mode, b), 0),
                "drafted": window.drafted.get((mode, b), []),
                "accepted": window.accepted.get((mode, b), []),
            }
            for mode, b in window.decisions
        }
        scores = self._scorer.take() if self._scorer is not None else {}
        t0, self._window_start = self._window_start, time.time()
        if not modes and not scores:
            return  # confidence counts come with drafts, so with modes
        self._windows.append(
            {
                "model": self.model,
                "replica": self.replica_id,
                "version": self.version,
                "t0": t0,
                "t1": self._window_start,
                "modes": modes,
                "costs": self.engine.costs.snapshot(),
                "scores": scores,
                "confidence": {m: list(t) for m, t in window.confidence.items()},
            }
        )

    def _flush(self) -> None:
        if not self._windows:
            return
        pipe = self._redis.pipeline(transaction=False)
        batch = list(self._windows)
        for w in batch:
            pipe.xadd(
                rs.TELEMETRY,
                {"model": w["model"], "replica": w["replica"], "window": json.dumps(w)},
                maxlen=rs.TELEMETRY_MAXLEN,
                approximate=True,
            )
        pipe.execute()
        for _ in batch:
            self._windows.popleft()

    def _heartbeat(self) -> None:
        # The replica has loaded torch; the controller not.
        from services.engine.drafting import forced

        state = {
            "version": self.version,
            "seen_at": time.time(),
            "num_layers": self.engine.model.num_layers,
            "sizes": forced.sublayer_sizes(self.engine),
            "draft": rs.draft_fields(self.engine.default_draft),
            # Only replicas that say so are ever told to draft with mode `model`.
            "draft_model": self.draft_model,
            "draft_model_share": _draft_model_share(self.engine),
            "rejected": {str(v): why for v, why in list(self.rejected.items())[-5:]},
        }
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(rs.MODELS, self.model)
        pipe.hset(rs.model_key(self.model, "replicas"), self.replica_id, json.dumps(state))
        pipe.get(rs.model_key(self.model, "candidates"))
        candidates = pipe.execute()[-1]
        self._candidates = _candidate_keys(candidates)

    # -- configs -------------------------------------------------------------------------

    def _listen(self) -> None:
        """Wait briefly for an announcement; apply what it names."""
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub.subscribe(rs.CHANNEL)
            self._poll()  # anything announced while we were away
        msg = self._pubsub.get_message(timeout=0.1)
        if msg is None:
            return
        try:
            note = json.loads(msg["data"])
            model, version = note["model"], int(note["version"])
        except (ValueError, KeyError, TypeError):
            return  # not an announcement of ours; the poll catches anything missed
        if model == self.model and version > self.version:
            self._poll()

    def _poll(self) -> None:
        text = self._redis.get(rs.model_key(self.model, "current"))
        if text is not None:
            self._consider(text)

    def _consider(self, text: str) -> None:
        try:
            record = rs.Record.parse(text)
        except rs.RecordError as exc:
            self._reject(_version_of(text), str(exc))
            return
        if record.version <= self.version or record.version in self.rejected:
            return
        if record.model != self.model:
            self._reject(record.version, f"record is for model {record.model!r}")
            return
        try:
            base, by_bucket = record.drafts(self.engine.model.num_layers)
            self.engine.apply_draft(base, record.version, by_bucket)
        except ValueError as exc:  # RecordError included
            self._reject(record.version, str(exc))
            return
        log.info("fleet: applied config version %d (%s)", record.version, record.reason)

    def _reject(self, version: int, why: str) -> None:
        if self.rejected.get(version) == why:
            return  # reported already
        self.rejected[version] = why
        while len(self.rejected) > 100:
            self.rejected.pop(next(iter(self.rejected)))
        log.warning("fleet: refused config version %d: %s", version, why)
        self._redis.xadd(
            rs.REJECTIONS,
            {
                "model": self.model,
                "replica": self.replica_id,
                "version": str(version),
                "reason": why,
                "at": str(time.time()),
                "kept_version": str(self.version),
            },
            maxlen=rs.REJECTIONS_MAXLEN,
            approximate=True,
        )

    def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            # A dead connection may fail to close; it is dropped anyway.
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None

    # -- scoring thread ------------------------------------------------------------------

    def _score_loop(self) -> None:
        while not self._stop.is_set():
            self._scorer.observe()
            ran = False
            try:
                ran = self._scorer.run(list(self._candidates))
            except Exception:  # scoring is optional; serving is not
                log.exception("fleet: scoring a candidate failed")
            self._stop.wait(0.02 if ran else 0.2)


def _draft_model_name(engine, given: str) -> str:
    """`given`, or a stand-in where the engine has a draft model but no name was given;
    "" only where the engine has none, so that the controller never sends mode `model`
    to a replica that cannot run it."""
    if getattr(getattr(engine, "runner", None), "draft_model", None) is None:
        return ""
    return given or "draft model"


def _draft_model_share(engine) -> float | None:
    """The draft model's weights read over the target's: the prior the engine's `auto`
    and the controller take for the cost of its pass until one is measured; None without
    a draft model."""
    share = getattr(getattr(getattr(engine, "drafting", None), "policy", None), "model_cost", None)
    return None if share is None else round(share, 4)


def _candidate_keys(text: str | None) -> list[str]:
    """The skip sets under trial, from the controller's JSON; [] when absent or damaged."""
    if not text:
        return []
    try:
        keys = json.loads(text)["keys"]
        for k in keys:
            rs.parse_skip_key(k)
        return list(keys)
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def _version_of(text: str) -> int:
    """The version a damaged record claims, if any can be read; else -1."""
    try:
        return int(json.loads(text)["version"])
    except (ValueError, KeyError, TypeError):
        return -1
