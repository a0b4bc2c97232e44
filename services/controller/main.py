"""`selfspec controller`: run a fleet controller, or ask a running one.

    selfspec controller [run] [--redis-url URL] [--admin-listen HOST:PORT] [--metrics-port N]
    selfspec controller status [--json] [--admin HOST:PORT]
    selfspec controller history [--model M] [--limit N]
    selfspec controller pin VERSION [--model M]
    selfspec controller unpin [--model M]
    selfspec controller rollback [--model M]

Run any number of controllers against one Redis: one leads, the rest stand by.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

from services.common import redis_schema as rs
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
        if name != "status":
            c.add_argument("--model", default="", help="needed when the fleet serves several")
        if name == "status":
            c.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "pin":
            c.add_argument("version", type=int)
        if name == "history":
            c.add_argument("--limit", type=int, default=20)
    return p


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
    controller = Controller(args.redis_url, args.id, settings)
    if not _reachable(controller, args.wait_redis):
        print(f"selfspec controller: {rs.unreachable_hint(args.redis_url)}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(controller, args))


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


async def _serve(controller, args) -> int:
    from services.controller import admin

    try:
        server = await admin.serve(controller, args.admin_listen)
    except OSError as exc:
        print(f"selfspec controller: {exc}; pass another --admin-listen", file=sys.stderr)
        return 2
    from services.controller.metrics import export_metrics

    push = export_metrics(controller, args.metrics_port)
    controller.start()
    print(
        f"controller {controller.id}: Redis {rs.describe(controller.url)}, "
        f"admin on {args.admin_listen}",
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
