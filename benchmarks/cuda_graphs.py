"""CUDA graphs for fixed-shape steps: capture a step once per shape, replay it after.

A draft step at small batch is hundreds of short kernels, and launching them costs more
than running them; a replayed graph launches them all at once. `StepGraphs` keeps one
graph per key (the caller's shape bucket, e.g. batch size and draft length) and
replays it on fresh inputs copied into the captured ones.

What a captured step must satisfy (none of it is checked here):
- it is a function of its tensor arguments and of state that stays put (weights, the
  KV pool), and returns a tensor or a tuple of tensors, the same shapes for one key;
- it never synchronises with the host: no `.item()`, `.tolist()`, `.cpu()`, no
  data-dependent shapes; the Triton kernels in `selfspec_kernels/` qualify;
- every input tensor, including those inside an `AttentionBatch`, is among `inputs`,
  so that replay sees the new step's values. For attention that means a batch built
  for a fixed capacity (block tables padded to the bucket's width, `kv_len` the
  bucket's bound): the Triton kernel reads each sequence's true length from `starts`
  and `q_lens`, and uses `kv_len` only to choose its split count.

The outputs are the graph's own tensors, overwritten by the next replay of the same
key: copy what must outlive it. Off CUDA, or with `enabled=False`, the step just runs.
The engine does not use it: `selfspec bench kernels` (`benchmarks/kernels.py`) times
model steps with it, and `tests/gpu` checks a replayed model step equals the eager one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: Outputs


class StepGraphs:
    """Graphs of `step(*inputs)`, one per key, sharing one memory pool."""

    def __init__(self, step: Callable[..., Outputs], *, warmup: int = 2, enabled: bool = True):
        self.step = step
        self.warmup = warmup
        self.enabled = enabled
        self._graphs: dict[Hashable, _Captured] = {}
        self._pool = None

    def __call__(self, key: Hashable, *inputs: torch.Tensor) -> Outputs:
        if not (self.enabled and inputs and inputs[0].is_cuda):
            return self.step(*inputs)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs)
        else:
            for mine, new in zip(captured.inputs, inputs, strict=True):
                mine.copy_(new)
        captured.graph.replay()
        return captured.outputs

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(x.clone() for x in inputs)
        # Warm up on a side stream, as capture requires: lazy initialisation (cuBLAS
        # handles, Triton compilation) must not happen inside the graph.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.step(*static)
        return _Captured(graph, static, outputs)
