"""The GGUF quantized-weight CPU kernels: agree with gguf's own dequantizer followed by a
float32 product, and each row's result is bit-identical whatever else is in the batch."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from selfspec_kernels import cpu_attention, cpu_layers, cpu_linear, cpu_quant
from selfspec_kernels.attention_batch import AttentionBatch
from selfspec_kernels.cpu_build import CPU
from selfspec_kernels.cpu_quant import FORMATS

pytestmark = pytest.mark.skipif(
    not cpu_quant.available(),
    reason=f"CPU kernels unavailable: {cpu_quant.unavailable_reason()}",
)

NAMES = list(FORMATS)
K_NAMES = [name for name in NAMES if FORMATS[name].block == 256]
# (N, K): N not a multiple of the 16 outputs a unit of work; K past one 32-block chunk
# (1024 weights). K is rounded up to the format's block (`_k`): 256 for the K formats.
SHAPES = [(1, 32), (7, 96), (35, 1088), (130, 576)]
MS = [1, 2, 3, 4, 5, 8, 11, 16]
# Where the K formats keep their float16 scales: d (and dmin for Q4_K and Q5_K).
K_SCALES = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def _k(name: str, k: int) -> int:
    """`k` rounded up to a multiple of the format's block."""
    block = FORMATS[name].block
    return -(-k // block) * block


def _raw(name: str, n: int, k: int, seed: int) -> np.ndarray:
    """A random [n, k] matrix in format `name`, as its uint8 blocks: quantized by gguf,
    or for the K formats, which gguf can't quantize, random bytes with random float16
    scales of a sane size put in (every byte pattern of the rest is a valid block)."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[name]
    if name not in K_SCALES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        return gguf_quantize(w, gguf.GGMLQuantizationType(fmt.ggml_type))
    blocks = rng.integers(0, 256, (n, k // fmt.block, fmt.nbytes), dtype=np.uint8)
    for at in K_SCALES[name]:
        scale = (rng.standard_normal(blocks.shape[:2]) * 1e-3).astype(np.float16)
        blocks[..., at : at + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


def _reference(name: str, raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(
        gguf_dequantize(raw, gguf.GGMLQuantizationType(FORMATS[name].ggml_type))
    )


def _weights(name: str, n: int, k: int, seed: int = 0, *, swiglu: bool = False):
    """The kernel's matrix and gguf's float32 dequantization of it."""
    raw = _raw(name, n, k, seed)
    q = cpu_quant.quantized(torch.from_numpy(raw), FORMATS[name], k, swiglu=swiglu)
    return q, _reference(name, raw)


def _x(m: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed * 1000 + m * 7 + k))


def _assert_close(y: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    # Both sides accumulate in float32 in different orders: the error grows ~sqrt(K).
    tol = 1e-4 * math.sqrt(k)
    scale = ref.abs().amax().clamp_min(1.0)
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * scale.item())


@pytest.mark.parametrize("name", NAMES)
def test_formats_match_gguf(name):
    fmt = FORMATS[name]
    assert cpu_quant.format_of(fmt.ggml_type) is fmt
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(fmt.ggml_type)] == (
        fmt.block,
        fmt.nbytes,
    )
    assert cpu_quant.format_of(int(gguf.GGMLQuantizationType.Q2_K)) is None


@pytest.mark.parametrize("name", NAMES)
def test_unpack_and_rows_equal_gguf(name):
    q, ref = _weights(name, 35, _k(name, 1088))
    assert ref.abs().amax() > 0.1
    assert torch.equal(q.unpack(), ref)
    index = torch.tensor([34, 0, 17])
    assert torch.equal(q.rows(index), ref[index])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_reference(name, n, k):
    k = _k(name, k)
    q, ref = _weights(name, n, k)
    for m in MS:
        x = _x(m, k)
        y = cpu_quant.linear_q(x, q)
        assert y.shape == (m, n) and y.dtype == torch.float32
        _assert_close(y, x @ ref.T, k)


@pytest.mark.parametrize("name", NAMES)
def test_bias_add_and_norm(name):
    n, k = 35, _k(name, 1088)
    q, ref = _weights(name, n, k)
    x, bias, other = _x(5, k), torch.randn(n), torch.randn(5, n)
    _assert_close(cpu_quant.linear_q(x, q, bias), x @ ref.T + bias, k)
    _assert_close(cpu_quant.linear_q_add(x, q, other), x @ ref.T + other, k)
    _assert_close(cpu_quant.linear_q_add(x, q, other, bias), x @ ref.T + bias + other, k)
    gain, eps = torch.rand(k) + 0.5, 1e-5
    normed = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + k * eps)
    _assert_close(cpu_quant.linear_q(x, q, norm=(gain, k * eps)), (normed * gain) @ ref.T, k)
    _assert_close(cpu_quant.linear_q(x, q, norm=(None, k * eps)), normed @ ref.T, k)
    # The fused add is the plain product followed by the add, exactly.
    assert torch.equal(cpu_quant.linear_q_add(x, q, other), cpu_quant.linear_q(x, q) + other)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m", [1, 2, 7])
def test_swiglu(name, m):
    n, k = 21, _k(name, 576)
    q, ref = _weights(name, 2 * n, k, swiglu=True)
    assert q.n == n
    x, gain = _x(m, k), torch.rand(k) + 0.5
    want = F.silu(x @ ref[:n].T) * (x @ ref[n:].T)
    _assert_close(cpu_quant.linear_q_swiglu(x, q), want, k)
    normed = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + k * 1e-5) * gain
    want = F.silu(normed @ ref[:n].T) * (normed @ ref[n:].T)
    _assert_close(cpu_quant.linear_q_swiglu(x, q, norm=(gain, k * 1e-5)), want, k)


@pytest.mark.parametrize("name", ["q8_0", "q4_1", "q5_0", *K_NAMES])
def test_row_invariance(name):
    """Row r of an m-row product equals the 1-row product of x[r], bit for bit, for every
    m, among any other rows, fused epilogues included, with 1 thread or more."""
    n, k = 37, _k(name, 1088)
    q, _ = _weights(name, n, k, seed=1)
    gate_up, _ = _weights(name, 2 * n, k, seed=2, swiglu=True)
    x, other, residual = _x(16, k, seed=1), _x(16, k, seed=2), torch.randn(16, n)
    gain = torch.rand(k) + 0.5
    calls = {
        "plain": lambda x, o: cpu_quant.linear_q(x, q),
        "norm": lambda x, o: cpu_quant.linear_q(x, q, norm=(gain, k * 1e-5)),
        "add": lambda x, o: cpu_quant.linear_q_add(x, q, o),
        "swiglu": lambda x, o: cpu_quant.linear_q_swiglu(x, gate_up, norm=(gain, k * 1e-5)),
    }
    for call, fn in calls.items():
        single = [fn(x[r : r + 1].clone(), residual[r : r + 1].clone())[0] for r in range(16)]
        for m in range(1, 17):
            y = fn(x[:m].contiguous(), residual[:m].contiguous())
            for r in range(m):
                assert torch.equal(y[r], single[r]), (call, m, r)
            mixed = other[:m].clone()
            mixed[m - 1] = x[0]
            res = residual[:m].clone()
            res[m - 1] = residual[0]
            assert torch.equal(fn(mixed, res)[m - 1], single[0]), (call, m)


def test_deterministic_threads_and_strided_rows():
    q, _ = _weights("q4_1", 300, 576)
    x = _x(6, 576)
    y = cpu_quant.linear_q(x, q)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_quant.linear_q(x, q)
        torch.set_num_threads(2)
        two = [cpu_quant.linear_q(x, q) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(t, one) for t in [y, *two])
    wide = torch.zeros(6, 600)
    wide[:, :576] = x
    assert torch.equal(cpu_quant.linear_q(wide[:, :576], q), y)
    assert cpu_quant.linear_q(torch.empty(0, 576), q).shape == (0, 300)


def test_rejects_bad_inputs():
    fmt = FORMATS["q4_1"]
    raw = torch.from_numpy(_raw("q4_1", 7, 96, 0))
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_quant.quantized(raw, fmt, 95)
    with pytest.raises(ValueError, match="is 60 bytes, got 59"):
        cpu_quant.quantized(raw[:, :59], fmt, 96)
    with pytest.raises(ValueError, match="is 54 bytes, got 60"):
        cpu_quant.quantized(raw, FORMATS["q4_0"], 96)
    with pytest.raises(ValueError, match="2-D uint8"):
        cpu_quant.quantized(raw.float(), fmt, 96)
    with pytest.raises(ValueError, match="even number of rows"):
        cpu_quant.quantized(raw, fmt, 96, swiglu=True)
    q = cpu_quant.quantized(raw, fmt, 96)
    with pytest.raises(ValueError, match=r"take float32 \[m, 96\]"):
        cpu_quant.linear_q(torch.randn(2, 64), q)
    with pytest.raises(ValueError, match="swiglu=True"):
        cpu_quant.linear_q_swiglu(torch.randn(2, 96), q)
    with pytest.raises(ValueError, match=r"float64: the weights take float32"):
        cpu_quant.linear_q(torch.randn(2, 96).double(), q)
    with pytest.raises(RuntimeError, match="residual"):
        cpu_quant.linear_q_add(torch.randn(2, 96), q, torch.randn(2, 6))
    # The C++ side checks what it is given too: a row length that is not the format's,
    # a format it has no kernel for.
    with pytest.raises(RuntimeError, match="of ggml type 3 is 60 bytes, got 57"):
        cpu_quant.linear_q(
            torch.randn(2, 96), cpu_quant.Quantized(raw[:, :57].contiguous(), fmt, 7, 96)
        )
    q2_k = cpu_quant.Format("q2_k", int(gguf.GGMLQuantizationType.Q2_K), 256, 84)
    q = cpu_quant.Quantized(torch.zeros(2, 84, dtype=torch.uint8), q2_k, 2, 256)
    with pytest.raises(RuntimeError, match="no kernel for ggml type 10"):
        cpu_quant.linear_q(torch.randn(2, 256), q)


@pytest.mark.parametrize("name", K_NAMES)
def test_k_formats_take_multiples_of_256(name):
    fmt = FORMATS[name]
    raw = torch.from_numpy(_raw(name, 3, 512, 0))
    with pytest.raises(ValueError, match="multiple of 256, got 288"):
        cpu_quant.quantized(raw, fmt, 288)
    one_block = raw[:, : fmt.nbytes].contiguous()
    q = cpu_quant.Quantized(one_block, fmt, 3, 288)  # past the Python checks
    with pytest.raises(RuntimeError, match="multiple of 256, got 288"):
        cpu_quant.linear_q(torch.randn(2, 288), q)


def test_the_format_is_told_not_inferred():
    """A Q4_K row of 256 weights and a Q4_0 row of 256 are both 144 bytes: the same bytes
    multiply as the format the matrix says."""
    raw = _raw("q4_0", 9, 256, 3)
    raw[:, 2:4] = np.array([1e-3], dtype=np.float16).view(np.uint8)  # Q4_K's dmin
    x = _x(3, 256)
    ys = {}
    for name in ["q4_0", "q4_k"]:
        q = cpu_quant.quantized(torch.from_numpy(raw), FORMATS[name], 256)
        ys[name] = cpu_quant.linear_q(x, q)
        _assert_close(ys[name], x @ _reference(name, raw).T, 256)
    assert not torch.allclose(ys["q4_0"], ys["q4_k"], rtol=0.1, atol=0.1)


# A small model for the C++ layer loop: hidden 256, 4 heads and 2 KV heads of 64, MLP 512
# (every K a multiple of the K formats' 256).
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 256, 4, 2, 64, 512


def _layer(index: int, names: list[str]) -> tuple[list, torch.Tensor]:
    """Layer `index`'s tensors in LAYER_WEIGHTS order, each matrix in the format `names` gives
    it ("bf16": packed for cpu_linear), and its q, k, v bias."""
    rows = {
        "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
        "o": (HIDDEN, HEADS * HEAD_DIM),
        "gate_up": (2 * INTER, HIDDEN),
        "down": (HIDDEN, INTER),
    }
    parts = {}
    for i, (part, (n, k)) in enumerate(rows.items()):
        name, swiglu, seed = names[(index + i) % len(names)], part == "gate_up", 10 * index + i
        if name == "bf16":
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
            parts[part] = cpu_linear.pack(w.bfloat16(), swiglu=swiglu)
        else:
            parts[part], _ = _weights(name, n, k, seed, swiglu=swiglu)
    gen = torch.Generator().manual_seed(index)
    parts["attn_norm"] = torch.rand(HIDDEN, generator=gen) + 0.5
    parts["mlp_norm"] = torch.rand(HIDDEN, generator=gen) + 0.5
    return [parts[name] for name in CPU.ops().LAYER_WEIGHTS], torch.randn(
        rows["qkv"][0], generator=gen
    )


def _kernels(w) -> tuple:
    """The Python entry points for matrix w: product, product + residual, SwiGLU."""
    if isinstance(w, cpu_linear.Packed):
        return cpu_linear.linear_bf16, cpu_linear.linear_bf16_add, cpu_linear.linear_bf16_swiglu
    return cpu_quant.linear_q, cpu_quant.linear_q_add, cpu_quant.linear_q_swiglu


def _python_layers(h, layers, biases, pool, batch, rope, n_eps, scale):
    """The layer loop as Python calls to the kernels, each by its matrix's kind."""
    for (qkv, attn_norm, o, gate_up, mlp_norm, down), bias, kv in zip(
        layers, biases, pool, strict=True
    ):
        qkv_out = _kernels(qkv)[0](h, qkv, bias, norm=(attn_norm, n_eps))
        heads = (HEADS, KV_HEADS, HEAD_DIM)
        out = cpu_attention.rope_attention(qkv_out, kv, batch, rope, heads, scale)
        h = _kernels(o)[1](out, o, h)
        a = _kernels(gate_up)[2](h, gate_up, norm=(mlp_norm, n_eps))
        h = _kernels(down)[1](a, down, h)
    return h


@pytest.mark.parametrize(
    "names",
    [
        ["q4_1"],
        ["q8_0", "q4_0", "q5_0", "q5_1"],
        ["q4_1", "bf16"],
        ["q4_k"],
        ["q5_k", "q6_k", "q4_0", "bf16", "q4_k"],
    ],
)
def test_run_layers_matches_the_python_calls(names):
    """The C++ layer loop on quantized matrices (or a mix with bfloat16 ones) gives the
    bits of the Python sequence of kernel calls, the keys and values written included."""
    layers, biases = zip(*[_layer(i, names) for i in range(3)], strict=True)
    gen = torch.Generator().manual_seed(0)
    block_size, kv_width = 16, 2 * KV_HEADS * HEAD_DIM
    pool = [torch.randn(32 * block_size, kv_width, generator=gen).bfloat16() for _ in layers]
    batch = AttentionBatch.build(
        [list(range(0, 6)), list(range(31, 10, -1))], [37, 200], [1, 4], block_size, reference=False
    )
    angles = batch.positions[:, None].float() * torch.rand(HEAD_DIM // 2, generator=gen)
    rope = torch.stack([angles.cos(), angles.sin()], -1).contiguous()
    h = torch.randn(5, HIDDEN, generator=gen)
    n_eps, scale = HIDDEN * 1e-5, HEAD_DIM**-0.5
    weights = [getattr(w, "data", w) for layer in layers for w in layer]  # gains as they are
    formats = [getattr(w, "format", None) for layer in layers for w in layer]
    formats = [-1 if f is None else f.ggml_type for f in formats]  # bfloat16, gains: -1
    named = dict(zip(CPU.ops().LAYER_WEIGHTS, layers[0], strict=True))
    outputs = [named[name].n for name in CPU.ops().LAYER_OUTPUTS]
    heads = (HEADS, KV_HEADS, HEAD_DIM)
    stack = cpu_layers.Stack(weights, formats, list(biases), outputs, heads, scale, n_eps)
    cpp_pool = [kv.clone() for kv in pool]
    got = cpu_layers.run(stack, h, batch, cpp_pool, rope, 0, [True] * 3, [True] * 3)
    want = _python_layers(h, layers, biases, pool, batch, rope, n_eps, scale)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cpp_pool, pool, strict=True))
