// Layers of a model in one call: the fused kernels of linear.cpp (or quant.cpp, for GGUF
// quantized weights) and attention.cpp, one after another, with no Python between them.
// Compiled in one translation unit with them (selfspec_kernels/cpu_build.py), so these
// calls are direct.
namespace layers {

// A layer's tensors in `weights`, PER_LAYER of them in this order, with their formats in
// `formats` (a quantized matrix's ggml type, else -1), and its matrices' outputs in
// `outputs`. Python gathers both by these names, which are its layers'
// attributes (exported as LAYER_WEIGHTS and LAYER_OUTPUTS, bindings.cpp).
enum Weight : int { W_QKV, W_ATTN_NORM, W_O, W_GATE_UP, W_MLP_NORM, W_DOWN, PER_LAYER };
constexpr const char* WEIGHT_NAMES[PER_LAYER] = {"qkv",     "attn_norm", "o",
                                                 "gate_up", "mlp_norm",  "down"};
enum Output : int { OUT_QKV, OUT_O, OUT_GATE_UP, OUT_DOWN, OUTPUTS };
constexpr const char* OUTPUT_NAMES[OUTPUTS] = {"qkv", "o", "gate_up", "down"};

// A matrix product on w as the model holds it: bfloat16 packed for linear.cpp (format < 0),
// or the GGUF's quantized blocks in ggml type `format` for quant.cpp.
static at::Tensor product(const at::Tensor& x, const at::Tensor& w, int64_t format, int64_t n,
                          const std::optional<at::Tensor>& bias, const at::Tensor& gain,
                          double n_eps) {
  return format >= 0 ? quant::linear_q(x, w, format, n, bias, true, gain, n_eps)
                     : linear::linear_bf16(x, w, n, bias, true, gain, n_eps);
}

static at::Tensor product_add(const at::Tensor& x, const at::Tensor& w, int64_t format, int64_t n,
                              const at::Tensor& residual) {
  return format >= 0 ? quant::linear_q_add(x, w, format, n, std::nullopt, residual)
                     : linear::linear_bf16_add(x, w, n, std::nullopt, residual);
}

static at::Tensor product_swiglu(const at::Tensor& x, const at::Tensor& w, int64_t format,
                                 int64_t n, const at::Tensor& gain, double n_eps) {
  return format >= 0 ? quant::linear_q_swiglu(x, w, format, n, true, gain, n_eps)
                     : linear::linear_bf16_swiglu(x, w, n, true, gain, n_eps);
}

at::Tensor run_layers(at::Tensor h, const std::vector<at::Tensor>& weights,
                      const std::vector<int64_t>& formats,
                      const std::vector<std::optional<at::Tensor>>& qkv_bias,
                      const std::vector<at::Tensor>& kv, const std::vector<int64_t>& outputs,
                      int64_t start, const std::vector<bool>& run_attention,
                      const std::vector<bool>& run_mlp, const at::Tensor& rope,
                      const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& starts,
                      const at::Tensor& q_lens, const at::Tensor& q_offsets, int64_t block_size,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                      int64_t window, double n_eps) {
  const int64_t L = kv.size();
  TORCH_CHECK(int64_t(weights.size()) == PER_LAYER * L && int64_t(qkv_bias.size()) == L,
              "cpu_layers: ", PER_LAYER, " matrices and gains and a bias per layer, got ",
              weights.size(), " and ", qkv_bias.size(), " for ", L, " layers");
  TORCH_CHECK(formats.size() == weights.size(), "cpu_layers: a format per tensor, got ",
              formats.size(), " for ", weights.size());
  TORCH_CHECK(int64_t(outputs.size()) == OUTPUTS,
              "cpu_layers: outputs of qkv, o, gate_up and down");
  const int64_t n = run_attention.size();
  TORCH_CHECK(int64_t(run_mlp.size()) == n, "cpu_layers: ", n, " attention flags but ",
              run_mlp.size(), " MLP flags");
  TORCH_CHECK(start >= 0 && start + n <= L, "cpu_layers: layers ", start, "..", start + n, " of ",
              L);
  pybind11::gil_scoped_release no_gil;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = start + i;
    const at::Tensor* w = &weights[PER_LAYER * l];
    const int64_t* f = &formats[PER_LAYER * l];
    if (run_attention[i]) {
      const at::Tensor qkv =
          product(h, w[W_QKV], f[W_QKV], outputs[OUT_QKV], qkv_bias[l], w[W_ATTN_NORM], n_eps);
      const at::Tensor out =
          attention::paged_attention(qkv, kv[l], rope, slots, tables, starts, q_lens, q_offsets,
                                     block_size, num_heads, num_kv_heads, head_dim, scale, window);
      h = product_add(out, w[W_O], f[W_O], outputs[OUT_O], h);
    }
    if (run_mlp[i]) {
      const at::Tensor a =
          product_swiglu(h, w[W_GATE_UP], f[W_GATE_UP], outputs[OUT_GATE_UP], w[W_MLP_NORM], n_eps);
      h = product_add(a, w[W_DOWN], f[W_DOWN], outputs[OUT_DOWN], h);
    }
  }
  return h;
}

}  // namespace layers
