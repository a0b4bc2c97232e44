"""A pass of a few new tokens through a stack of decoder layers, in one call into C++.

A decode or verification pass calls five kernels per layer: the RMSNorm and the q, k, v
projection (`cpu_linear`), RoPE, the KV write and attention (`cpu_attention`), the output
projection plus the residual, the RMSNorm and the gate and up projection with SwiGLU, the
down projection plus the residual. Called from Python, each call costs some microseconds
of interpreter, argument conversion and allocation, and those add up to about a tenth of
a small model's step. `run` makes the same calls, with the same arguments, from one loop
in C++, so its result is the one of the Python loop bit for bit; it lets go of the GIL
while it runs.

It serves models whose matrices are all packed for `cpu_linear` (the `cpu` backend,
`selfspec_kernels.backend`) and whose attention has no q/k norms; `Stack.of` says None
for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec_kernels import cpu_attention
from selfspec_kernels.cpu_build import CPU

__all__ = ["Stack", "run"]


@dataclass(frozen=True)
class Stack:
    """A model's layers as `run` takes them, gathered once at load."""

    weights: list[torch.Tensor]  # per layer, in the order the C++ loop names: LAYER_WEIGHTS
    formats: list[int]  # of each of `weights`: a quantized matrix's ggml type, else -1
    qkv_bias: list[torch.Tensor | None]
    outputs: list[int]  # of the matrices LAYER_OUTPUTS names (gate_up: SwiGLU's)
    heads: tuple[int, int, int]  # H, KV, D
    scale: float
    n_eps: float

    @classmethod
    def of(cls, model) -> Stack | None:
        """The stack of a `services.engine.model.Model`, or None when `run` can't serve it."""
        layers = model.layers
        packed = all(x.kernel is not None for layer in layers for x in layer.linears)
        if not packed or layers[0].q_norm is not None:
            return None
        # The C++ side names what it takes, in order: attributes of the model's layers.
        ops = CPU.ops()
        parts = [getattr(x, name) for x in layers for name in ops.LAYER_WEIGHTS]
        weights, formats = [_tensor(part) for part in parts], [_format(part) for part in parts]
        outputs = [getattr(layers[0], name).kernel.n for name in ops.LAYER_OUTPUTS]
        heads = (model.num_heads, model.num_kv_heads, model.head_dim)
        biases = [layer.qkv.bias for layer in layers]
        return cls(weights, formats, biases, outputs, heads, model.scale, model.n_eps)


def _tensor(part) -> torch.Tensor:
    """A layer's part as the C++ loop takes it: a matrix's packed data, or a norm's gain."""
    kernel = getattr(part, "kernel", None)  # a `Linear`'s; a `Norm` has none
    return part.gain if kernel is None else kernel.data


def _format(part) -> int:
    """The ggml type the C++ loop multiplies a layer's part in: a quantized matrix's, or -1
    (a matrix packed for `cpu_linear`, a norm's gain)."""
    fmt = getattr(getattr(part, "kernel", None), "format", None)
    return -1 if fmt is None else fmt.ggml_type


def run(
    stack: Stack,
    h: torch.Tensor,
    batch,
    kv_cache: list[torch.Tensor],
    rope: torch.Tensor,
    start: int,
    run_attention: list[bool],
    run_mlp: list[bool],
) -> torch.Tensor:
    """Hidden states `[T, hidden]` through layers `start, start + 1, ...`, running layer
    `start + i`'s attention where `run_attention[i]` and its MLP where `run_mlp[i]`. `batch`
    (an `AttentionBatch`) says where the tokens sit; `rope` is `[T, D / 2, 2]`, cos and
    sin of each token's position."""
    H, KV, D = stack.heads
    window = batch.sliding_window or 0
    return CPU.ops().run_layers(
        h,
        stack.weights,
        stack.formats,
        stack.qkv_bias,
        kv_cache,
        stack.outputs,
        start,
        run_attention,
        run_mlp,
        rope,
        batch.slots,
        *cpu_attention.batch_fields(batch),
        H,
        KV,
        D,
        stack.scale,
        window,
        stack.n_eps,
    )
