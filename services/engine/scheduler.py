"""Continuous batching: which sequences run this step, and what happens to them after.

The scheduler alone moves requests between its queues (waiting, prefilling, running)
and the session cache; the engine runs what it plans. Each step prefills one chunk of
the oldest waiting prompt (so long prompts never stall running streams), then drafts
and verifies for every running sequence, one batched pass per drafting config. The
plan comes in two parts, `schedule` (cancellations, admissions, the prefill chunk) and
`schedule_decode` (the decode groups), since a prompt whose last chunk is prefilled
decodes in the same step; `postprocess` takes out the sequences that finished.

Admission is first come, first served, by free KV blocks for the prompt and the first
step; sequences take more blocks as they grow. When the pool runs out, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the
front of the queue with its output, to recompute its KV when admitted again (as vLLM
does). Finished sessions keep their blocks, keyed by session id and tokens, until the
pool needs them (least recently used first).

A request for `n` choices queues as its first choice alone; the others wait, unforked,
until its prompt is prefilled, then fork from it (the engine's `_fork`) and join the
running set. Every choice has an id of its own, live from the request's arrival.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.common.params import DraftConfig, SamplingParams
from services.common.speedup import bucket
from services.engine import faults
from services.engine.kv_pool import BlockTable, KVPool
from services.engine.sequence import Sequence

log = logging.getLogger(__name__)

MAX_SESSION_ID = 256


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; retry later."""


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    draft: DraftConfig
    session_id: str | None = None
    on_update: Callable[[Sequence, bool], None] | None = field(default=None, repr=False)


@dataclass
class CachedSession:
    tokens: list[int]  # KV is committed for the first `table.num_tokens`
    table: BlockTable


@dataclass
class Plan:
    """A step's work before it decodes: requests cancelled since the last step (finished
    "abort") and those whose admission failed, both out of every queue, and the prompt
    to prefill a chunk of."""

    aborted: list[tuple[Request, Sequence]]
    failed: list[tuple[Request, Sequence, Exception]]
    prefill: tuple[Request, Sequence] | None


Groups = dict[DraftConfig, list[Sequence]]  # running sequences by the drafting they step with


class Scheduler:
    def __init__(self, pool: KVPool, *, max_waiting: int, max_positions: int) -> None:
        """`max_positions`: the model's context, which no draft may run past."""
        self.pool = pool
        self.max_waiting = max_waiting
        self.max_positions = max_positions
        self.waiting: deque[tuple[Request, Sequence]] = deque()
        self.prefilling: list[tuple[Request, Sequence]] = []
        self.running: list[tuple[Request, Sequence]] = []
        self.sessions: OrderedDict[str, CachedSession] = OrderedDict()
        self._live: dict[str, str] = {}  # request ids in use: the request each is a choice of
        self.unforked: dict[str, list[tuple[Request, Sequence]]] = {}  # by first choice's id
        self._aborted: set[str] = set()
        self._admissions = itertools.count(1)
        self.lock = threading.Lock()

    # -- intake -----------------------------------------------------------------

    def add(
        self, request: Request, seq: Sequence, choices: list[tuple[Request, Sequence]] = ()
    ) -> Sequence:
        """Queue a request, or refuse it now with a ValueError or QueueFull. `seq.need`:
        the most KV it can ever hold, which the pool must be able to hold alone.
        `choices`: its other choices, to fork when its prompt is prefilled."""
        if request.session_id is not None and len(request.session_id) > MAX_SESSION_ID:
            raise ValueError(f"session_id may have at most {MAX_SESSION_ID} characters")
        if self.pool.blocks_for(seq.need) > self.pool.num_blocks:
            raise ValueError(
                f"this request needs {seq.need} tokens of KV cache and the whole pool holds "
                f"{self.pool.num_blocks * self.pool.block_size}; lower max_tokens or the prompt"
            )
        with self.lock:
            ids = [request.request_id] + [r.request_id for r, _ in choices]
            for i in ids:
                if i in self._live or i in self._live.values():
                    raise ValueError(f"request id {i!r} is already in use")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting; retry later")
            self._live.update(dict.fromkeys(ids, request.request_id))
            if choices:
                self.unforked[request.request_id] = list(choices)
            self.waiting.append((request, seq))
        return seq

    def abort(self, request_id: str) -> bool:
        """Mark a request, every choice of it, for removal at the next step; False if no
        such request lives."""
        with self.lock:
            ids = [i for i, of in self._live.items() if request_id in (i, of)]
            self._aborted.update(ids)
            return bool(ids)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def stats(self) -> dict:
        """Queue lengths and KV blocks by use, for health checks and metrics."""
        session_blocks = sum(len(c.table.blocks) for c in self.sessions.values())
        return {
            "waiting": len(self.waiting),
            "prefilling": len(self.prefilling),
            "running": len(self.running),
            "kv_blocks_total": self.pool.num_blocks,
            "kv_blocks_free": self.pool.num_free,
            "kv_blocks_sessions": session_blocks,
            "kv_blocks_in_use": self.pool.num_blocks - self.pool.num_free - session_blocks,
            "sessions": len(self.sessions),
        }

    # -- one step's plan ------------------------------------------------------------

    def schedule(self) -> Plan:
        """Drop cancelled requests, admit what fits, and pick the prompt to prefill: the
        oldest admitted, a chunk a step."""
        aborted = self.reap_aborted()
        failed = self.admit()
        return Plan(aborted, failed, self.prefilling[0] if self.prefilling else None)

    def schedule_decode(
        self, default: DraftConfig, by_bucket: Mapping[int, DraftConfig], max_configs: int
    ) -> Groups:
        """This step's decode groups (see `_groups`), each running sequence with the KV
        blocks its step may write; while the pool is short, the most recently admitted
        sequences are preempted, and the groups formed again without them."""
        while True:
            groups = self._groups(default, by_bucket, max_configs)
            missing = sum(
                max(0, self.pool.blocks_for(s.num_tokens + self.room(s, cfg)) - len(s.table.blocks))
                for cfg, seqs in groups.items()
                for s in seqs
            )
            if missing <= self.pool.num_free:
                break
            for _, seq in self.make_room(missing):
                log.info("preempted request %s to free KV blocks", seq.id)
        for cfg, seqs in groups.items():
            for s in seqs:
                s.table.reserve(s.num_tokens + self.room(s, cfg))
        return groups

    def _groups(
        self, default: DraftConfig, by_bucket: Mapping[int, DraftConfig], max_configs: int
    ) -> Groups:
        """Running sequences by the drafting config they run with this step: their own,
        in order of arrival, up to `max_configs` distinct ones with the default;
        the rest run with the default (their stats say so). The default group runs the
        fleet's variant for its batch size (`by_bucket`), if any."""
        own: Groups = {default: []}
        for request, seq in self.running:
            if request.draft in own or len(own) < max_configs:
                own.setdefault(request.draft, []).append(seq)
            else:
                own[default].append(seq)
                seq.stats.draft_fallback = True
        groups: Groups = {}
        for cfg, seqs in own.items():
            if seqs:
                if cfg is default:
                    cfg = by_bucket.get(bucket(len(seqs)), cfg)
                groups.setdefault(cfg, []).extend(seqs)
        return groups

    def room(self, seq: Sequence, cfg: DraftConfig) -> int:
        """How many tokens a step may draft for `seq`, for which it reserves KV blocks."""
        return seq.draft_room(cfg.max_draft, self.max_positions)

    def postprocess(self) -> list[tuple[Request, Sequence]]:
        """The running sequences that finished in this step, taken out of the running set,
        so that a client told its request finished finds it no longer running; the
        engine releases each (`finish`) and tells its owner, in this order."""
        done = [(r, s) for r, s in self.running if s.finished]
        self.running[:] = [(r, s) for r, s in self.running if not s.finished]
        return done

    # -- the plan's parts -------------------------------------------------------------

    def reap_aborted(self) -> list[tuple[Request, Sequence]]:
        """Requests cancelled since the last step, removed wherever they were."""
        with self.lock:
            aborted, self._aborted = self._aborted, set()
        if not aborted:
            return []
        gone = []
        with self.lock:  # `add` appends to `waiting` from other threads
            for queue in (self.waiting, self.prefilling, self.running, *self.unforked.values()):
                keep = [(r, s) for r, s in queue if r.request_id not in aborted]
                gone += [(r, s) for r, s in queue if r.request_id in aborted]
                queue.clear()
                queue.extend(keep)
        for _, seq in gone:
            seq.finish("abort")
        return gone

    def admit(self) -> list[tuple[Request, Sequence, Exception]]:
        """Move waiting requests to prefill while the KV of their prompt and first step
        fits, oldest first, keeping a block free per running sequence to grow into.
        Returns the requests whose admission failed, already out of every queue."""
        failed = []
        while self.waiting:
            request, seq = self.waiting[0]
            try:
                if not self._admit(request, seq):
                    return failed
            except Exception as exc:  # this request alone: free what it took, go on
                with self.lock:
                    self.waiting.popleft()
                seq.table.free()
                failed.append((request, seq, exc))
        return failed

    def _admit(self, request: Request, seq: Sequence) -> bool:
        faults.check("admit", [request.request_id])
        fresh = not seq.output  # a preempted sequence recomputes everything
        cached = self._take_session(request) if fresh else None
        if cached:  # blocks shared with a choice still running are never written
            cached.table.unshare_from(self._common_prefix(seq, cached))
        need = self.pool.blocks_for(seq.prefill_target + 1 + request.draft.max_draft)
        held = len(cached.table.blocks) if cached else 0
        growth = len(self.running) + len(self.prefilling)
        if need - held + growth > self.pool.num_free and not self._evict(need - held + growth):
            if cached:
                self._put_session(request.session_id, cached)
            return False
        with self.lock:
            self.waiting.popleft()
        if fresh:
            seq.stats.queue_seconds = time.monotonic() - seq.arrived
        if cached:
            self._reuse(seq, cached)
        seq.table.reserve(seq.prefill_target)
        seq.admitted = next(self._admissions)
        self.prefilling.append((request, seq))
        return True

    def make_room(self, blocks: int) -> list[tuple[Request, Sequence]]:
        """Free `blocks` blocks: sessions first (least recently used), then by preempting
        the most recently admitted sequences. Returns those preempted."""
        preempted = []
        while not self._evict(blocks):
            active = self.running + self.prefilling
            if not active:
                break
            victim = max(active, key=lambda rs: rs[1].admitted)
            self.preempt(*victim)
            preempted.append(victim)
        return preempted

    def preempt(self, request: Request, seq: Sequence) -> None:
        """Give up a sequence's KV and queue it first, to resume by recomputing it."""
        self.drop(request, seq)
        seq.table.free()
        seq.free_draft()
        seq.stats.preemptions += 1
        with self.lock:
            self.waiting.appendleft((request, seq))

    def take_unforked(self, request_id: str) -> list[tuple[Request, Sequence]]:
        """The choices waiting to fork from request `request_id`'s first, taken out."""
        with self.lock:
            return self.unforked.pop(request_id, [])

    def join(self, request: Request, seq: Sequence) -> None:
        """A choice forked from a prefilled one runs, admitted now."""
        seq.stats.queue_seconds = time.monotonic() - seq.arrived
        seq.admitted = next(self._admissions)
        self.running.append((request, seq))

    def requeue(self, request: Request, seq: Sequence) -> None:
        """A choice that could not fork waits first in line, to prefill its prompt itself."""
        with self.lock:
            self.waiting.appendleft((request, seq))

    def start_running(self, request: Request, seq: Sequence) -> None:
        """A sequence whose prompt is prefilled joins the running ones."""
        self.prefilling.remove((request, seq))
        self.running.append((request, seq))

    def drop(self, request: Request, seq: Sequence) -> None:
        """Take a sequence out of prefill or the running set (it ended, failed or is
        preempted); nothing when it is in neither."""
        for queue in (self.prefilling, self.running):
            if (request, seq) in queue:
                queue.remove((request, seq))

    def take_active(self) -> list[tuple[Request, Sequence]]:
        """Every sequence prefilling or running, taken out: a step failed them all."""
        active = self.prefilling + self.running
        self.prefilling.clear()
        self.running.clear()
        return active

    def finish(self, request: Request, seq: Sequence) -> None:
        """Release a finished sequence: out of prefill or the running set, a session's
        blocks kept (not the draft model's), the rest freed."""
        self.drop(request, seq)
        seq.free_draft()
        with self.lock:
            self._live.pop(request.request_id, None)
        keep = seq.finish_reason in ("stop", "length") and seq.output
        if request.session_id is not None and keep:
            self._put_session(request.session_id, CachedSession(seq.tokens, seq.table))
        else:
            seq.table.free()

    # -- sessions ----------------------------------------------------------------

    def _take_session(self, request: Request) -> CachedSession | None:
        if request.session_id is None:
            return None
        return self.sessions.pop(request.session_id, None)

    def _put_session(self, session_id: str, cached: CachedSession) -> None:
        old = self.sessions.pop(session_id, None)
        if old is not None and old.table is not cached.table:
            old.table.free()
        self.sessions[session_id] = cached

    def _common_prefix(self, seq: Sequence, cached: CachedSession) -> int:
        """How many prompt tokens a session's KV serves; at least the last prompt token
        is computed again, since its logits are needed."""
        limit = min(cached.table.num_tokens, len(cached.tokens), len(seq.prompt) - 1)
        n = 0
        while n < limit and cached.tokens[n] == seq.prompt[n]:
            n += 1
        return n

    def _reuse(self, seq: Sequence, cached: CachedSession) -> None:
        """Adopt a session's blocks for the longest common prefix."""
        n = self._common_prefix(seq, cached)
        seq.table = cached.table
        seq.table.commit(n)
        seq.stats.cached_prompt_tokens = n

    def _evict(self, blocks: int) -> bool:
        """Free least recently used sessions until `blocks` are free; False if impossible."""
        while self.pool.num_free < blocks and self.sessions:
            _, cached = self.sessions.popitem(last=False)
            cached.table.free()
        return self.pool.num_free >= blocks

    def clear_sessions(self) -> None:
        while self.sessions:
            self.sessions.popitem()[1].table.free()
