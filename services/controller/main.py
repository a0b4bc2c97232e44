"""`selfspec controller`: run a fleet controller, or ask a running one.

    selfspec controller [run] [--redis-url URL] [--admin-listen HOST:PORT] [--metrics-port N]
                             [--admin-token-file F] [--admin-read-token-file F]
                             [--admin-tls-cert PEM --admin-tls-key PEM]
    selfspec controller status [--json] [--admin HOST:PORT] [--token-file F] [--tls-ca PEM]
    selfspec controller history [--model M] [--limit N]
    selfspec controller pin VERSION [--model M]
    selfspec controller unpin [--model M]
    selfspec controller rollback [--model M]

Run any number of controllers against one Redis: one leads, the rest stand by.
The admin API takes an operator token (pin, unpin, rollback, and reads) and a
read-only token (status, history); without tokens it listens on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

from services.common import redis_schema as rs
from services.controller.access import READ_TOKEN_ENV, TOKEN_ENV, admin_access
from services.controller.decide import MODES

COMMANDS = ("run", "status", "history", "pin", "unpin", "rollback")
DEFAULT_ADMIN = "127.0.0.1:50052"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfspec controller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a controller (the default)")
    run.add_argument(
        "--redis-url", default=None, help=f"Redis URL (env {rs.URL_ENV}; default {rs.DEFAULT_URL})"
    )
    run.add_argument("--admin-listen", default=DEFAULT_ADMIN, help="admin gRPC host:port")
    _add_admin_security(run)
    run.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    run.add_argument("--id", default=None, help="this controller's id (default host-pid)")
    run.add_argument("--lease-seconds", type=float, default=5.0)
    run.add_argument("--decide-seconds", type=float, default=5.0, help="decision interval")
    run.add_argument(
        "--min-positions",
        type=int,
        default=300,
        help="scored positions a skip-set candidate needs before it may win",
    )
    run.add_argument(
        "--modes",
        default=",".join(MODES),
        help="drafting modes decisions may choose, comma-separated",
    )
    run.add_argument("--no-search", action="store_true", help="do not search skip sets")
    run.add_argument(
        "--wait-redis", type=float, default=30.0, help="seconds to wait for Redis at start"
    )
    run.add_argument("-v", "--verbose", action="store_true")
    for name, text in (
        ("status", "leader, current config, replicas, search"),
        ("history", "past configs, newest first"),
        ("pin", "republish a past version and hold it"),
        ("unpin", "let the controller decide again"),
        ("rollback", "republish the config before the current one, held"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("--admin", default=DEFAULT_ADMIN, help="a controller's admin host:port")
        c.add_argument(
            "--token-file",
            help=f"the admin token, operator or read-only (else env {TOKEN_ENV[0]}, "
            f"else the value of {TOKEN_ENV[1]})",
        )
        c.add_argument("--tls-ca", help="connect with TLS, verifying the controller with this CA")
        c.add_argument(
            "--tls-server-name",
            help="the name the controller's certificate holds, when --admin names it "
            "otherwise (e.g. through kubectl port-forward)",
        )
        if name != "status":
            c.add_argument("--model", default="", help="needed when the fleet serves several")
        if name == "status":
            c.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "pin":
            c.add_argument("version", type=int)
        if name == "history":
            c.add_argument("--limit", type=int, default=20)
    return p


def _add_admin_security(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--admin-token-file",
        help=f"the operator token: needed for pin, unpin, rollback; may read too (file re-read "
        f"on change; else env {TOKEN_ENV[0]}, else the value of {TOKEN_ENV[1]})",
    )
    run.add_argument(
        "--admin-read-token-file",
        help=f"a read-only token, for status and history (else env {READ_TOKEN_ENV[0]}, "
        f"else the value of {READ_TOKEN_ENV[1]})",
    )
    run.add_argument("--admin-tls-cert", help="PEM certificate chain: serve the admin API on TLS")
    run.add_argument("--admin-tls-key", help="PEM private key for --admin-tls-cert")
    run.add_argument(
        "--allow-insecure-admin",
        action="store_true",
        help="serve the admin API without a token on a non-loopback --admin-listen",
    )


def main(argv: list[str]) -> int:
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    from services.controller import client

    return client.main(args)


def _run(args) -> int:
    from services.controller.controller import Controller, Settings

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = set(modes) - set(MODES)
    if bad or not modes:
        print(f"--modes takes {', '.join(MODES)}; got {args.modes!r}", file=sys.stderr)
        return 2
    settings = Settings(
        lease_s=args.lease_seconds,
        decide_every_s=args.decide_seconds,
        min_positions=args.min_positions,
        modes=modes,
        search=not args.no_search,
    )
    try:
        tls = _admin_tls(args)
        access = admin_access(
            args.admin_listen,
            args.admin_token_file,
            args.admin_read_token_file,
            tls=tls is not None,
            allow_insecure=args.allow_insecure_admin,
        )
    except ValueError as exc:
        print(f"selfspec controller: {exc}", file=sys.stderr)
        return 2
    controller = Controller(args.redis_url, args.id, settings)
    if not _reachable(controller, args.wait_redis):
        print(f"selfspec controller: {rs.unreachable_hint(args.redis_url)}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(controller, args, access, tls))


def _admin_tls(args) -> tuple[str, str] | None:
    if bool(args.admin_tls_cert) != bool(args.admin_tls_key):
        raise ValueError("admin TLS needs both --admin-tls-cert and --admin-tls-key")
    return (args.admin_tls_cert, args.admin_tls_key) if args.admin_tls_cert else None


def _reachable(controller, wait_s: float = 10.0) -> bool:
    import redis

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return bool(controller.redis.ping())
        # AuthenticationError is a ConnectionError: a wrong password is no reason to wait.
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
            raise SystemExit(
                f"selfspec controller: {rs.refused_hint(exc, controller.url)}"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


async def _serve(controller, args, access, tls) -> int:
    from services.controller import admin

    try:
        server = await admin.serve(controller, args.admin_listen, access, tls)
    except OSError as exc:
        print(f"selfspec controller: {exc}; pass another --admin-listen", file=sys.stderr)
        return 2
    except ValueError as exc:  # the TLS files
        print(f"selfspec controller: {exc}", file=sys.stderr)
        return 2
    from services.controller.metrics import export_metrics

    push = export_metrics(controller, args.metrics_port)
    controller.start()
    print(
        f"controller {controller.id}: Redis {rs.describe(controller.url)}, "
        f"admin on {'grpcs' if tls else 'grpc'}://{args.admin_listen} "
        f"({'tokens' if access else 'no token'})",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2)
    await asyncio.to_thread(controller.stop)  # releases the lease: a standby leads at once
    if push is not None:
        await asyncio.to_thread(push.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
