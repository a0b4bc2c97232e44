"""A gRPC server's listening port, owned: a port another process holds is refused.

gRPC sets SO_REUSEPORT by default, which lets a second server bind a port another holds
and split its connections with it; servers made with `EXCLUSIVE` refuse it instead.
"""

from __future__ import annotations

EXCLUSIVE = [("grpc.so_reuseport", 0)]  # server options


def add_port(server, address: str, credentials=None) -> int:
    """`address` added to `server` (with TLS `credentials` when given): the port bound, or
    0 where gRPC refuses it (it raises; older releases returned 0)."""
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        return 0
