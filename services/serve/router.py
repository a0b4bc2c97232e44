"""Session affinity: send a conversation's next turn to the replica holding its KV cache.

Ray Serve runs this router wherever a handle to the engine deployment lives (its gRPC
proxies, in our fleet). A request's `session_id` (gRPC metadata `session_id`) ranks
first the replica that served the session last; a session seen for the first time
ranks first the replica that rendezvous hashing picks, so that every router in the
fleet agrees without sharing state. Behind that preference, and for requests with no
session, two replicas chosen at random compete on queue length (power of two choices).
Each decision is a span when tracing is on.
A preferred replica that is gone, or full, simply is not ranked first: the session
moves, and its next turn recomputes the prefill there.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from services.common import telemetry

log = logging.getLogger(__name__)

MAX_SESSIONS = 100_000  # pins remembered, least recently used dropped first


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, max_sessions: int = MAX_SESSIONS, **_) -> None:
        self._pins: OrderedDict[str, ReplicaID] = OrderedDict()
        self._max_sessions = max_sessions

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ranks = []
        session = _session(pending_request)
        if session:
            preferred = self._preferred(session, candidate_replicas)
            if self.select_available_replicas([preferred]):
                ranks.append([preferred])
        ranks.append(_two_choices(candidate_replicas))
        try:
            telemetry.routing_span(pending_request, candidate_replicas, ranks)
        except Exception:  # tracing never stops a request from being routed
            log.exception("routing span failed")
        return ranks

    def _preferred(self, session: str, candidates: list[RunningReplica]) -> RunningReplica:
        by_id = {r.replica_id: r for r in candidates}
        pinned = self._pins.get(session)
        if pinned in by_id:
            return by_id[pinned]
        return max(candidates, key=lambda r: _score(session, r.replica_id.unique_id))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        session = _session(pending_request)
        if session:
            self._pins[session] = replica_id
            self._pins.move_to_end(session)
            while len(self._pins) > self._max_sessions:
                self._pins.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for session in [s for s, r in self._pins.items() if r == replica_id]:
            del self._pins[session]


def _session(request: PendingRequest | None) -> str:
    return request.metadata.session_id if request is not None else ""


def _two_choices(candidates: list[RunningReplica]) -> list[RunningReplica]:
    """Serve probes both and sends the request to the shorter queue."""
    return random.sample(candidates, min(2, len(candidates)))


def _score(session: str, replica: str) -> int:
    """Rendezvous hashing: the replica with the highest score for a session wins."""
    digest = hashlib.blake2b(f"{session}/{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
