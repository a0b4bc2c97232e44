"""Continuous batching: which sequences run this step, and what happens to them after.

Each step prefills one chunk of the oldest waiting prompt (so long prompts never
stall running streams), then drafts and verifies for every running sequence in
one batched pass. Admission is first come, first served, by free KV blocks for the
prompt and the first step; sequences take more blocks as they grow. When the pool
runs out, the most recently admitted sequence is preempted: its blocks are freed and
it goes back to the front of the queue with its output, to recompute its KV when
admitted again (as vLLM does). Finished sessions keep their blocks, keyed by session
id and tokens, until the pool needs them (least recently used first).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.params import DraftConfig, SamplingParams
from services.engine import faults
from services.engine.kv_pool import BlockTable, KVPool
from services.engine.sequence import Sequence

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


class Scheduler:
    def __init__(self, pool: KVPool, *, max_waiting: int) -> None:
        self.pool = pool
        self.max_waiting = max_waiting
        self.waiting: deque[tuple[Request, Sequence]] = deque()
        self.prefilling: list[tuple[Request, Sequence]] = []
        self.running: list[tuple[Request, Sequence]] = []
        self.sessions: OrderedDict[str, CachedSession] = OrderedDict()
        self._live: set[str] = set()
        self._aborted: set[str] = set()
        self._admissions = itertools.count(1)
        self.lock = threading.Lock()

    # -- intake -----------------------------------------------------------------

    def add(self, request: Request, seq: Sequence) -> Sequence:
        """Queue a request, or refuse it now with a ValueError or QueueFull. `seq.need`:
        the most KV it can ever hold, which the pool must be able to hold alone."""
        if request.session_id is not None and len(request.session_id) > MAX_SESSION_ID:
            raise ValueError(f"session_id may have at most {MAX_SESSION_ID} characters")
        if self.pool.blocks_for(seq.need) > self.pool.num_blocks:
            raise ValueError(
                f"this request needs {seq.need} tokens of KV cache and the whole pool holds "
                f"{self.pool.num_blocks * self.pool.block_size}; lower max_tokens or the prompt"
            )
        with self.lock:
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting; retry later")
            self._live.add(request.request_id)
            self.waiting.append((request, seq))
        return seq

    def abort(self, request_id: str) -> bool:
        """Mark a request for removal at the next step; False if no such request lives."""
        with self.lock:
            if request_id in self._live:
                self._aborted.add(request_id)
                return True
            return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # -- one step's decisions ------------------------------------------------------

    def reap_aborted(self) -> list[tuple[Request, Sequence]]:
        """Requests cancelled since the last step, removed wherever they were."""
        with self.lock:
            aborted, self._aborted = self._aborted, set()
        if not aborted:
            return []
        gone = []
        with self.lock:  # `add` appends to `waiting` from other threads
            for queue in (self.waiting, self.prefilling, self.running):
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
        seq.stats.preemptions += 1
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

    def settle(self) -> list[tuple[Request, Sequence]]:
        """The running sequences that finished in this step, taken out of the running set,
        so that a client told its request finished finds it no longer running."""
        done = [(r, s) for r, s in self.running if s.finished]
        self.running[:] = [(r, s) for r, s in self.running if not s.finished]
        return done

    def take_active(self) -> list[tuple[Request, Sequence]]:
        """Every sequence prefilling or running, taken out: a step failed them all."""
        active = self.prefilling + self.running
        self.prefilling.clear()
        self.running.clear()
        return active

    def finish(self, request: Request, seq: Sequence) -> None:
        """Release a finished sequence: keep a session's blocks, free the rest."""
        with self.lock:
            self._live.discard(request.request_id)
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

    def _reuse(self, seq: Sequence, cached: CachedSession) -> None:
        """Adopt a session's blocks for the longest common prefix; at least the last
        prompt token is computed again, since its logits are needed."""
        limit = min(cached.table.num_tokens, len(cached.tokens), len(seq.prompt) - 1)
        n = 0
        while n < limit and cached.tokens[n] == seq.prompt[n]:
            n += 1
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
