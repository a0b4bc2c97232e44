"""The KV pool accounts for every block through any mix of sequence lifecycles."""

from __future__ import annotations

import random

import pytest
import torch

from services.engine.kv_pool import BlockTable, KVPool, OutOfBlocks


def make_pool(num_blocks: int = 64, block_size: int = 4) -> KVPool:
    return KVPool(
        num_layers=2, kv_dim=8, num_blocks=num_blocks, block_size=block_size, dtype=torch.float32
    )


@pytest.mark.parametrize("seed", range(20))
def test_random_lifecycles_keep_exact_accounting(seed):
    rng = random.Random(seed)
    pool = make_pool(num_blocks=rng.randint(8, 64), block_size=rng.choice([1, 4, 16]))
    live: list[BlockTable] = []
    for _ in range(400):
        op = rng.choice(["new", "extend", "rollback", "finish", "fail"])
        if op == "new" or not live:
            live.append(BlockTable(pool))
            continue
        table = rng.choice(live)
        if op == "extend":
            target = table.num_tokens + rng.randint(1, 3 * pool.block_size)
            before = (list(table.blocks), pool.num_free)
            try:
                table.reserve(target)
                table.commit(target)
            except OutOfBlocks:
                assert (table.blocks, pool.num_free) == before  # a failed reserve takes nothing
        elif op == "rollback":
            table.commit(rng.randint(0, table.num_tokens))
            assert table.capacity >= table.num_tokens
        else:  # finish and fail both hand every block back
            table.free()
            live.remove(table)
        held = [b for t in live for b in t.blocks]
        assert len(held) == len(set(held)), "a block is held twice"
        assert len(held) + pool.num_free == pool.num_blocks
        assert all(0 <= b < pool.num_blocks for b in held)
    for table in live:
        table.free()
    assert pool.num_free == pool.num_blocks
    assert sorted(pool._free) == list(range(pool.num_blocks))


def test_attention_writes_go_to_the_slots_of_each_block_table():
    from selfspec_kernels.attention import AttentionBatch

    pool = make_pool(num_blocks=8, block_size=4)
    a, b = BlockTable(pool), BlockTable(pool)
    a.reserve(5)
    b.reserve(3)
    a.reserve(9)  # a's blocks are not contiguous: b took one in between
    bs = pool.block_size
    batch = AttentionBatch.build([a.blocks, b.blocks], [0, 1], [9, 2], bs)
    want_a = [a.blocks[p // bs] * bs + p % bs for p in range(9)]
    want_b = [b.blocks[p // bs] * bs + p % bs for p in range(1, 3)]
    assert batch.slots.tolist() == want_a + want_b
    assert not set(want_a) & set(want_b)


def test_commit_beyond_capacity_is_refused():
    table = BlockTable(make_pool())
    table.reserve(4)
    with pytest.raises(ValueError):
        table.commit(5)


def test_pool_from_budget():
    """As many blocks as the budget holds, measured on the tensors allocated."""
    budget = 1 << 20
    pool = KVPool.from_budget(budget, num_layers=2, kv_dim=8, block_size=16, dtype=torch.float32)
    used = sum(t.numel() * t.element_size() for t in pool.kv)
    assert used <= budget < used + used // pool.num_blocks
