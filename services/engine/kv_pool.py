"""Paged KV cache: one pool of fixed-size blocks shared by every sequence.

The pool is pure mechanism: it hands out block ids, counts who holds them, and keeps
the key/value tensors. Which sequence holds which blocks lives in each sequence's
`BlockTable`. Rolling back rejected draft tokens never touches the pool: the
table's length goes back and the next write overwrites the slots.

A block may be held by several tables (the choices of one request share their prompt's,
`BlockTable.fork`); it is free again when the last lets go. A shared block is never
written: only blocks full of committed tokens are shared, and no table writes below
its committed length except where it goes back to, which is never below its prompt
(rolled-back drafts) or is first made its own (`BlockTable.unshare_from`).
"""

from __future__ import annotations

from collections import Counter

import torch

from selfspec_kernels import cpu_memory


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request needs right now."""


class KVPool:
    """Key/value storage for every layer, cut into `num_blocks` blocks of `block_size` slots.

    `kv[layer]` has shape `[num_blocks * block_size, 2 * kv_dim]`: one row per token
    slot, keys then values, so a layer writes and gathers both with one index op.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        kv_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one slot")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Zeros, not empty: padded attention reads unused slots with weight 0, and
        # 0 * NaN from uninitialised memory would poison the output. On the CPU, one
        # allocation on huge pages, which a step reads faster (`selfspec_kernels.cpu_memory`).
        shape = (num_layers, num_blocks * block_size, 2 * kv_dim)
        if torch.device(device).type == "cpu":
            kv = cpu_memory.zeros(shape, dtype)
        else:
            kv = torch.zeros(shape, dtype=dtype, device=device)
        self.kv = list(kv.unbind(0))
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks  # tables holding each block; 0: free

    @classmethod
    def from_budget(
        cls,
        budget_bytes: int,
        *,
        num_layers: int,
        kv_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVPool:
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_block = num_layers * block_size * 2 * kv_dim * itemsize
        return cls(
            num_layers=num_layers,
            kv_dim=kv_dim,
            num_blocks=max(1, budget_bytes // per_block),
            block_size=block_size,
            dtype=dtype,
            device=device,
        )

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        for b in taken:
            self._refs[b] = 1
        return taken

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of `blocks`, which must be held already."""
        if any(self._refs[b] == 0 for b in blocks):
            raise ValueError("cannot share a free KV block")
        for b in blocks:
            self._refs[b] += 1

    def refs(self, block: int) -> int:
        """How many tables hold `block`."""
        return self._refs[block]

    def release(self, blocks: list[int]) -> None:
        """One holder fewer for each of `blocks`; those no one holds are free again."""
        if any(self._refs[b] < k for b, k in Counter(blocks).items()):
            raise ValueError("cannot release a KV block more often than it is held")
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def copy(self, src: int, dst: int, slots: int) -> None:
        """The first `slots` slots of block `src` into block `dst`, in every layer."""
        a, b = src * self.block_size, dst * self.block_size
        with torch.inference_mode():
            for kv in self.kv:
                kv[b : b + slots] = kv[a : a + slots]


class BlockTable:
    """The blocks one sequence holds, and how many of its slots hold committed KV."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.num_tokens = 0  # slots whose KV is committed for every layer

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def reserve(self, num_tokens: int) -> None:
        """Make room for `num_tokens` slots in all; raises `OutOfBlocks`, taking nothing."""
        missing = self.pool.blocks_for(num_tokens) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(self.pool.allocate(missing))

    def commit(self, num_tokens: int) -> None:
        """Set the committed length; going back is how rejected drafts are rolled back."""
        if not 0 <= num_tokens <= self.capacity:
            raise ValueError(f"cannot commit {num_tokens} tokens in {self.capacity} slots")
        self.num_tokens = num_tokens

    def fork(self) -> BlockTable:
        """A table for another sequence that goes on from the same committed tokens: it
        shares every block full of them and gets its own copy of the partly filled last
        one, which both will write. The shared blocks are never written again: writes go
        at or past `num_tokens`, and rolled-back drafts go back no further than the tokens
        committed here (the prompt), so they stay the same for every holder. Raises
        `OutOfBlocks`, taking nothing."""
        full, partial = divmod(self.num_tokens, self.pool.block_size)
        table = BlockTable(self.pool)
        if partial:
            (copy,) = self.pool.allocate(1)
            self.pool.copy(self.blocks[full], copy, partial)
            table.blocks.append(copy)
        self.pool.share(self.blocks[:full])
        table.blocks[:0] = self.blocks[:full]
        table.num_tokens = self.num_tokens
        return table

    def unshare_from(self, num_tokens: int) -> None:
        """Make the blocks from the one token `num_tokens` goes in on this table's own, to
        write on from there (a session's next turn): from the first shared one, they are
        let go, and the committed length goes back to its start."""
        first = num_tokens // self.pool.block_size
        for i in range(first, len(self.blocks)):
            if self.pool.refs(self.blocks[i]) > 1:
                self.pool.release(self.blocks[i:])
                del self.blocks[i:]
                self.num_tokens = min(self.num_tokens, i * self.pool.block_size)
                return

    def free(self) -> None:
        self.pool.release(self.blocks)
        self.blocks = []
        self.num_tokens = 0
