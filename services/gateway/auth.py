"""Bearer-token authentication for the gateway.

The token comes from a mounted file (re-read when it changes, so a rotated Secret
takes effect without a restart) or from the environment. The health service stays
open: Kubernetes' gRPC probes cannot send credentials.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


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
    def from_env(cls, path: str | None = None) -> TokenSource | None:
        """`path`, else `SELFSPEC_TOKEN_FILE`, else `SELFSPEC_TOKEN`; None when none is set."""
        path = path or os.environ.get("SELFSPEC_TOKEN_FILE")
        if path:
            return cls(path=path)
        value = os.environ.get("SELFSPEC_TOKEN")
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
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].encode(), self.current().encode())


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, tokens: TokenSource) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable,
        details: grpc.HandlerCallDetails,
    ):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization")
        if self.tokens.accepts(header):
            return handler
        return _refusing(handler, "missing bearer token" if not header else "wrong bearer token")


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only refuses."""
    message = f"{reason}: send the metadata 'authorization: Bearer <token>'"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    # The request stays bytes: an unauthenticated caller costs no parsing.
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream, response_serializer=handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, response_serializer=handler.response_serializer
    )
