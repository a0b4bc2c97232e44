"""The C++ module exports the constants Python packs and gathers by, and a machine where
it does not build still runs a model, on another backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfspec_kernels import cpu_linear
from selfspec_kernels.cpu_build import CPU

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not CPU.available(), reason=f"CPU kernels: {CPU.unavailable_reason()}")
def test_python_packs_and_gathers_by_the_modules_constants() -> None:
    ops = CPU.ops()
    w = torch.randn(13, 19).to(torch.bfloat16)
    packed = cpu_linear.pack(w)
    assert packed.data.shape[2:] == (ops.GROUP_ROWS // 2, ops.STEP_COLUMNS, 2)
    assert packed.data.shape[:2] == (-(-13 // ops.GROUP_ROWS), -(-19 // ops.STEP_COLUMNS))
    assert torch.equal(packed.unpack(), w)
    assert set(ops.LAYER_OUTPUTS) <= set(ops.LAYER_WEIGHTS)  # names of a layer's parts
    assert ops.ATTENTION_SPLIT > 0


FALLBACK = """
import torch
from benchmarks.kernels import SHAPES, build_model
from selfspec_kernels.cpu_build import CPU
from services.engine.kv_pool import KVPool

assert not CPU.available() and "build failed" in CPU.unavailable_reason()
model = build_model(SHAPES["tiny"], torch.device("cpu"), 64)
assert model.backend.name != "cpu" and model.stack is None
pool = KVPool(num_layers=model.num_layers, kv_dim=model.kv_dim, num_blocks=4, block_size=16,
              dtype=model.kv_dtype, device="cpu")
batch = model.attention_batch([[0, 1]], [0], [3], 16)
h = model.run_layers(model.embed_tokens(torch.tensor([1, 2, 3])), batch, pool.kv)
assert model.logits(h).isfinite().all()
print("ran on", model.backend.name)
"""


def test_a_failed_build_runs_on_another_backend(tmp_path: Path) -> None:
    """A compiler that fails (a fresh extension directory, so nothing cached is loaded):
    the build says why, bfloat16 picks another backend, and a model runs."""
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("SELFSPEC_NO_CPU_KERNEL", None)
    env.pop("SELFSPEC_BACKEND", None)
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "ran on" in run.stdout
