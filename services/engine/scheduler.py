"""Continuous batching: which sequences run this step, and what happens to them after.

Each step prefills one chunk of the oldest waiting prompt (so long prompts never
stall running streams), then drafts and verifies for every running sequence in
one batched pass. Admission is first come, first served, by free KV blocks;
a request reserves what it can ever need up front, so a running sequence never
runs out of room. Finished sessions keep their blocks, keyed by session id and
tokens, until the pool needs them (least recently used first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.engine.kv_pool import BlockTable, KVPool
from services.engine.params import DraftConfig, SamplingParams
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
    tokens: list[int]  # KV is committed for all but the last
    table: BlockTable


class Scheduler:
    def __init__(self, pool: KVPool, *, max_waiting: int, prefill_chunk: int) -> None:
        self.pool = pool
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[tuple[Request, Sequence]] = deque()
        self.prefilling: list[tuple[Request, Sequence]] = []
        self.running: list[tuple[Request, Sequence]] = []
        self.sessions: OrderedDict[str, CachedSession] = OrderedDict()
        self._live: set[str] = set()
        self._aborted: set[str] = set()
        self.lock = threading.Lock()

    # -- intake -----------------------------------------------------------------

    def add(self, request: Request, need_tokens: int) -> Sequence:
        """Queue a request, or refuse it now with a ValueError or QueueFull."""
        if request.session_id is not None and len(request.session_id) > MAX_SESSION_ID:
            raise ValueError(f"session_id may have at most {MAX_SESSION_ID} characters")
        if self.pool.blocks_for(need_tokens) > self.pool.num_blocks:
            raise ValueError(
                f"this request needs {need_tokens} tokens of KV cache and the whole pool holds "
                f"{self.pool.num_blocks * self.pool.block_size}; lower max_tokens or the prompt"
            )
        with self.lock:
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting; retry later")
            seq = Sequence(
                request.request_id, request.prompt, request.params, BlockTable(self.pool)
            )
            seq.need = need_tokens
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
        for queue in (self.waiting, self.prefilling, self.running):
            keep = [(r, s) for r, s in queue if r.request_id not in aborted]
            gone += [(r, s) for r, s in queue if r.request_id in aborted]
            queue.clear()
            queue.extend(keep)
        for _, seq in gone:
            seq.finish_reason = "abort"
        return gone

    def admit(self) -> None:
        """Move waiting requests to prefill while their whole need fits, oldest first."""
        while self.waiting:
            request, seq = self.waiting[0]
            cached = self._take_session(request)
            need = self.pool.blocks_for(seq.need)
            held = len(cached.table.blocks) if cached else 0
            if need - held > self.pool.num_free and not self._evict(need - held):
                if cached:
                    self._put_session(request.session_id, cached)
                return
            with self.lock:
                self.waiting.popleft()
            seq.stats.queue_seconds = time.monotonic() - seq.arrived
            if cached:
                self._reuse(seq, cached)
            seq.table.reserve(seq.need)
            self.prefilling.append((request, seq))

    def finish(self, request: Request, seq: Sequence) -> None:
        """Release a finished sequence: keep a session's blocks, free the rest."""
        with self.lock:
            self._live.discard(request.request_id)
        if request.session_id is not None and seq.finish_reason != "abort" and seq.output:
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
        limit = min(cached.table.num_tokens, len(seq.prompt) - 1)
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
