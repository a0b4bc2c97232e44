"""`selfspec serve` brings the fleet up, `selfspec client` gets an answer from it, and
Ctrl-C takes everything down again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import yaml
from fleet_helpers import fleet_config, free_port

SELFSPEC = [sys.executable, "-m", "services.cli"]


def test_serve_then_client_then_ctrl_c(tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(fleet_config(replicas=1)))
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    http = f"127.0.0.1:{free_port()}"
    serve = subprocess.Popen(
        [*SELFSPEC, "serve", "--config", str(config), "--listen", address]
        + ["--http-listen", http, "--controller-admin", admin],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            assert line, "selfspec serve exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("fleet ready"):
                break
        printed = "".join(lines)
        for part in (
            "[1/5] redis",
            "[2/5] ray",
            "[3/5] serve",
            f"[4/5] gateway     grpc://{address}, OpenAI API http://{http}/v1",
            f"[5/5] controller  admin grpc://{admin}",
        ):
            assert part in printed, printed
        client = subprocess.run(
            [*SELFSPEC, "client", "--address", address, "--prompt", "Say hi.", "--max-tokens", "8"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() and "completion 8" in client.stderr
        with urllib.request.urlopen(f"http://{http}/health", timeout=30) as health:
            assert health.status == 200
        status = subprocess.run(
            [*SELFSPEC, "controller", "status", "--json", "--admin", admin],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["leader_id"], status.stdout  # it leads, being alone
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(120)
    assert code == 0
    assert "stopping the fleet" in serve.stdout.read()
    redis_port = int(printed.split("[1/5] redis")[1].split(":")[2].split("/")[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0, "redis-server left running"
    for port in (address, http):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port.rsplit(":", 1)[1]))) != 0, "gateway left"
