"""The fleet's internal credential: how Serve's replicas know a call came from a gateway.

Serve's gRPC proxy answers anyone who reaches its port (Ray 2.60 binds it on every
interface and has no authentication of its own), so every engine replica checks each call
for a per-fleet secret that only gateways hold, sent in the metadata key `METADATA_KEY`,
never in the client's `authorization`. The secret comes from a file
(`SELFSPEC_INTERNAL_TOKEN_FILE`, re-read when it changes, so a rotated Secret applies
without a restart) or from the environment (`SELFSPEC_INTERNAL_TOKEN`).

The gateway also tells the replica who owns each request (`OWNER_KEY`: a digest of the
caller's credential, or of its connection), so that an Abort ends only the caller's own.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from services.common.tokens import TokenSource

ENV_FILE = "SELFSPEC_INTERNAL_TOKEN_FILE"
ENV_VALUE = "SELFSPEC_INTERNAL_TOKEN"
METADATA_KEY = "x-selfspec-internal"
OWNER_KEY = "x-selfspec-owner"


def from_env(path: str | None = None) -> TokenSource | None:
    """`path`, else `$SELFSPEC_INTERNAL_TOKEN_FILE`, else `$SELFSPEC_INTERNAL_TOKEN`; None
    when none is set. A file that is missing or empty is a ValueError here, at start."""
    return TokenSource.from_env(path, file_env=ENV_FILE, value_env=ENV_VALUE)


def metadata(source: TokenSource | None) -> list[tuple[str, str]]:
    """The metadata that carries the credential upstream; none without one."""
    return [(METADATA_KEY, source.current())] if source is not None else []


def accepts(source: TokenSource, invocation_metadata: Iterable[tuple[str, str]] | None) -> bool:
    """Whether the call's metadata carries the credential; in constant time, so that the
    time of a refusal says nothing about how much of a guess was right."""
    sent = dict(invocation_metadata or ()).get(METADATA_KEY)
    if not sent:
        return False
    return hmac.compare_digest(sent.encode(), source.current().encode())


def write_new(path: Path) -> str:
    """A new random secret, written to `path` readable by its owner alone (0600)."""
    value = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)  # a file left from an earlier run may be more readable
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
