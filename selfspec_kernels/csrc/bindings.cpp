// The Python module of the CPU kernels (selfspec_kernels/cpu_build.py): their entry points, and the
// constants of their layouts, which Python reads from here rather than keeping copies.
#include <torch/extension.h>

namespace {

// A tuple of the names in `names`, for Python to gather tensors by.
template <size_t N>
pybind11::tuple names_tuple(const char* const (&names)[N]) {
  pybind11::tuple out(N);
  for (size_t i = 0; i < N; ++i) out[i] = pybind11::str(names[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Wrapped as load_inline wraps its `functions`: a c10::Error becomes a Python exception.
  m.def("linear_bf16", torch::wrap_pybind_function(linear::linear_bf16));
  m.def("linear_bf16_add", torch::wrap_pybind_function(linear::linear_bf16_add));
  m.def("linear_bf16_swiglu", torch::wrap_pybind_function(linear::linear_bf16_swiglu));
  m.def("linear_q", torch::wrap_pybind_function(quant::linear_q));
  m.def("linear_q_add", torch::wrap_pybind_function(quant::linear_q_add));
  m.def("linear_q_swiglu", torch::wrap_pybind_function(quant::linear_q_swiglu));
  m.def("unpack_q", torch::wrap_pybind_function(quant::unpack_q));
  m.def("paged_attention", torch::wrap_pybind_function(attention::paged_attention));
  m.def("run_layers", torch::wrap_pybind_function(layers::run_layers));
  // selfspec_kernels/cpu_linear.py packs matrices by these.
  m.attr("GROUP_ROWS") = linear::ROWS;
  m.attr("STEP_COLUMNS") = linear::STEP;
  // Key positions per unit of work in attention (the tests size contexts by it).
  m.attr("ATTENTION_SPLIT") = attention::SPLIT;
  // selfspec_kernels/cpu_layers.py gathers a layer's tensors and outputs by these names.
  m.attr("LAYER_WEIGHTS") = names_tuple(layers::WEIGHT_NAMES);
  m.attr("LAYER_OUTPUTS") = names_tuple(layers::OUTPUT_NAMES);
}
