"""The command line: one JSON object out, one line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys


def selfspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_json():
    r = selfspec(
        "generate",
        "--model",
        "default",
        "--dtype",
        "float32",
        "--prompt",
        "What is 2 + 2?",
        "--chat",
        "--max-tokens",
        "8",
        "--draft",
        "skip",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "token_ids", "finish_reason", "stats", "backend"}
    assert out["backend"]["backend"] == "onednn"  # float32's default on any CPU
    assert out["backend"]["compute"] == "float32"
    assert 1 <= len(out["token_ids"]) <= 8
    assert out["finish_reason"] in ("stop", "length")


def test_bad_input_is_one_line_and_non_zero():
    r = selfspec("generate", "--model", "default", "--prompt", "hi", "--max-tokens", "0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("selfspec: error: max_tokens")
    assert "Traceback" not in r.stderr
