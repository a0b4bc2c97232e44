"""`selfspec gateway`: run the gRPC gateway (and, with --http-listen, the OpenAI-compatible
HTTP API) until SIGTERM or Ctrl-C, then drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from prometheus_client import REGISTRY

from services.common import internal_auth, metrics_push, telemetry
from services.common.tokens import TokenSource
from services.gateway import metrics
from services.gateway.server import (
    MAX_IN_FLIGHT,
    RETRY_AFTER_MS,
    GatewayConfig,
    GatewayServer,
    Limits,
    Upstream,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfspec gateway", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port to serve gRPC on")
    p.add_argument(
        "--http-listen",
        help="host:port to serve the OpenAI-compatible HTTP API on, with the same token and "
        "TLS files (default: no HTTP; `selfspec serve` uses 127.0.0.1:8000)",
    )
    p.add_argument(
        "--upstream",
        default=os.environ.get("SELFSPEC_UPSTREAM", "127.0.0.1:9000"),
        help="Serve's gRPC proxy, host:port (env SELFSPEC_UPSTREAM)",
    )
    p.add_argument("--app", default="selfspec", help="the Serve application to call")
    p.add_argument(
        "--token-file",
        help="require this bearer token (file re-read on change; "
        "else env SELFSPEC_TOKEN_FILE or SELFSPEC_TOKEN; none: no authentication)",
    )
    p.add_argument(
        "--tls-cert",
        help="PEM certificate chain: serve TLS (needs --tls-key); both files are re-read "
        "when they change, for new connections",
    )
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument(
        "--allow-insecure-token",
        action="store_true",
        help="take the bearer token without TLS on a non-loopback --listen (refused "
        "otherwise: only where the network encrypts the traffic itself)",
    )
    p.add_argument(
        "--internal-token-file",
        help="the fleet's internal credential, sent on every call to Serve (file re-read on "
        f"change; else env {internal_auth.ENV_FILE} or {internal_auth.ENV_VALUE})",
    )
    p.add_argument(
        "--upstream-tls-ca",
        help="speak TLS to --upstream and verify its certificate by these PEM CA certificates",
    )
    p.add_argument(
        "--upstream-tls-server-name",
        help="the name --upstream's certificate must carry, when not its host's",
    )
    p.add_argument(
        "--health-listen", help="also serve grpc.health.v1 alone, in plaintext, for probes"
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=20.0,
        help="on SIGTERM, how long running streams may take to finish",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_IN_FLIGHT,
        help="generation calls forwarded at once; past them a call is refused at once with "
        "RESOURCE_EXHAUSTED (default %(default)s)",
    )
    p.add_argument(
        "--retry-after-ms",
        type=int,
        default=RETRY_AFTER_MS,
        help="the retry hint of a RESOURCE_EXHAUSTED refusal, in trailing metadata "
        "retry-after-ms and grpc-retry-pushback-ms, jittered up to 1.5 times "
        "(default %(default)s)",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = GatewayConfig(
            listen=args.listen,
            upstream=_upstream(args),
            tokens=TokenSource.from_env(args.token_file),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            health_listen=args.health_listen,
            drain_seconds=args.drain_seconds,
            limits=Limits(args.max_in_flight, args.retry_after_ms),
            allow_insecure_token=args.allow_insecure_token,
            http_listen=args.http_listen,
        )
        telemetry.setup_tracing("selfspec-gateway")  # no-op unless an exporter is configured
        if args.metrics_port:
            host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
            metrics.serve(args.metrics_port, host)
        push = metrics_push.start(REGISTRY, "selfspec-gateway")  # when OTLP is configured
        asyncio.run(_run(config))
        if push is not None:
            push.stop()
    except (ValueError, OSError) as exc:
        print(f"selfspec gateway: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _upstream(args: argparse.Namespace) -> Upstream:
    credential = internal_auth.from_env(args.internal_token_file)
    if credential is None:
        log.warning(
            "no internal credential (--internal-token-file, %s or %s): calls to Serve carry "
            "none, and replicas that require one refuse them",
            internal_auth.ENV_FILE,
            internal_auth.ENV_VALUE,
        )
    if args.upstream_tls_server_name and not args.upstream_tls_ca:
        raise ValueError("--upstream-tls-server-name needs --upstream-tls-ca")
    return Upstream(
        args.upstream,
        args.app,
        credential=credential,
        tls_ca=args.upstream_tls_ca,
        server_name=args.upstream_tls_server_name,
    )


async def _run(config: GatewayConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = GatewayServer(config)
    await server.start()
    scheme = "grpcs" if config.tls_cert else "grpc"
    upstream = "grpcs" if config.upstream.tls_ca else "grpc"
    print(
        f"gateway listening on {scheme}://{config.listen} (port {server.port}), forwarding "
        f"to {upstream}://{config.upstream.address}, at most {config.limits.max_in_flight} "
        "calls in flight",
        flush=True,
    )
    if server.http is not None:
        web = "https" if config.tls_cert else "http"
        print(
            f"OpenAI-compatible API on {web}://{config.http_listen}/v1 (port {server.http.port})",
            flush=True,
        )
    await stop.wait()
    print(f"gateway draining for up to {config.drain_seconds:.0f} s", flush=True)
    await server.stop()
