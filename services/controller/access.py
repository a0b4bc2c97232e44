"""Who may call the controller's admin API: an operator token for everything, and an
optional read-only token for status and history.

No token or a wrong one gets UNAUTHENTICATED; the read-only token on a write gets
PERMISSION_DENIED. A method that is not listed as a read is a write, so a new method
needs the operator token until someone decides otherwise. The health service stays
open (Kubernetes' gRPC probes cannot send credentials); reflection is a read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from services.common.addresses import is_loopback
from services.common.tokens import TokenSource
from services.gen.selfspec.v1 import controller_pb2 as pb

log = logging.getLogger(__name__)

# Where the tokens come from when no flag names a file: a file, else a value.
TOKEN_ENV = ("SELFSPEC_ADMIN_TOKEN_FILE", "SELFSPEC_ADMIN_TOKEN")
READ_TOKEN_ENV = ("SELFSPEC_ADMIN_READ_TOKEN_FILE", "SELFSPEC_ADMIN_READ_TOKEN")

SERVICE = pb.DESCRIPTOR.services_by_name["ControllerAdmin"].full_name
OPEN = ("/grpc.health.v1.Health/",)
READS = (f"/{SERVICE}/GetStatus", f"/{SERVICE}/ListHistory", "/grpc.reflection.")

NO_TOKEN = (
    "the admin API needs a token: send 'authorization: Bearer <token>' "
    "(selfspec controller: --token-file or SELFSPEC_ADMIN_TOKEN_FILE)"
)
WRONG_TOKEN = "the admin API refused this token: it is neither the operator nor the read token"
READ_ONLY = "this token may only read; Pin, Unpin and Rollback need the operator token"
NO_FILE = "the controller cannot read its own admin token file; its log says why"


class Access:
    """The tokens the admin API accepts; `operator` may do everything."""

    def __init__(self, operator: TokenSource, reader: TokenSource | None = None) -> None:
        self.operator = operator
        self.reader = reader

    def refusal(self, method: str, header: str | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a call to `method` with this `authorization` header is refused; None
        when it may go on."""
        if method.startswith(OPEN):
            return None
        try:
            if self.operator.accepts(header):
                return None
            if self.reader is not None and self.reader.accepts(header):
                if method.startswith(READS):
                    return None
                return grpc.StatusCode.PERMISSION_DENIED, READ_ONLY
        except ValueError as exc:  # a token file gone or emptied, e.g. mid-rotation
            log.error("admin API: %s", exc)
            return grpc.StatusCode.UNAVAILABLE, NO_FILE
        if not header:
            return grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN
        return grpc.StatusCode.UNAUTHENTICATED, WRONG_TOKEN


def admin_access(
    listen: str,
    token_file: str | None,
    read_token_file: str | None,
    *,
    tls: bool,
    allow_insecure: bool,
) -> Access | None:
    """The `Access` for an admin API on `listen`, from the flags or the environment;
    None for an open one. ValueError when the settings must not run.

    Open is allowed on loopback only, where just this host's users reach it, unless
    `allow_insecure` says otherwise; both cases are logged as warnings."""
    operator = TokenSource.from_env(token_file, file_env=TOKEN_ENV[0], value_env=TOKEN_ENV[1])
    reader = TokenSource.from_env(
        read_token_file, file_env=READ_TOKEN_ENV[0], value_env=READ_TOKEN_ENV[1]
    )
    if operator is None and reader is not None:
        raise ValueError(
            f"a read-only admin token needs an operator token beside it: pass "
            f"--admin-token-file or set {TOKEN_ENV[0]}"
        )
    if operator is None:
        _allow_open(listen, allow_insecure)
        return None
    if not tls and not is_loopback(listen):
        log.warning(
            "the admin API on %s takes tokens in clear text: pass --admin-tls-cert and "
            "--admin-tls-key, or keep the network to it private",
            listen,
        )
    return Access(operator, reader)


def _allow_open(listen: str, allowed: bool) -> None:
    if is_loopback(listen):
        log.warning(
            "the admin API on %s is unauthenticated: anyone on this host may pin and roll "
            "back; pass --admin-token-file or set %s",
            listen,
            TOKEN_ENV[0],
        )
        return
    if not allowed:
        raise ValueError(
            f"refusing to serve the admin API on {listen} without a token: anyone who "
            f"reaches it could pin or roll back the fleet's drafting config. Pass "
            f"--admin-token-file (or set {TOKEN_ENV[0]} or {TOKEN_ENV[1]}), listen on "
            f"127.0.0.1, or pass --allow-insecure-admin"
        )
    log.warning(
        "the admin API on %s is unauthenticated (--allow-insecure-admin): anyone who "
        "reaches it may pin and roll back",
        listen,
    )


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Applies `Access` to every call before its handler runs."""

    def __init__(self, access: Access) -> None:
        self.access = access

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED, as without tokens
        header = dict(details.invocation_metadata or ()).get("authorization")
        refusal = self.access.refusal(details.method, header)
        return handler if refusal is None else _refusing(handler, *refusal)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as `handler` that only refuses. The request stays
    bytes (no deserializer): a refused caller costs no parsing."""

    async def refuse(request, context):
        await context.abort(code, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, response_serializer=handler.response_serializer)
