"""`benchmarks.step_profile` on a tiny random GGUF (`benchmarks.synthetic_gguf`): the file
is built once and loads with its quantized blocks and in bfloat16, a few decode steps
are profiled, and the report's parts add up to its steps and its bytes to the weights'.

    pytest tests/engine/test_step_profile.py
"""

from __future__ import annotations

import json

import pytest

from benchmarks import step_profile, synthetic_gguf
from selfspec_kernels import cpu_quant

pytestmark = pytest.mark.skipif(
    not cpu_quant.available(), reason=f"CPU kernels unavailable: {cpu_quant.unavailable_reason()}"
)

TINY = synthetic_gguf.Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)


def test_a_tiny_gguf_is_profiled_and_its_parts_add_up(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE_DIR", str(tmp_path / "cache"))  # its conversion
    path = synthetic_gguf.build("tiny", TINY, tmp_path)
    written = path.stat().st_mtime_ns
    assert synthetic_gguf.build("tiny", TINY, tmp_path) == path
    assert path.stat().st_mtime_ns == written  # kept, not built again

    argv = ["--sizes", str(path), "--tokens", "4", "--rounds", "1", "--repeats", "2"]
    assert step_profile.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "step_profile.json").read_text())
    assert (tmp_path / "step_profile.png").stat().st_size > 0
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["cpu"]
    result = report["results"][str(path)]
    assert result["model"]["layers"] == 2 and result["model"]["hidden"] == 64

    layer_weights = 2 * (64 * (64 + 32 + 32 + 64) + 3 * 64 * 128)
    gguf, bf16 = result["gguf"], result["bf16"]
    assert gguf["backend"]["weights"] == "gguf" and bf16["backend"]["weights"] == "bfloat16"
    assert gguf["weight_bytes"]["layers"] == layer_weights * 20 // 32  # Q4_1: 20 bytes / 32
    assert gguf["weight_bytes"]["head"] == 512 * 64 * 34 // 32  # the tied Q8_0 embedding
    assert bf16["weight_bytes"]["layers"] >= 2 * layer_weights
    for row in (gguf, bf16):
        assert row["steps"] == 2  # of 4 tokens, the first step (prefill and a decode) makes 2
        inside = row["embed_ms"] + row["layers_ms"] + row["head_ms"]
        assert 0 < inside <= row["step_ms"]
        assert sum(row[part] for part in step_profile.STACK) == pytest.approx(row["step_ms"])
        assert 0 <= row["attention_ms"] <= row["layers_ms"]
        assert row["layer_split"]["context"] == result["prompt_tokens"] + 2
        assert row["kernel_calls"] == 5 * 2 + 1 and row["sync_ms"] >= 0
        assert row["layer_split"]["threads_speedup"] > 0
        assert row["weight_read_bound_ms"] > 0 and row["tok_s"] > 0
