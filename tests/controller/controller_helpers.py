"""Shared by the controller tests: controller processes, replicas, seeding Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.common import redis_schema as rs

ROOT = Path(__file__).resolve().parents[2]


def spawn_controller(url: str, cid: str, admin: str, *extra: str) -> subprocess.Popen:
    """`selfspec controller run` in its own process."""
    cmd = [sys.executable, "-m", "services.controller.main", "run", "--redis-url", url]
    cmd += ["--id", cid, "--admin-listen", admin, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def leader_of(client) -> str:
    value = client.get(rs.LEASE)
    return value.rsplit("|", 1)[0] if value else ""


def add_replica(client, model: str, rid: str = "r1", version: int = 0, layers: int = 30) -> None:
    """A replica's heartbeat, as a FleetLink writes it."""
    state = {
        "version": version,
        "seen_at": time.time(),
        "num_layers": layers,
        "sizes": {"attn": 0.006, "mlp": 0.02, "head": 0.2},
        "draft": rs.draft_fields(_default_draft()),
        "rejected": {},
    }
    client.sadd(rs.MODELS, model)
    client.hset(rs.model_key(model, "replicas"), rid, json.dumps(state))


def _default_draft():
    from services.common.params import DraftConfig

    return DraftConfig(mode="skip", skip_attn=(8, 26))


def replica(engine, draft=None, kv_cache_bytes: int = 96 << 20):
    """Another engine replica on the same weights: its own KV pool, scheduler, loop and
    telemetry, without loading the model again."""
    from services.engine import Engine

    return Engine(
        engine.model,
        engine.tokenizer,
        engine.model_path,
        kv_cache_bytes=kv_cache_bytes,
        draft=draft,
    )


def poor_draft():
    """A skip set that rarely agrees with the full model: most of the middle skipped."""
    from services.common.params import DraftConfig

    middle = tuple(range(2, 22))
    return DraftConfig(mode="skip", skip_attn=middle, skip_mlp=middle, max_draft=3)
