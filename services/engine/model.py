"""Our own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

Written for what `transformers` modules do not give us: running any subset of
sublayers (the draft), a paged KV cache, and one pass over a ragged batch of
sequences. Tokens of all sequences are flattened to `[T, hidden]`, so every
matrix product runs once per layer for the whole batch. `Model` loads a checkpoint's
weights into the layer parts of `services.engine.layers` and runs the pass over them.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from selfspec_kernels import cpu_attention, cpu_layers, cpu_memory
from selfspec_kernels.attention import AttentionBatch, paged_attention_for, write_kv
from selfspec_kernels.backend import Backend
from selfspec_kernels.cpu_quant import Quantized, quantized
from services.engine.layers import FULL, Layer, LayerPlan, Linear, Norm, rms_norm, triton

# The layer types are imported from here too (`from services.engine.model import LayerPlan`).
__all__ = ["FULL", "Layer", "LayerPlan", "Linear", "Model", "Norm", "interleave_halves"]

log = logging.getLogger(__name__)


def interleave_halves(w: torch.Tensor | Quantized, heads: int) -> torch.Tensor | Quantized:
    """Reorder each head's rows from (x_0..x_{d/2-1}, y_0..) to (x_0, y_0, x_1, ...), the
    pairs that rotate together in RoPE. q and k get the same order, so q·k is unchanged.
    A quantized matrix's rows move whole (its blocks lie along a row)."""
    if isinstance(w, Quantized):
        return replace(w, data=interleave_halves(w.data, heads))
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
        # A GGUF's own model keeps its float tensors (gains, biases) in float32.
        self._dtype = torch.float32 if backend.quantized else backend.dtype
        self._tensors = tensors
        # Matrices stay in the requested dtype where our kernel multiplies them as they are
        # (a GGUF's block formats too); otherwise they are rounded to it, then held in the
        # compute dtype with the RMSNorm gains folded in (exact in float32, one op fewer).
        kernel = backend.linear == "cpu"
        self.store_dtype = backend.dtype if kernel else self.dtype
        self.fold = not kernel
        # The KV cache is kept like the matrices: our CPU attention kernel widens bfloat16
        # keys and values as it reads them, which halves what long contexts read. With a
        # GGUF's matrices it is float32: the engine computes the GGUF's own model, up to
        # the order of its sums.
        self.kv_dtype = torch.float32 if backend.quantized else self.store_dtype
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
        self.attend = paged_attention_for(backend.attention)
        self._onto_huge_pages()
        if isinstance(self.embed, Quantized) and self.embed is head_weight:
            self.embed = self.head.kernel  # tied: one copy of the blocks, the head's
        # Few-token passes through our CPU kernels run all their layers in one C++ call.
        self.stack = cpu_layers.Stack.of(self) if backend.linear == "cpu" else None
        log.info("compute path: %s%s", backend, "" if self.stack is None else ", C++ layer loop")
        del self._tensors

    def linear(self, weight, bias=None, *, swiglu: bool = False) -> Linear:
        """A matrix prepared for this model's backend."""
        return Linear(weight, bias, impl=self.backend.linear, swiglu=swiglu)

    def stacked(self, parts: list, bias=None, *, swiglu: bool = False) -> Linear:
        """Matrices one under another as one `Linear`: in their block format when all
        share one, else dense in the stored dtype (`swiglu`: `[gate; up]`)."""
        formats = {p.format for p in parts if isinstance(p, Quantized)}
        if len(formats) == 1 and all(isinstance(p, Quantized) for p in parts):
            data = torch.cat([p.data for p in parts])
            fmt, k = formats.pop(), parts[0].k
            weight = quantized(data, fmt, k, swiglu=swiglu)
        else:
            weight = torch.cat([self._dense(p) for p in parts])
        return self.linear(weight, bias, swiglu=swiglu)

    def _dense(self, w: torch.Tensor | Quantized) -> torch.Tensor:
        if isinstance(w, Quantized):
            log.info("a %s matrix stacked with another format: held dense", w.format.name)
            return w.unpack().to(self.store_dtype)
        return w

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
        """Our kernel's matrices into one allocation on huge pages (`selfspec_kernels.cpu_memory`),
        in the order a pass reads them."""
        linears = [x for layer in self.layers for x in layer.linears]
        packed = [x for x in [*linears, self.head] if x.kernel is not None]
        if not packed:
            return
        sizes = [-(-x.kernel.data.nbytes // 64) * 64 for x in packed]  # cache-line aligned
        arena = cpu_memory.empty((sum(sizes),), torch.uint8)
        offset = 0
        for x, size in zip(packed, sizes, strict=True):
            data = x.kernel.data
            part = arena[offset : offset + data.nbytes].view(data.dtype).view(data.shape)
            x.kernel = replace(x.kernel, data=part.copy_(data))
            offset += size

    def _w(self, name: str, gain: str | None = None) -> torch.Tensor:
        """A matrix rounded to the requested dtype first, so that float32 arithmetic on
        bfloat16 weights computes the bfloat16 model; `gain` is the RMSNorm before it,
        folded into the columns when `fold`. A quantized one stays as it is."""
        w = self._tensors[name]
        if isinstance(w, Quantized):
            return w
        # Onto the device first: the gain is there, and a GPU folds faster.
        w = w.to(device=self.device, dtype=self._dtype)
        if gain is not None and self.fold:
            w = w.float() * self._gain(gain, force=True)
        return w.to(self.store_dtype).contiguous()

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
            qkv=self.stacked([q, k, v], bias),
            o=self.linear(self._w(a + "o_proj.weight")),
            gate_up=self.stacked([gate, up], swiglu=True),
            down=self.linear(self._w(m + "down_proj.weight")),
            q_norm=None if q_norm is None else interleave_halves(q_norm, 1),
            k_norm=None if k_norm is None else interleave_halves(k_norm, 1),
        )

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, Quantized):
            return self.embed.rows(tokens).to(self.dtype)
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
        complex and the steps are PyTorch's (and the kernels' through `self.attend`)."""
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
        return layer.o.add(self.attend(q, kv_cache, batch, KV, self.scale), h, bulk)

    def _qk_norms(self, layer: Layer, qk: torch.Tensor, bulk: bool) -> torch.Tensor:
        """Qwen3's RMSNorms of each head's q and k (`[T, H + KV, D]`), row-invariant as the
        products are (`Linear`): Triton's norm, or PyTorch's a row at a time where its
        reduction may change with the number of rows (bfloat16, measured)."""
        H, D = self.num_heads, self.head_dim
        if self.backend.linear == "triton":
            norm = triton("triton_norm").normalize
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

    def head_part(self, index: torch.Tensor) -> Linear:
        """Rows `index` of the LM head as a matrix of their own, quantized ones as they are."""
        kernel = self.head.kernel
        if isinstance(kernel, Quantized):
            return self.linear(quantized(kernel.data[index], kernel.format, kernel.k))
        return self.linear(self.head_rows(index))


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
