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
`kernels.backend`) and whose attention has no q/k norms; `Stack.of` says None
for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import cpu_attention
from kernels.cpu_build import CPU

__all__ = ["Stack", "run"]

SOURCE = r"""
namespace layers {

// Bits of a layer's entry in `plan`.
constexpr int64_t ATTENTION = 1, MLP = 2;
constexpr int64_t PER_LAYER = 6;  // qkv, attention gain, o, gate_up, MLP gain, down

at::Tensor run_layers(at::Tensor h, const std::vector<at::Tensor>& weights,
                      const std::vector<std::optional<at::Tensor>>& qkv_bias,
                      const std::vector<at::Tensor>& kv, const std::vector<int64_t>& outputs,
                      int64_t start, const std::vector<int64_t>& plan, const at::Tensor& rope,
                      const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& starts,
                      const at::Tensor& q_lens, const at::Tensor& q_offsets, int64_t block_size,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                      int64_t window, double n_eps) {
  const int64_t L = kv.size();
  TORCH_CHECK(int64_t(weights.size()) == PER_LAYER * L && int64_t(qkv_bias.size()) == L,
              "cpu_layers: ", PER_LAYER, " matrices and gains and a bias per layer, got ",
              weights.size(), " and ", qkv_bias.size(), " for ", L, " layers");
  TORCH_CHECK(outputs.size() == 4, "cpu_layers: outputs of qkv, o, gate_up and down");
  TORCH_CHECK(start >= 0 && start + int64_t(plan.size()) <= L, "cpu_layers: layers ", start,
              "..", start + int64_t(plan.size()), " of ", L);
  pybind11::gil_scoped_release no_gil;
  const std::optional<at::Tensor> none;
  for (int64_t i = 0; i < int64_t(plan.size()); ++i) {
    const int64_t l = start + i;
    const at::Tensor* w = &weights[PER_LAYER * l];
    if (plan[i] & ATTENTION) {
      const at::Tensor qkv = linear::linear_bf16_epi(h, w[0], outputs[0], qkv_bias[l], none, true,
                                                     w[1], n_eps, linear::EPI_NONE);
      const at::Tensor out = attention::paged_attention(
          qkv, kv[l], rope, slots, tables, starts, q_lens, q_offsets, block_size, num_heads,
          num_kv_heads, head_dim, scale, window);
      h = linear::linear_bf16_epi(out, w[2], outputs[1], none, h, false, none, 0.0,
                                  linear::EPI_ADD);
    }
    if (plan[i] & MLP) {
      const at::Tensor a = linear::linear_bf16_epi(h, w[3], outputs[2], none, none, true, w[4],
                                                   n_eps, linear::EPI_SWIGLU);
      h = linear::linear_bf16_epi(a, w[5], outputs[3], none, h, false, none, 0.0,
                                  linear::EPI_ADD);
    }
  }
  return h;
}

}  // namespace layers

using layers::run_layers;
"""

FUNCTIONS = ["run_layers"]

ATTENTION, MLP = 1, 2  # bits of a layer's entry in the plan: keep in step with the C++


@dataclass(frozen=True)
class Stack:
    """A model's layers as `run` takes them, gathered once at load."""

    weights: list[torch.Tensor]  # per layer: qkv, attention gain, o, gate_up, MLP gain, down
    qkv_bias: list[torch.Tensor | None]
    outputs: list[int]  # of qkv, o, gate_up (SwiGLU's), down
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
        weights = [
            t
            for layer in layers
            for t in (
                layer.qkv.kernel.data,
                layer.attn_norm.gain,
                layer.o.kernel.data,
                layer.gate_up.kernel.data,
                layer.mlp_norm.gain,
                layer.down.kernel.data,
            )
        ]
        first = layers[0]
        outputs = [x.kernel.n for x in first.linears]
        heads = (model.num_heads, model.num_kv_heads, model.head_dim)
        biases = [layer.qkv.bias for layer in layers]
        return cls(weights, biases, outputs, heads, model.scale, model.n_eps)


def run(
    stack: Stack,
    h: torch.Tensor,
    batch,
    kv_cache: list[torch.Tensor],
    rope: torch.Tensor,
    start: int,
    plan: list[int],
) -> torch.Tensor:
    """Hidden states `[T, hidden]` through layers `start, start + 1, ...`: `plan` has one
    entry per layer, its `ATTENTION` and `MLP` bits saying which sublayers run. `batch`
    (an `AttentionBatch`) says where the tokens sit; `rope` is `[T, D / 2, 2]`, cos and
    sin of each token's position."""
    H, KV, D = stack.heads
    window = batch.sliding_window or 0
    return CPU.ops().run_layers(
        h,
        stack.weights,
        stack.qkv_bias,
        kv_cache,
        stack.outputs,
        start,
        plan,
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
