"""The Triton paged attention against the reference, on ragged batches over a paged pool.

Pool slots no sequence owns hold NaN, so a kernel that reads past a sequence's keys
fails; outputs start as NaN, so a row or column it never writes fails too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from selfspec_kernels import attention
from selfspec_kernels.attention import AttentionBatch
from selfspec_kernels.paged_attention import paged_attention

# Tolerance against a float32 reference on the same rounded inputs: the kernel rounds
# the softmax weights to the input dtype before the second product, as flash kernels do.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOL)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the interpreter


@dataclass(frozen=True)
class Case:
    name: str
    starts: tuple[int, ...]  # tokens already cached per sequence
    lens: tuple[int, ...]  # new tokens per sequence
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 4
    window: int | None = None
    split_keys: int = 256  # key positions per split: 64 splits these small cases


CASES = [
    Case("decode", (0, 7, 29), (1, 1, 1)),
    Case("verify_ragged", (9, 0, 22), (3, 1, 5), heads=8, kv_heads=2, head_dim=32, block_size=16),
    Case("prefill_odd_dim_mqa", (0, 5), (13, 6), heads=4, kv_heads=1, head_dim=24, block_size=3),
    Case("many_query_blocks", (3,), (20,), heads=4, kv_heads=1, block_size=5),
    Case("mha", (11, 2), (2, 4), heads=2, kv_heads=2, block_size=1),
    Case("groups_of_3", (33, 5), (2, 1), heads=6, kv_heads=2, block_size=7),
    Case("llama_head_dim", (40,), (3,), heads=4, kv_heads=1, head_dim=128, block_size=16),
    Case("sliding_window", (70, 10), (4, 2), window=9, block_size=8),
    Case("split_keys", (150, 201, 20), (1, 3, 2), block_size=16, split_keys=64),
    Case("split_keys_window", (180,), (2,), block_size=16, split_keys=64, window=100),
    Case("split_keys_gqa8", (300,), (9,), heads=8, kv_heads=1, block_size=16, split_keys=128),
]


def _setup(case: Case, dtype: torch.dtype, seed: int = 0):
    """A pool with random KV in every owned slot up to each sequence's end, NaN elsewhere,
    block tables drawn at random from it, and random queries."""
    g = torch.Generator().manual_seed(seed)
    ends = [s + n for s, n in zip(case.starts, case.lens, strict=True)]
    per_seq = [-(-e // case.block_size) + 1 for e in ends]  # one spare block each
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in per_seq:
        tables.append(order[at : at + n])
        at += n
    width = 2 * case.kv_heads * case.head_dim
    pool = torch.full((num_blocks * case.block_size, width), float("nan"))
    for table, end in zip(tables, ends, strict=True):
        for pos in range(end):
            slot = table[pos // case.block_size] * case.block_size + pos % case.block_size
            pool[slot] = _nonzero(torch.randn(width, generator=g))
    q = _nonzero(torch.randn(sum(case.lens), case.heads, case.head_dim, generator=g))
    batch = AttentionBatch.build(
        tables, list(case.starts), list(case.lens), case.block_size, sliding_window=case.window
    )
    return q.to(dtype), pool.to(dtype), tables, batch


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, 0.5, x)


def _reference(q, pool, batch, case: Case) -> torch.Tensor:
    """The reference in float32; it reads padding slots, so those must be finite for it."""
    clean = torch.nan_to_num(pool.float(), nan=3.0)
    scale = case.head_dim**-0.5
    return attention.paged_attention_reference(q.float(), clean, batch, case.kv_heads, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case: Case, dtype: torch.dtype) -> None:
    q, pool, _, batch = _setup(case, dtype)
    ref = _reference(q, pool, batch, case)
    out = torch.full((q.shape[0], case.heads * case.head_dim), float("nan"), dtype=dtype)
    dev = _to(batch, DEVICE)
    got = paged_attention(
        q.to(DEVICE),
        pool.to(DEVICE),
        dev,
        case.kv_heads,
        case.head_dim**-0.5,
        split_keys=case.split_keys,
        out=out.to(DEVICE),
    )
    assert got.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), ref, rtol=tol, atol=tol)


def test_default_splits_match_reference() -> None:
    """The default split size, over a context that needs three."""
    case = Case("long_decode", (700,), (1,), heads=8, kv_heads=2, block_size=16)
    q, pool, _, batch = _setup(case, torch.float32, seed=1)
    got = paged_attention(
        q.to(DEVICE), pool.to(DEVICE), _to(batch, DEVICE), case.kv_heads, case.head_dim**-0.5
    )
    ref = _reference(q, pool, batch, case)
    torch.testing.assert_close(got.cpu(), ref, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("split_keys", [64, 256])
def test_batch_invariant(split_keys: int) -> None:
    """A query's output is bit-identical whatever else is in the launch: a drafted token
    verified in a window equals its decode alone, beside a longer sequence or not."""
    case = Case("verify", (61, 190), (5, 2), heads=8, kv_heads=2, block_size=4)
    q, pool, tables, _ = _setup(case, torch.bfloat16, seed=3)
    scale = case.head_dim**-0.5

    def run(seqs: list[int], starts: list[int], lens: list[int], rows) -> torch.Tensor:
        batch = AttentionBatch.build([tables[i] for i in seqs], starts, lens, case.block_size)
        out = paged_attention(
            q[rows].to(DEVICE), pool.to(DEVICE), _to(batch, DEVICE), case.kv_heads, scale,
            split_keys=split_keys,
        )  # fmt: skip
        return out.cpu()

    verified = run([0, 1], [61, 190], [5, 2], slice(None))
    for t in range(5):
        alone = run([0], [61 + t], [1], [t])
        beside_long = run([1, 0], [190, 61 + t], [2, 1], [5, 6, t])
        assert torch.equal(alone[0], verified[t]), t
        assert torch.equal(beside_long[2], verified[t]), t


@pytest.mark.skipif(DEVICE != "cuda", reason="dispatch to Triton is for CUDA tensors")
def test_engine_dispatch_uses_triton_on_cuda() -> None:
    case = CASES[1]
    q, pool, _, batch = _setup(case, torch.bfloat16)
    dev = _to(batch, "cuda")
    got = attention.paged_attention_for("triton")(q.cuda(), pool.cuda(), dev, case.kv_heads, 0.25)
    want = paged_attention(q.cuda(), pool.cuda(), dev, case.kv_heads, 0.25)
    assert torch.equal(got, want)


def test_batches_carry_the_reference_fields_unless_told() -> None:
    assert AttentionBatch.build([[0]], [0], [1], 4).mask is not None
    assert AttentionBatch.build([[0]], [0], [1], 4, reference=False).mask is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_by_query_matches_the_padded_reference(case: Case, dtype: torch.dtype) -> None:
    """The PyTorch backend's few-row path: each query alone over exactly its keys. It
    never reads a slot outside them, so the pool's NaN padding must not reach it."""
    q, pool, tables, full = _setup(case, dtype)
    lean = AttentionBatch.build(tables, list(case.starts), list(case.lens), case.block_size,
                                sliding_window=case.window, reference=False)  # fmt: skip
    got = attention.paged_attention_for("torch")(q, pool, lean, case.kv_heads, case.head_dim**-0.5)
    assert got.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), _reference(q, pool, full, case), rtol=tol, atol=tol)


def test_by_query_is_batch_invariant() -> None:
    """A drafted token verified in a window of 5 beside another sequence gets the bits it
    gets decoded alone."""
    case = Case("verify", (61, 190), (5, 2), heads=8, kv_heads=2, block_size=4)
    q, pool, tables, _ = _setup(case, torch.bfloat16, seed=3)

    def run(seqs, starts, lens, rows):
        batch = AttentionBatch.build([tables[i] for i in seqs], starts, lens, case.block_size,
                                     reference=False)  # fmt: skip
        return attention.paged_attention_for("torch")(q[rows], pool, batch, case.kv_heads, 0.25)

    verified = run([0, 1], [61, 190], [5, 2], slice(None))
    for t in range(5):
        assert torch.equal(run([0], [61 + t], [1], [t])[0], verified[t]), t


def test_kernel_needs_no_reference_fields() -> None:
    """A batch built for the kernels alone (as on CUDA) carries no mask, which only the
    reference reads, and the kernel still matches the reference run on the full batch."""
    case = CASES[1]
    q, pool, tables, full = _setup(case, torch.float32)
    lean = AttentionBatch.build(tables, list(case.starts), list(case.lens), case.block_size,
                                reference=False)  # fmt: skip
    assert lean.mask is None and lean.kv_index is None
    with pytest.raises(ValueError, match="without the reference"):
        attention.paged_attention_reference(q, pool, lean, case.kv_heads, 0.25)
    scale = case.head_dim**-0.5
    got = paged_attention(q.to(DEVICE), pool.to(DEVICE), _to(lean, DEVICE), case.kv_heads, scale)
    tol = TOL[torch.float32]
    torch.testing.assert_close(got.cpu(), _reference(q, pool, full, case), rtol=tol, atol=tol)


def _to(batch: AttentionBatch, device: str) -> AttentionBatch:
    fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()}
    return AttentionBatch(**fields)
