"""The engine's compute kernels, each beside a plain PyTorch reference it is tested against.

- `backend`: the one module that picks a model's compute path (`cpu`, `onednn`, `torch`,
  `triton`).
- CPU, C++ in `csrc/` built by `cpu_build` (one module; `csrc/bindings.cpp` exports the
  entry points and the layout constants Python reads): `cpu_linear` (bfloat16-weight
  products), `cpu_quant` (products on a GGUF's quantized blocks), `cpu_attention` (RoPE,
  KV write and paged attention), `cpu_layers` (all the layers of a pass in one call);
  `cpu_memory` puts tensors on huge pages.
- Attention over the paged KV pool: `attention_batch` (where a pass's tokens sit),
  `attention` (the references, and each backend's attention function).
- Triton (GPU; the CPU runs them in Triton's interpreter): `triton_linear`
  (batch-invariant products), `triton_norm` (RMSNorm), `paged_attention`, `kv_append`;
  `triton_common` holds what their Python sides share.
"""
