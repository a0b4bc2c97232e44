"""The kernels compile for a real GPU (sm_90, the H100) even where there is none.

The interpreter runs a kernel as NumPy and cannot see what only the compiler rejects
(types that differ between branches, unsupported control flow, too much shared memory).
Triton ships `ptxas`, so compiling to a cubin needs no GPU. Run in a subprocess: in this
process the kernels were defined for the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCH = 90
SMEM_LIMIT = 227 * 1024  # sm_90's shared memory per block


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count("ok") == 6, run.stdout


def _compile(fn, signature: dict[str, str], constexprs: dict, **options) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = signature | {name: "constexpr" for name in constexprs}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options)
    assert kernel.metadata.shared <= SMEM_LIMIT, (fn.__name__, kernel.metadata.shared)
    print(fn.__name__, "ok", flush=True)


def _compile_all() -> None:
    from selfspec_kernels import kv_append, paged_attention

    attn = dict(zip(paged_attention._attention_kernel.arg_names, ["*bf16"] * 3 + ["*fp32"] * 2
                    + ["*i32"] * 4 + ["fp32"] + ["i32"] * 10, strict=False))  # fmt: skip
    for split in (False, True):
        for window in (False, True):
            consts = dict(H=32, G=4, D=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64, SPLIT=split,
                          TILES_PER_SPLIT=4, HAS_WINDOW=window, F32_DOT=False)  # fmt: skip
            _compile(paged_attention._attention_kernel, attn, consts, num_warps=4)
    merge = dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16", stride_ot="i32",
                 num_splits="i32")  # fmt: skip
    _compile(paged_attention._merge_kernel, merge, dict(H=32, D=128, BLOCK_D=128))
    append = dict(kv_ptr="*bf16", slots_ptr="*i64", cache_ptr="*bf16", stride_kv="i32",
                  stride_cache="i32", width="i32")  # fmt: skip
    _compile(kv_append._append_kernel, append, dict(BLOCK=1024))


if __name__ == "__main__":
    _compile_all()
