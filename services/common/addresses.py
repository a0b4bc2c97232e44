"""What a listen address says about who can reach it."""

from __future__ import annotations

import ipaddress


def is_loopback(listen: str) -> bool:
    """Whether host:port listens on loopback only: then no token sent to it crosses a
    network. An empty host or 0.0.0.0 is every interface, and a host name other than
    localhost may resolve anywhere."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
