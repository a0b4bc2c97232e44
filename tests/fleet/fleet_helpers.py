"""Helpers for the fleet tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from waiting import wait_for

from services.common import internal_auth
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.serve.local import (
    DEFAULT_CONFIG,
    GATEWAY_READY,
    Fleet,
    FleetOptions,
    free_port,
    load_config,
    wait_for_lines,
)

REPLICAS = 2


def fleet_config(replicas: int = REPLICAS) -> dict:
    config = load_config(DEFAULT_CONFIG)
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    app = config["applications"][0]
    # A small KV pool, so that tests can fill it: about 700 tokens of the default model's
    # float32 keys and values (GGUF weights); the shipped limits on calls held.
    app["args"].update(kv_cache_bytes=32 << 20, threads=1)
    (engine,) = app["deployments"]
    engine.pop("autoscaling_config")
    engine.update(num_replicas=replicas, graceful_shutdown_timeout_s=5)
    return config


@contextlib.contextmanager
def running_fleet(config: dict, log_dir, **options):
    """A fleet of `config` with its gateway on free ports (no controller unless asked),
    stopped on the way out."""
    options = {
        # Port 0: the gateway takes a free one when it starts, so nothing started before it
        # (Ray starts many processes) can have taken it.
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "controller": False,
        **options,
    }
    fleet = Fleet(
        FleetOptions(config=config, log_dir=log_dir, **options),
        say=lambda line: print(line, file=sys.stderr),
    ).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def chat(text: str, max_tokens: int = 12, **fields) -> pb.GenerateRequest:
    req = pb.GenerateRequest(max_tokens=max_tokens, **fields)
    req.messages.messages.add(role="user", content=text)
    return req


def replica_stats(expected: int = REPLICAS, tries: int = 60) -> dict[str, dict]:
    """Each replica's `stats()`, keyed by replica id, called until every replica has
    answered. Each call names a new session: left to the shorter queue, every call would
    go to an idle replica and never reach a busy one; a session goes where rendezvous
    hashing sends it, busy or not."""
    from ray import serve

    handle = serve.get_deployment_handle("Engine", "selfspec")
    seen: dict[str, dict] = {}
    for i in range(tries):
        call = handle.options(session_id=f"stats-{i}").stats
        stats = call.remote().result(timeout_s=30)
        seen[stats["replica_id"]] = stats
        if len(seen) >= expected:
            return seen
    raise AssertionError(f"{len(seen)} of {expected} replicas answered stats() in {tries} calls")


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition"):
    """`waiting.wait_for`, polling at the pace a fleet's stats calls allow."""
    return wait_for(predicate, timeout_s, every=0.2, what=what)


def launch_gateway(fleet: Fleet, *args: str, env: dict | None = None, http: bool = False):
    """A second gateway on the same fleet, with its own options, listening on ports the
    system gives it (with `http`, for the OpenAI API too), read from its log in the
    fleet's; returns (process, [gRPC port, HTTP port])."""
    cmd = [sys.executable, "-m", "services.cli", "gateway", "--listen", "127.0.0.1:0"]
    cmd += ["--upstream", fleet.upstream, *(["--http-listen", "127.0.0.1:0"] if http else [])]
    env = {**os.environ, internal_auth.ENV_FILE: str(fleet.internal_token_file), **(env or {})}
    log = Path(tempfile.mkstemp(prefix="gateway-", suffix=".log", dir=fleet.log_dir)[1])
    with log.open("wb") as out:  # a file, not a pipe nobody reads, which could fill
        proc = subprocess.Popen([*cmd, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, wait_for_lines(log, 0, GATEWAY_READY[: 2 if http else 1], 30, proc)


def start_gateway(fleet: Fleet, *args: str, env: dict | None = None) -> tuple:
    """A second gateway on the same fleet (`launch_gateway`); returns (process, address)."""
    proc, (port,) = launch_gateway(fleet, *args, env=env)
    return proc, f"127.0.0.1:{port}"
