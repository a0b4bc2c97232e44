"""Bearer tokens that a service expects, from a mounted file or the environment.

A file is re-read when its mtime changes, so a rotated Kubernetes Secret takes effect
without a restart. The gateway and the controller's admin API share this.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

BEARER = "Bearer "


class TokenSource:
    """Where the expected token lives: a file, or a fixed value."""

    def __init__(self, *, path: str | None = None, value: str | None = None) -> None:
        if not path and not value:
            raise ValueError("a token source needs a file or a value")
        self.path = Path(path) if path else None
        self._value = value or ""
        self._stamp: float | None = None
        if self.path:
            self.current()  # a missing or empty file is an error at start, not per request

    @classmethod
    def from_env(
        cls,
        path: str | None = None,
        *,
        file_env: str = "SELFSPEC_TOKEN_FILE",
        value_env: str = "SELFSPEC_TOKEN",
    ) -> TokenSource | None:
        """`path`, else the file named by `file_env`, else the value of `value_env`;
        None when none is set. The defaults are the gateway's variables."""
        path = path or os.environ.get(file_env)
        if path:
            return cls(path=path)
        value = os.environ.get(value_env)
        return cls(value=value) if value else None

    def current(self) -> str:
        if self.path is not None:
            try:
                stamp = self.path.stat().st_mtime
            except OSError as exc:
                raise ValueError(f"cannot read the token file {self.path}: {exc}") from None
            if stamp != self._stamp:
                value = self.path.read_text().strip()
                if not value:
                    raise ValueError(f"the token file {self.path} is empty")
                self._value, self._stamp = value, stamp
        return self._value

    def accepts(self, header: str | None) -> bool:
        """Whether `header` (an `authorization` value) is `Bearer <this token>`; the
        comparison takes the same time wherever the two differ."""
        if not header or not header.startswith(BEARER):
            return False
        return hmac.compare_digest(header[len(BEARER) :].encode(), self.current().encode())
