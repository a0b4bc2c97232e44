"""The controller loop: hold or wait for the lease; as leader, read telemetry, search
skip sets, decide, and publish a new config version when the decision changes.

Standbys only keep trying for the lease. A new leader reads the retained telemetry
stream from its start and resumes the search from its state in Redis, so nothing
is lost with the old leader but the windows it had not yet acted on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import redis

from services.common import redis_schema as rs
from services.common.params import MAX_DRAFT_TOKENS
from services.common.speedup import LAYER_MODES
from services.controller import decide
from services.controller.evidence import ModelEvidence, Z, parse_window
from services.controller.lease import Lease
from services.controller.search import Search
from services.controller.store import ConfigStore, Fenced, Pinned

log = logging.getLogger(__name__)

REPLICA_GONE_S = 600.0


@dataclass
class Settings:
    lease_s: float = 5.0
    tick_s: float = 0.5
    decide_every_s: float = 5.0  # at most one decision per model this often
    min_positions: int = 300  # scored positions a candidate needs before it may win
    round_timeout_s: float = 120.0
    modes: tuple[str, ...] = decide.MODES  # what decisions may choose
    search: bool = True
    seed: int = 0


@dataclass
class ModelState:
    evidence: ModelEvidence = field(default_factory=ModelEvidence)
    search: Search | None = None
    choices: dict[int, decide.Choice] = field(default_factory=dict)
    decided_at: float = 0.0
    in_force: str = ""  # the skip set the replicas run, whose costs were measured


class Controller:
    def __init__(
        self,
        redis_url: str | None = None,
        controller_id: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.url = rs.redis_url(redis_url)
        self.id = controller_id or f"{socket.gethostname()}-{os.getpid()}"
        self.settings = settings or Settings()
        self.redis = rs.connect(self.url)
        self.lease = Lease(self.redis, self.id, self.settings.lease_s)
        self.store = ConfigStore(self.redis)
        self.models: dict[str, ModelState] = {}
        self.published = 0  # the highest version this controller wrote
        self._cursor = "0"  # telemetry stream position
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a background thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="controller", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop the loop; `release` hands the lease over at once (else it expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if release:
            with contextlib.suppress(redis.RedisError):  # unreachable: the lease expires
                self.lease.release()

    def run(self) -> None:
        was_down, refused = False, ""
        while not self._stop.is_set():
            try:
                self.tick()
                if was_down:
                    log.info("controller %s: Redis at %s is back", self.id, rs.describe(self.url))
                was_down = False
            # AuthenticationError is a ConnectionError: caught first, for its own message.
            except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
                hint = rs.refused_hint(exc, self.url)
                if hint != refused:  # once, not at every tick
                    log.error("controller %s: %s", self.id, hint)
                refused = hint
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if not was_down:
                    log.warning(
                        "controller %s: %s (%s)", self.id, rs.unreachable_hint(self.url), exc
                    )
                was_down = True
            except Exception:  # one bad tick must not end the controller
                log.exception("controller %s: tick failed", self.id)
            self._stop.wait(self.settings.tick_s)

    def tick(self) -> None:
        was_leader = self.lease.held
        if not self.lease.keep():
            if was_leader:
                log.warning("controller %s: lost the lease", self.id)
            return
        if not was_leader:
            log.info("controller %s: leading", self.id)
            self._cursor = "0"  # a new leader reads what the stream retained
            self.models.clear()
        self._read_telemetry()
        for model in self.store.models():
            if not self.lease.held:
                return
            self._step_model(model)

    @property
    def is_leader(self) -> bool:
        return self.lease.held

    # -- telemetry -----------------------------------------------------------------------

    def _read_telemetry(self, max_batches: int = 20) -> None:
        for _ in range(max_batches):
            got = self.redis.xread({rs.TELEMETRY: self._cursor}, count=500)
            if not got:
                return
            for entry_id, fields in got[0][1]:
                self._cursor = entry_id
                window = parse_window(fields)
                if window is None:
                    continue
                try:
                    self._state(str(window["model"])).evidence.add(window)
                except (AttributeError, KeyError, TypeError, ValueError):
                    log.warning("controller: skipped a damaged telemetry window %s", entry_id)

    def _state(self, model: str) -> ModelState:
        return self.models.setdefault(model, ModelState())

    # -- per model -----------------------------------------------------------------------

    def _step_model(self, model: str) -> None:
        replicas = self.store.replicas(model)
        gone = [
            r for r, st in replicas.items() if time.time() - st.get("seen_at", 0) > REPLICA_GONE_S
        ]
        if gone:  # replicas that stopped reporting long ago: out of status and decisions
            self.redis.hdel(rs.model_key(model, "replicas"), *gone)
            replicas = {r: st for r, st in replicas.items() if r not in gone}
        if not replicas:
            return
        state = self._state(model)
        current = self.store.current(model)
        base = dict(current.draft) if current else _replica_draft(replicas)
        if base is None:
            return
        shape = next(iter(replicas.values()))
        layers = int(shape["num_layers"])
        share = _draft_model_share(replicas)
        if share is None and base.get("mode") == "model":
            base["mode"] = "off"  # some replica cannot run it: drafting resumes by decision
        state.in_force = rs.layer_key(base, layers)
        if current is not None and current.reason in ("pin", "rollback"):
            self._follow_operator(state, base, layers)
        running = dict(base)  # what the replicas run now
        changed_skip = self._search(model, state, base, shape)
        now = time.time()
        if not changed_skip and now - state.decided_at < self.settings.decide_every_s:
            return
        state.decided_at = now
        draft, buckets, evidence = self._decide(state, current, base, shape, share)
        if current is not None and current.hash == rs.content_hash(model, draft, buckets):
            return
        if current is None and draft == running and not buckets:
            return  # the replicas' own default is what we would publish
        self._publish(model, draft, buckets, evidence, "search" if changed_skip else "decision")

    def _search(self, model: str, state: ModelState, base: dict, shape: dict) -> bool:
        """Advance the skip-set search; returns whether `base` now has a new skip set."""
        if not self.settings.search:
            return False
        if state.search is None:
            state.search = self._load_search(model, rs.layer_key(base, int(shape["num_layers"])))
        search = state.search
        counts = {k: n for k, (_, n) in state.evidence.scores.items()}
        s = self.settings
        if search.due(counts, s.min_positions, s.round_timeout_s):
            if search.candidates:
                ranked = [self._rank(state, key, shape) for key in search.trial()]
                adopted = search.conclude(ranked, s.min_positions)
                if adopted:
                    log.info("controller: %s adopts skip set %s", model, adopted)
            # An exit may win only where the operator allows early-exit drafting.
            search.next_round(int(shape["num_layers"]), s.seed, "early_exit" in s.modes)
            self._save_search(model, search)
        elif not self.redis.exists(rs.model_key(model, "candidates")):
            self._save_search(model, search)  # Redis restarted empty: tell replicas again
        layers = int(shape["num_layers"])
        if search.incumbent != rs.layer_key(base, layers):
            base.update(rs.with_layer_draft(base, search.incumbent, layers))
            if base.get("mode") in LAYER_MODES:
                base["mode"] = rs.layer_mode(search.incumbent, layers)
            return True
        return False

    @staticmethod
    def _follow_operator(state: ModelState, base: dict, layers: int) -> None:
        """An operator's pin or rollback sets the layer draft the search starts from next."""
        key = rs.layer_key(base, layers)
        if state.search is not None and state.search.incumbent != key:
            state.search.incumbent, state.search.candidates = key, []

    def _load_search(self, model: str, incumbent: str) -> Search:
        text = self.redis.get(rs.model_key(model, "search"))
        try:
            search = Search.from_dict(json.loads(text)) if text else None
        except (ValueError, TypeError):
            search = None
        if search is None or search.incumbent != incumbent:
            search = Search(incumbent, round=search.round if search else 0)
        return search

    def _save_search(self, model: str, search: Search) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(rs.model_key(model, "search"), json.dumps(search.as_dict()))
        pipe.set(
            rs.model_key(model, "candidates"),
            json.dumps({"round": search.round, "keys": search.trial()}),
        )
        pipe.execute()

    def _rank(self, state: ModelState, key: str, shape: dict) -> dict:
        """A skip set's speedup bounds from its agreement bounds and estimated cost."""
        ev = state.evidence
        cost, token_cost = self._skip_cost(state, key, shape)
        low, n = ev.agreement(key, Z)
        high, _ = ev.agreement(key, -Z)
        mid, _ = ev.agreement(key)
        return {
            "key": key,
            "n": n,
            "agreement": round(mid, 4),
            "cost": round(cost, 4),
            "speedup": round(decide.forced_speedup(mid, cost, token_cost)[0], 4),
            "low": decide.forced_speedup(low, cost, token_cost)[0],
            "high": decide.forced_speedup(high, cost, token_cost)[0],
        }

    def _skip_cost(self, state: ModelState, key: str, shape: dict, b: int = 1):
        """(draft pass, verified token) costs of skip set `key` at bucket `b`, relative to
        a plain step: the measured draft cost of the set in force, scaled by weight share."""
        sizes = shape.get("sizes", {})
        in_force_mode = rs.layer_mode(state.in_force, int(shape["num_layers"]))
        draft, token_cost = state.evidence.relative_costs(in_force_mode, b)
        frac = _weight_share(key, sizes)
        if draft is None:
            return frac, token_cost
        return draft * frac / max(_weight_share(state.in_force, sizes), 1e-6), token_cost

    def _decide(self, state: ModelState, current, base: dict, shape: dict, share):
        """`share`: the replicas' draft model's share of the target's weights; None where
        some replica has no draft model, and then mode `model` is never chosen."""
        version = current.version if current else 0
        allowed = self.settings.modes
        if share is None:
            allowed = tuple(m for m in allowed if m != "model")
        key = rs.layer_key(base, int(shape["num_layers"]))
        layer = rs.layer_mode(key, int(shape["num_layers"]))
        alpha, n = state.evidence.agreement(key)
        # Earlier choices of a layer draft now name the one in force (a skip set may
        # have given way to an early exit, or back).
        state.choices = {
            b: replace(c, mode=layer) if c.mode in LAYER_MODES else c
            for b, c in state.choices.items()
        }
        choices = {}
        for b in state.evidence.buckets(version):
            rates = None
            if key == state.in_force:  # measured acceptance is of this very layer draft
                rates = state.evidence.stats(version, layer, b).rates() or None
            if rates is None and n >= self.settings.min_positions:
                rates = [alpha] * MAX_DRAFT_TOKENS
            choice = decide.choose_bucket(
                state.evidence,
                version,
                b,
                layer,
                rates,
                self._skip_cost(state, key, shape, b)[0],
                allowed,
                state.choices.get(b),
                None if share is None else self._model_cost(state, shape, share, b),
            )
            if choice is not None:
                choices[b] = self._with_threshold(state, version, key, shape, b, choice)
        # Buckets without new evidence keep their last choice. The busiest bucket first:
        # it sets the base config.
        state.choices.update(choices)
        choices = dict(state.choices)
        busiest = sorted(choices, key=lambda b: (-state.evidence.steps(version, b), b))
        draft, buckets = decide.compose(base, {b: choices[b] for b in busiest})
        evidence = {
            "under_version": version,
            "skip_set": key,
            "agreement": round(alpha, 4),
            "scored_positions": n,
            "buckets": {
                str(b): self._bucket_evidence(state, version, b, choices[b]) for b in busiest
            },
        }
        if state.search is not None and state.search.adopted:
            evidence["search"] = state.search.adopted[-1]
        return draft, buckets, evidence

    def _model_cost(self, state: ModelState, shape: dict, share: float, b: int) -> float:
        """The draft model's pass at bucket `b`, relative to a plain step: as measured, else
        a prior as for an untried skip set (the layer draft's measured cost per share of
        the weights it reads, times the draft model's share), never under its share: a
        pass reads at least the draft's weights, and a prior too low would choose it before
        its acceptance had paid for it."""
        measured, _ = state.evidence.relative_costs("model", b)
        if measured is not None:
            return measured
        layer = rs.layer_mode(state.in_force, int(shape["num_layers"]))
        draft, _ = state.evidence.relative_costs(layer, b)
        if draft is None:
            return share
        frac = max(_weight_share(state.in_force, shape.get("sizes", {})), 1e-6)
        return max(share, draft / frac * share)

    def _with_threshold(self, state, version: int, key: str, shape: dict, b: int, choice):
        """A choice that runs layer draft `key`, with the confidence threshold its measured
        acceptance by confidence calls for (measured only while `key` is in force)."""
        layer = rs.layer_mode(key, int(shape["num_layers"]))
        confidence = state.evidence.confidence.get((version, layer))
        if choice.mode not in (layer, "auto") or key != state.in_force or not confidence:
            return choice
        cost, token_cost = self._skip_cost(state, key, shape, b)
        t = decide.threshold(confidence, cost, token_cost, choice.speedup)
        return replace(choice, threshold=t)

    @staticmethod
    def _bucket_evidence(state: ModelState, version: int, b: int, choice) -> dict:
        ev = state.evidence
        return {
            "choice": choice.mode,
            "max_draft": choice.max_draft,
            "predicted_speedup": round(choice.speedup, 4),
            "threshold": choice.threshold,
            "steps": ev.steps(version, b),
            "acceptance": {
                m: round(ev.stats(version, m, b).acceptance, 4)
                for m in ("skip", "ngram", "early_exit", "model")
                if ev.stats(version, m, b).drafted
            },
        }

    def _publish(self, model, draft, buckets, evidence, reason) -> None:
        record = rs.Record(model, draft, buckets, evidence=evidence, reason=reason, by=self.id)
        current = self.store.current(model)
        floor = max(
            self.published, self.store.highest_seen(model), current.version if current else 0
        )
        try:
            record = self.store.publish(record, self.lease.token, floor)
        except Fenced:
            log.warning("controller %s: fenced off; another controller leads", self.id)
            self.lease.drop()
            return
        except Pinned:
            return
        self.published = max(self.published, record.version)
        log.info("controller: %s version %d (%s): %s", model, record.version, reason, draft)


def _replica_draft(replicas: dict[str, dict]) -> dict | None:
    """The drafting the replicas run on their own, before any record: the most common."""
    drafts = [json.dumps(r["draft"], sort_keys=True) for r in replicas.values() if "draft" in r]
    if not drafts:
        return None
    return json.loads(max(set(drafts), key=drafts.count))


def _draft_model_share(replicas: dict[str, dict]) -> float | None:
    """The draft model's share of the target's weights (the largest any replica reports),
    or None unless every replica reports a draft model: a record applies to all of them,
    and one without a draft model would refuse mode `model`."""
    shares = []
    for r in replicas.values():
        if not r.get("draft_model"):
            return None
        shares.append(float(r.get("draft_model_share") or 1.0))
    return max(shares)


def _weight_share(key: str, sizes: dict) -> float:
    """The share of the model's weights a draft with skip set `key` reads."""
    attn, mlp = rs.parse_skip_key(key)
    return 1.0 - len(attn) * sizes.get("attn", 0.0) - len(mlp) * sizes.get("mlp", 0.0)
