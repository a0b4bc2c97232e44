"""Leadership through a Redis lease: set-if-absent with expiry, renewed by its holder.

The lease value is `<controller id>|<nonce>`; only the holder of that exact value
may renew or release it (compare-and-set in Lua), and config writes check it too
(see `store.publish`), so a controller that lost the lease while paused cannot
write: the lease value is its fencing token. Expiry runs on Redis's clock alone,
so clock skew between controllers changes nothing.
"""

from __future__ import annotations

import secrets
import time

from services.common import redis_schema as rs

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """The controller lease as seen by one controller."""

    def __init__(self, redis, controller_id: str, ttl_s: float = 5.0) -> None:
        self.redis = redis
        self.controller_id = controller_id
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{controller_id}|{secrets.token_hex(6)}"
        self._valid_until = 0.0  # by our own clock, with a margin: when to stop acting
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    @property
    def held(self) -> bool:
        """Whether we may act as leader now: the lease was ours within its time."""
        return time.monotonic() < self._valid_until

    def keep(self) -> bool:
        """Renew the lease if ours, else try to take it; returns whether we hold it.
        Redis errors propagate: the caller stops acting when `held` runs out."""
        start = time.monotonic()
        if self.held and self._renew(keys=[rs.LEASE], args=[self.token, self.ttl_ms]):
            ok = True
        else:
            ok = bool(self.redis.set(rs.LEASE, self.token, nx=True, px=self.ttl_ms))
            if not ok:  # our own lease, from before a pause: renew rather than wait it out
                ok = bool(self._renew(keys=[rs.LEASE], args=[self.token, self.ttl_ms]))
        # Count from before the call: the lease may have been set just after `start`.
        self._valid_until = start + 0.8 * self.ttl_ms / 1000 if ok else 0.0
        return ok

    def drop(self) -> None:
        """Stop acting as leader now (a write was fenced off: someone else leads)."""
        self._valid_until = 0.0

    def release(self) -> None:
        self._valid_until = 0.0
        self._release(keys=[rs.LEASE], args=[self.token])

    def leader(self) -> str:
        """The id of the controller that holds the lease; '' when none does."""
        value = self.redis.get(rs.LEASE)
        return value.rsplit("|", 1)[0] if value else ""
