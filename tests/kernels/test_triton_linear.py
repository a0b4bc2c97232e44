"""The batch-invariant Triton linear layers against their PyTorch reference, and row
invariance bit for bit: a row's result is the same whatever M is and wherever the row
sits in the pass (on a GPU natively, elsewhere in Triton's interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfspec_kernels import triton_linear as tlin
from selfspec_kernels import triton_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the interpreter
ROOT = Path(__file__).resolve().parents[2]
# Against a float32 reference rounded once to the dtype: float32 accumulation order, and
# for bfloat16 one rounding step either way (2**-8 relative).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=1e-2)}
SMALL = tlin.Tiles(16, 16, 32)  # several tiles along every dimension of small shapes


def _data(m: int, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    return x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), bias.to(dtype).to(DEVICE)


def _assert_rows_invariant(fn, x: torch.Tensor) -> torch.Tensor:
    """fn on every prefix and every suffix of x's rows equals those rows of fn(x)."""
    full = fn(x)
    for m in range(1, x.shape[0]):
        assert torch.equal(fn(x[:m]), full[:m]), f"rows [0:{m}]"
        assert torch.equal(fn(x[m:]), full[m:]), f"rows [{m}:]"
    return full


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **TOL[want.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize(("k", "n"), [(64, 48), (96, 80)])
def test_linear_matches_reference_and_is_row_invariant(k, n, with_bias, dtype) -> None:
    x, w, bias = _data(9, k, n, dtype)
    b = bias if with_bias else None
    got = _assert_rows_invariant(lambda t: tlin.linear(t, w, b), x)
    _close(got, tlin.linear_reference(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_tiles(dtype) -> None:
    """Rows across several row tiles, K not a multiple of the tile: still invariant."""
    x, w, bias = _data(40, 80, 48, dtype, seed=1)
    full = tlin.linear(x, w, bias, tiles=SMALL)
    _close(full, tlin.linear_reference(x, w, bias))
    for rows in (slice(0, 1), slice(3, 4), slice(5, 22), slice(17, 40)):
        assert torch.equal(tlin.linear(x[rows], w, bias, tiles=SMALL), full[rows]), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gain", [False, True], ids=["folded", "gain"])
def test_fused_variants(dtype, gain) -> None:
    """The norm before the product, SwiGLU, the residual add: reference and invariance."""
    x, w, bias = _data(9, 64, 80, dtype, seed=2)
    g = (1 + torch.rand(64, generator=torch.Generator().manual_seed(3))).to(DEVICE)
    norm = (g if gain else None, 64 * 1e-5)
    other = torch.randn(9, 80).to(dtype).to(DEVICE)
    cases = [
        (lambda t: tlin.linear(t, w, bias, norm=norm), dict(bias=bias, norm=norm)),
        (lambda t: tlin.linear_swiglu(t, w, norm=norm), dict(norm=norm, swiglu=True)),
        (lambda t: tlin.linear_add(t, w, other[-t.shape[0] :], bias), dict(bias=bias)),
    ]
    for fn, ref in cases[:2]:
        _close(_assert_rows_invariant(fn, x), tlin.linear_reference(x, w, **ref))
    fn, ref = cases[2]
    _close(fn(x), tlin.linear_reference(x, w, other=other, **ref))
    _close(tlin.linear_swiglu(x, w, tiles=SMALL), tlin.linear_reference(x, w, swiglu=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_normalize(dtype) -> None:
    x = (torch.randn(9, 3, 80) * 3).to(dtype).to(DEVICE)  # leading dims: per-head norms
    g = torch.rand(80).to(DEVICE) + 0.5
    got = triton_norm.normalize(x, 0.01, g)
    assert got.shape == x.shape
    _close(got, triton_norm.normalize_reference(x, 0.01, g))
    flat = x.reshape(27, 80)
    _assert_rows_invariant(lambda t: triton_norm.normalize(t, 0.01), flat)


def test_leading_dims_and_empty() -> None:
    x, w, _ = _data(6, 64, 48, torch.float32)
    assert torch.equal(tlin.linear(x.view(2, 3, 64), w), tlin.linear(x, w).view(2, 3, 48))
    assert tlin.linear(x[:0], w).shape == (0, 48)


def test_bad_shapes_are_refused() -> None:
    x, w, bias = _data(2, 64, 48, torch.float32)
    with pytest.raises(ValueError, match="w must be"):
        tlin.linear(x, w[:, :32])
    with pytest.raises(ValueError, match="bias must be"):
        tlin.linear(x, w, bias[:5])
    with pytest.raises(ValueError, match="SwiGLU"):
        tlin.linear_swiglu(x, w[:47])


def test_kernels_compile_for_sm90() -> None:
    """What only the compiler rejects (shared memory, layouts of the SwiGLU split), for
    every variant the engine launches, with the GPU tiles; no GPU needed (Triton ships
    ptxas). In a subprocess: here the kernels were defined for the interpreter."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count(" ok") == len(list(_variants())) + 1, run.stdout


def _variants():
    """(name, dtype, constexprs) of the variants compiled for sm_90."""
    for dtype, f32 in (("bf16", False), ("fp32", True)):
        for tiles in (tlin.CUDA_NARROW, tlin.CUDA_WIDE):
            for swiglu, norm, bias, other in [
                (False, False, False, False),
                (False, True, True, False),
                (False, False, True, True),
                (True, True, False, False),
            ]:
                name = f"{dtype} {tiles.block_n}x{tiles.block_k} swiglu={swiglu} norm={norm}"
                consts = dict(
                    HAS_BIAS=bias, HAS_OTHER=other, SWIGLU=swiglu, NORM=norm, HAS_GAIN=norm,
                    F32=f32, SUM=False, EVEN_K=True, BLOCK_M=tiles.block_m,
                    BLOCK_N=tiles.block_n, BLOCK_W=tiles.block_n * (1 + swiglu),
                    BLOCK_K=tiles.block_k,
                )  # fmt: skip
                yield name, dtype, tiles, consts


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = tlin._linear_kernel
    for name, dtype, tiles, consts in _variants():
        types = [f"*{dtype}"] * 6 + ["i32"] * 3 + ["fp32"] + ["i32"] * 4
        signature = dict(zip(kernel.arg_names, types, strict=False))
        signature |= {c: "constexpr" for c in consts}
        # As a launch specialises them: 16-byte aligned pointers, N, K and the strides
        # multiples of 16 (M is never specialised on).
        aligned = [i for i, a in enumerate(kernel.arg_names[:14]) if a not in ("M", "n_eps")]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
        options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.metadata.shared <= 227 * 1024, (name, compiled.metadata.shared)
        print(name, "ok", compiled.metadata.shared, flush=True)
    norm = triton_norm._normalize_kernel
    types = ["*bf16"] * 3 + ["i32"] * 2 + ["fp32"] + ["i32"] * 2
    types = dict(zip(norm.arg_names, types, strict=False))
    consts = dict(HAS_GAIN=True, BLOCK_M=1, BLOCK_D=triton_norm.NORM_BLOCK_D)
    src = ASTSource(fn=norm, signature=types | {c: "constexpr" for c in consts}, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
    print("normalize ok", flush=True)


if __name__ == "__main__":
    _compile_all()
