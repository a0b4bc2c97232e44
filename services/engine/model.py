"""Our own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

Written for what `transformers` modules do not give us: running any subset of
sublayers (the draft), a paged KV cache, and one pass over a ragged batch of
sequences. Tokens of all sequences are flattened to `[T, hidden]`, so every
matrix product runs once per layer for the whole batch.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from kernels import cpu_attention, cpu_layers, cpu_linear, cpu_memory
from kernels.attention import AttentionBatch, paged_attention, write_kv
from kernels.backend import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Norm:
    """An RMSNorm as `normalize` computes it, then the gain (which holds the sqrt(n)
    `normalize` leaves out; None when folded into the next product's weights)."""

    gain: torch.Tensor | None
    n_eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.n_eps)
        return x if self.gain is None else x * self.gain


class Linear:
    """A weight prepared once at load for its backend's product (`kernels.backend`).

    `cpu`: our AVX2 kernel's layout, which reads each bfloat16 weight once for all rows
    and fuses the RMSNorm before the product too; `onednn`: oneDNN's packed layout, which
    reads weights faster than `F.linear` and fuses the op that follows; `torch`:
    `F.linear`; `triton`: `kernels.triton_linear`. Our kernels and Triton's give each row
    the same result whatever the number of rows, which keeps drafting exact; oneDNN and
    `F.linear` don't, so few-row passes (`bulk` False) call them one row at a time.

    `swiglu`: the weight is `[gate; up]`, multiplied by `swiglu()`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        impl: str = "torch",
        swiglu: bool = False,
    ) -> None:
        self.impl = impl
        self.bias = bias
        self.weight: torch.Tensor | None = weight
        self.packed = None  # oneDNN's layout
        self.kernel: cpu_linear.Packed | None = None  # our kernel's layout
        if impl == "cpu":
            self.kernel = cpu_linear.pack(weight, swiglu=swiglu)
            self.weight = None
        elif impl == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.weight = None

    def _one(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T + bias (+ other)` in one call of oneDNN or `F.linear`."""
        if self.packed is not None:
            if other is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.packed, self.bias, "add"
            )
        # Our kernel's weights widened: for prefill, where many rows make the product
        # compute-bound and MKL's float32 GEMM beats a kernel made for few rows.
        w = self.kernel.unpack().float() if self.kernel is not None else self.weight
        y = F.linear(x, w, self.bias)
        return y if other is None else y + other

    def _rows(self, x, bulk: bool, norm: Norm | None = None, other=None) -> torch.Tensor:
        """`norm(x) @ W.T + bias (+ other)` through `_one`: in one call for bulk passes,
        else one row at a time for `onednn` and `torch` (the norm too: its reduction may
        also change with the number of rows)."""
        if bulk or x.shape[0] == 1 or self.impl == "cpu":
            rows = [(x, other)]
        else:
            others = [None] * len(x) if other is None else other.split(1)
            rows = zip(x.split(1), others, strict=True)
        out = [self._one(r if norm is None else norm(r), o) for r, o in rows]
        return out[0] if len(out) == 1 else torch.cat(out)

    def __call__(self, x: torch.Tensor, bulk: bool = False, norm: Norm | None = None):
        """`norm(x) @ W.T + bias`; `bulk`: many rows (prefill)."""
        if self.kernel is not None and not bulk:
            return cpu_linear.linear_bf16(x, self.kernel, self.bias, norm=_pair(norm))
        if self.impl == "triton":
            return _triton().linear(x, self.weight, self.bias, norm=_pair(norm))
        return self._rows(x, bulk, norm)

    def add(self, x: torch.Tensor, other: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """`self(x) + other` in one op."""
        if self.kernel is not None and not bulk:
            return cpu_linear.linear_bf16_add(x, self.kernel, other, self.bias)
        if self.impl == "triton":
            return _triton().linear_add(x, self.weight, other, self.bias)
        return self._rows(x, bulk, other=other)

    def swiglu(self, x: torch.Tensor, bulk: bool = False, norm: Norm | None = None):
        """`silu(norm(x) @ gate.T) * (norm(x) @ up.T)`."""
        if self.kernel is not None and not bulk:
            return cpu_linear.linear_bf16_swiglu(x, self.kernel, norm=_pair(norm))
        if self.impl == "triton":
            return _triton().linear_swiglu(x, self.weight, norm=_pair(norm))
        gate, up = self(x, bulk, norm).chunk(2, -1)
        return F.silu(gate) * up

    def rows(self, index: torch.Tensor) -> torch.Tensor | None:
        """Rows `index` of the weight, or None where oneDNN holds it."""
        if self.kernel is not None:
            return self.kernel.rows(index)
        return None if self.weight is None else self.weight[index]


def _pair(norm: Norm | None) -> cpu_linear.Norm | None:
    return None if norm is None else (norm.gain, norm.n_eps)


@functools.cache
def _triton():
    """`kernels.triton_linear`, imported on first use: Triton picks its interpreter when a
    kernel is defined, so only once the process has chosen (`TRITON_INTERPRET`)."""
    from kernels import triton_linear

    return triton_linear


@dataclass
class Layer:
    attn_norm: Norm
    mlp_norm: Norm
    qkv: Linear  # q and k rows permuted so RoPE is one complex product
    o: Linear
    gate_up: Linear  # [gate; up], multiplied by `swiglu`
    down: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    @property
    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        """The matrices in the order a pass reads them."""
        return self.qkv, self.o, self.gate_up, self.down


@dataclass(frozen=True)
class LayerPlan:
    """Which sublayers a pass skips. The empty plan is the full model."""

    skip_attn: frozenset[int] = field(default_factory=frozenset)
    skip_mlp: frozenset[int] = field(default_factory=frozenset)

    @property
    def first_skipped(self) -> int | None:
        """Layers before this one compute exactly what the full model does."""
        skipped = self.skip_attn | self.skip_mlp
        return min(skipped) if skipped else None


FULL = LayerPlan()


def normalize(x: torch.Tensor, n_eps: float) -> torch.Tensor:
    """RMS normalisation up to a factor sqrt(n) and the gain, which are folded into
    the next product's weights: four cheap ops instead of six."""
    s = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.rsqrt(torch.addcmul(torch.full_like(s, n_eps), s, s))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def interleave_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from (x_0..x_{d/2-1}, y_0..) to (x_0, y_0, x_1, ...), the
    pairs that rotate together in RoPE. q and k get the same order, so q·k is unchanged."""
    d = w.shape[0] // heads
    idx = torch.arange(d).view(2, d // 2).t().flatten()
    return w.view(heads, d, *w.shape[1:])[:, idx].reshape(w.shape)


class Model:
    """Weights and forward pass; holds no per-request state."""

    def __init__(self, config, tensors: dict[str, torch.Tensor], backend: Backend) -> None:
        c = config
        self.config = config
        self.backend = backend
        self.device = torch.device(backend.device)
        self.dtype = backend.compute
        self.num_layers = c.num_hidden_layers
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.vocab_size = c.vocab_size
        self.max_positions = c.max_position_embeddings
        self.sliding_window = c.sliding_window if _uses_window(c) else None
        self.scale = self.head_dim**-0.5
        self.eps = c.rms_norm_eps
        self.n_eps = c.hidden_size * c.rms_norm_eps
        self._dtype = backend.dtype
        self._tensors = tensors
        # Matrices stay in the requested dtype where our kernel multiplies them as they are;
        # otherwise they are rounded to it, then held in the compute dtype with the RMSNorm
        # gains folded in (exact in float32, and one op fewer per norm).
        kernel = backend.linear == "cpu"
        self.store_dtype = backend.dtype if kernel else self.dtype
        self.fold = not kernel
        # The KV cache is kept like the matrices: our CPU attention kernel widens bfloat16
        # keys and values as it reads them, which halves what long contexts read.
        self.kv_dtype = self.store_dtype
        # Tied checkpoints may store the shared matrix under either name.
        embed, head = "model.embed_tokens.weight", "lm_head.weight"
        self.embed = self._w(embed if embed in tensors else head)
        head_weight = self._w(head if head in tensors else embed, gain="model.norm.weight")
        self.final = self._norm("model.norm.weight")
        self.head = self.linear(head_weight)
        # oneDNN's layout can't give rows back: keep the matrix for `head_rows`.
        self._head_weight = head_weight if self.head.packed is not None else None
        self.layers = [self._layer(f"model.layers.{i}.") for i in range(self.num_layers)]
        self.rope = _rope_table(c, self.head_dim, self.device)
        self._onto_huge_pages()
        # Few-token passes through our CPU kernels run all their layers in one C++ call.
        self.stack = cpu_layers.Stack.of(self) if backend.linear == "cpu" else None
        log.info("compute path: %s%s", backend, "" if self.stack is None else ", C++ layer loop")
        del self._tensors

    def linear(self, weight, bias=None, *, swiglu: bool = False) -> Linear:
        """A matrix prepared for this model's backend."""
        return Linear(weight, bias, impl=self.backend.linear, swiglu=swiglu)

    def attention_batch(self, tables, starts, lengths, block_size: int, bulk: bool = False):
        """Where a pass's tokens sit (`AttentionBatch.build`), with what this backend's
        attention reads: the padded reference's fields for `bulk` passes (prefill, many
        rows), none for few-row passes and for the Triton kernels, which do without."""
        return AttentionBatch.build(
            tables,
            starts,
            lengths,
            block_size,
            sliding_window=self.sliding_window,
            device=self.device,
            reference=bulk and self.backend.attention != "triton",
        )

    def _onto_huge_pages(self) -> None:
        """Our kernel's matrices into one allocation on huge pages (`kernels.cpu_memory`),
        in the order a pass reads them."""
        linears = [x for layer in self.layers for x in layer.linears]
        packed = [x for x in [*linears, self.head] if x.kernel is not None]
        if not packed:
            return
        arena = cpu_memory.empty((sum(x.kernel.data.numel() for x in packed),), torch.bfloat16)
        offset = 0
        for x in packed:
            data = x.kernel.data
            view = arena[offset : offset + data.numel()].view(data.shape).copy_(data)
            x.kernel = replace(x.kernel, data=view)
            offset += data.numel()

    def _w(self, name: str, gain: str | None = None) -> torch.Tensor:
        """A matrix rounded to the requested dtype first, so that float32 arithmetic on
        bfloat16 weights computes the bfloat16 model; `gain` is the RMSNorm before it,
        folded into the columns when `fold`."""
        w = self._tensors[name].to(self._dtype)
        if gain is not None and self.fold:
            w = w.float() * self._gain(gain, force=True)
        return w.to(device=self.device, dtype=self.store_dtype).contiguous()

    def _gain(self, name: str, force: bool = False) -> torch.Tensor | None:
        """An RMSNorm gain with the sqrt(n) that `normalize` leaves out, unless folded."""
        if self.fold and not force:
            return None
        g = self._tensors[name].to(self._dtype).float()
        return (g * g.shape[-1] ** 0.5).to(self.device)

    def _norm(self, name: str) -> Norm:
        return Norm(self._gain(name), self.n_eps)

    def _vector(self, name: str) -> torch.Tensor | None:
        """Biases and q/k norms: small, kept in the compute dtype."""
        if name not in self._tensors:
            return None
        return self._tensors[name].to(self._dtype).to(device=self.device, dtype=self.dtype)

    def _layer(self, p: str) -> Layer:
        a, m = p + "self_attn.", p + "mlp."
        attn_gain, mlp_gain = p + "input_layernorm.weight", p + "post_attention_layernorm.weight"
        H, KV = self.num_heads, self.num_kv_heads
        q = interleave_halves(self._w(a + "q_proj.weight", attn_gain), H)
        k = interleave_halves(self._w(a + "k_proj.weight", attn_gain), KV)
        v = self._w(a + "v_proj.weight", attn_gain)
        bias = None
        if a + "q_proj.bias" in self._tensors:
            qb, kb, vb = (self._vector(a + f"{x}_proj.bias") for x in "qkv")
            bias = torch.cat([interleave_halves(qb, H), interleave_halves(kb, KV), vb])
        q_norm, k_norm = self._vector(a + "q_norm.weight"), self._vector(a + "k_norm.weight")
        gate, up = (self._w(m + f"{x}_proj.weight", mlp_gain) for x in ("gate", "up"))
        return Layer(
            attn_norm=self._norm(attn_gain),
            mlp_norm=self._norm(mlp_gain),
            qkv=self.linear(torch.cat([q, k, v]), bias),
            o=self.linear(self._w(a + "o_proj.weight")),
            gate_up=self.linear(torch.cat([gate, up]), swiglu=True),
            down=self.linear(self._w(m + "down_proj.weight")),
            q_norm=None if q_norm is None else interleave_halves(q_norm, 1),
            k_norm=None if k_norm is None else interleave_halves(k_norm, 1),
        )

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed).to(self.dtype)

    def run_layers(
        self,
        h: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: list[torch.Tensor],
        start: int = 0,
        end: int | None = None,
        plan: LayerPlan = FULL,
        bulk: bool = False,
    ) -> torch.Tensor:
        """Run layers [start, end) on hidden states `[T, hidden]`, skipping what `plan` says.
        `bulk`: many tokens at once (prefill), where throughput matters more than the
        few-row kernels."""
        end = self.num_layers if end is None else end
        rope = self.rope[batch.positions]
        # Our CPU kernel takes RoPE, the KV write and attention in one call (q/k norms aside).
        fused = self.backend.attention == "cpu" and batch.mask is None
        fused = fused and self.layers[0].q_norm is None
        if fused:
            rope = torch.view_as_real(rope)
            if self.stack is not None and not bulk and start < end:
                layers = range(start, end)
                attention = [i not in plan.skip_attn for i in layers]
                mlp = [i not in plan.skip_mlp for i in layers]
                return cpu_layers.run(self.stack, h, batch, kv_cache, rope, start, attention, mlp)
        for i in range(start, end):
            layer = self.layers[i]
            if i not in plan.skip_attn:
                h = self._attention(layer, h, batch, kv_cache[i], rope, bulk, fused)
            if i not in plan.skip_mlp:
                h = layer.down.add(layer.gate_up.swiglu(h, bulk, layer.mlp_norm), h, bulk)
        return h

    def _attention(self, layer: Layer, h, batch, kv_cache, rope, bulk: bool, fused: bool):
        """`fused`: one call to our CPU kernel, `rope` as (cos, sin) pairs; else `rope` is
        complex and the steps are PyTorch's (and the kernels' through `paged_attention`)."""
        T, H, KV, D = h.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = layer.qkv(h, bulk, layer.attn_norm)
        if fused:
            heads = (H, KV, D)
            out = cpu_attention.rope_attention(qkv, kv_cache, batch, rope, heads, self.scale)
            return layer.o.add(out, h, bulk)
        qk = qkv[:, : (H + KV) * D].view(T, H + KV, D)
        if layer.q_norm is not None:
            qk = self._qk_norms(layer, qk, bulk)
        # Rotated in float32: PyTorch has no bfloat16 complex numbers.
        pairs = torch.view_as_complex(qk.float().view(T, H + KV, D // 2, 2))
        qk = torch.view_as_real(pairs * rope[:, None]).to(qkv.dtype).view(T, (H + KV) * D)
        impl = self.backend.attention
        kv = torch.cat((qk[:, H * D :], qkv[:, (H + KV) * D :]), 1)
        write_kv(kv_cache, batch, kv, impl)
        q = qk[:, : H * D].view(T, H, D)
        return layer.o.add(paged_attention(q, kv_cache, batch, KV, self.scale, impl), h, bulk)

    def _qk_norms(self, layer: Layer, qk: torch.Tensor, bulk: bool) -> torch.Tensor:
        """Qwen3's RMSNorms of each head's q and k (`[T, H + KV, D]`), row-invariant as the
        products are (`Linear`): Triton's norm, or PyTorch's a row at a time where its
        reduction may change with the number of rows (bfloat16, measured)."""
        H, D = self.num_heads, self.head_dim
        if self.backend.linear == "triton":
            norm = _triton().normalize
            q = norm(qk[:, :H], D * self.eps, layer.q_norm.float() * D**0.5)
            return torch.cat((q, norm(qk[:, H:], D * self.eps, layer.k_norm.float() * D**0.5)), 1)

        def both(x):
            q = rms_norm(x[:, :H], layer.q_norm, self.eps)
            return torch.cat((q, rms_norm(x[:, H:], layer.k_norm, self.eps)), 1)

        if bulk or self.backend.linear == "cpu" or len(qk) == 1:
            return both(qk)
        return torch.cat([both(row) for row in qk.split(1)])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The last RMSNorm (its gain may be folded into the head's weights)."""
        return self.final(h)

    def logits(self, h: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """Final norm and the full LM head: `[T, vocab]` in float32."""
        return self.head(h, bulk, self.final).float()

    def head_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the LM head's matrix (final norm's gain folded in where `fold`)."""
        rows = self.head.rows(index)
        return self._head_weight[index] if rows is None else rows


def _uses_window(config) -> bool:
    window = getattr(config, "sliding_window", None)
    return bool(window) and getattr(config, "use_sliding_window", True)


def _rope_table(config, head_dim: int, device) -> torch.Tensor:
    """The rotation of every position as complex numbers, with the checkpoint's scaling."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        raise ValueError("dynamic RoPE scaling depends on the sequence length; not supported")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float)
    angles = torch.outer(positions, inv_freq.float())
    return torch.polar(torch.full_like(angles, scaling), angles).to(device)
