"""Bearer-token authentication for the gateway.

The token comes from a mounted file (re-read when it changes, so a rotated Secret
takes effect without a restart) or from the environment: see
`services.common.tokens.TokenSource`. The health service stays open: Kubernetes' gRPC
probes cannot send credentials.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from services.common.tokens import TokenSource

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


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
