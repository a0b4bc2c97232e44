"""The KV pool accounts for every block through any mix of sequence lifecycles."""

from __future__ import annotations

import random
from collections import Counter

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


@pytest.mark.parametrize("seed", range(10))
def test_random_forks_count_every_holder(seed):
    """Tables forked from others hold blocks together: a block is free exactly when no
    table holds it, and every one is free once they all let go."""
    rng = random.Random(seed)
    pool = make_pool(num_blocks=rng.randint(8, 64), block_size=rng.choice([1, 4, 16]))
    live: list[BlockTable] = []
    for _ in range(300):
        op = rng.choice(["new", "extend", "fork", "fork", "unshare", "free"])
        if op == "new" or not live:
            live.append(BlockTable(pool))
            continue
        table = rng.choice(live)
        try:
            if op == "extend":
                target = table.num_tokens + rng.randint(1, 2 * pool.block_size)
                table.reserve(target)
                table.commit(target)
            elif op == "fork":
                live.append(table.fork())
            elif op == "unshare":
                table.unshare_from(rng.randint(0, table.num_tokens))
            else:
                table.free()
                live.remove(table)
        except OutOfBlocks:
            pass
        holders = Counter(b for t in live for b in t.blocks)
        assert all(pool.refs(b) == holders[b] for b in range(pool.num_blocks))
        assert pool.num_free == sum(holders[b] == 0 for b in range(pool.num_blocks))
        assert all(t.capacity >= t.num_tokens for t in live)
    for table in live:
        table.free()
    assert sorted(pool._free) == list(range(pool.num_blocks))


def test_a_fork_shares_full_blocks_and_copies_the_partial_one():
    pool = make_pool(num_blocks=8, block_size=4)
    table = BlockTable(pool)
    table.reserve(10)
    table.commit(10)
    for kv in pool.kv:
        kv.copy_(torch.randn_like(kv))
    fork = table.fork()
    assert fork.num_tokens == 10
    assert fork.blocks[:2] == table.blocks[:2] and fork.blocks[2] != table.blocks[2]
    assert [pool.refs(b) for b in fork.blocks] == [2, 2, 1]
    src, dst = table.blocks[2] * 4, fork.blocks[2] * 4
    for kv in pool.kv:  # the committed slots of the partial block, in every layer
        assert torch.equal(kv[dst : dst + 2], kv[src : src + 2])
    table.free()
    assert [pool.refs(b) for b in fork.blocks] == [1, 1, 1]
    assert pool.num_free == 8 - 3
    fork.free()
    assert pool.num_free == 8


def test_a_fork_of_whole_blocks_takes_none_and_a_failed_fork_takes_nothing():
    pool = make_pool(num_blocks=3, block_size=4)
    table = BlockTable(pool)
    table.reserve(8)
    table.commit(8)
    whole = table.fork()
    assert whole.blocks == table.blocks and pool.num_free == 1
    table.reserve(9)
    table.commit(9)
    with pytest.raises(OutOfBlocks):
        table.fork()
    assert pool.num_free == 0 and [pool.refs(b) for b in table.blocks] == [2, 2, 1]
    with pytest.raises(ValueError):
        pool.release([table.blocks[2]] * 2)  # one holder can let go once


def test_unsharing_lets_go_of_shared_blocks_from_the_write_position():
    pool = make_pool(num_blocks=8, block_size=4)
    table = BlockTable(pool)
    table.reserve(12)
    table.commit(12)
    other = table.fork()  # shares all three
    other.unshare_from(13)  # writes past every shared block: nothing to do
    assert other.blocks == table.blocks and other.num_tokens == 12
    other.unshare_from(6)  # writes from inside the second block
    assert other.blocks == table.blocks[:1] and other.num_tokens == 4
    assert [pool.refs(b) for b in table.blocks] == [2, 1, 1]
