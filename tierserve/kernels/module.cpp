// tierserve's native CPU kernels as one Python module (built by tierserve/kernels/__init__.py
// with torch.utils.cpp_extension.load): linear.cpp, attention.cpp, attention_shared.cpp,
// elementwise.cpp, selection.cpp.

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &tierserve::skinny_linear, "x @ w.T (+ bias) for at most 8 rows of x");
  m.def("paged_decode_attention", &tierserve::paged_decode_attention,
        "one query per sequence over its paged K/V, in place");
  m.def("paged_decode_attention_shared", &tierserve::paged_decode_attention_shared,
        "paged_decode_attention, groups sharing leading blocks reading them together, at each "
        "depth of their prefix tree down to max_levels",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("tables"), pybind11::arg("lens"), pybind11::arg("scale"),
        pybind11::arg("min_shared_blocks"), pybind11::arg("max_levels") = 8);
  m.def("add_rms_norm", &tierserve::add_rms_norm,
        "(weight * rmsnorm(x + residual), x + residual), HF's roundings");
  m.def("rotary_", &tierserve::rotary_, "rotary embedding of the first heads of qkv, in place");
  m.def("block_bound_scores", &tierserve::block_bound_scores,
        "q_upper . max(kmax) + q_lower . min(kmin) per block or cluster, through block tables");
  m.def("silu_mul", &tierserve::silu_mul, "silu(gate_up[:, :n]) * gate_up[:, n:]");
  m.def("store_kv_", &tierserve::store_kv_,
        "k_cache[slot_blocks, slot_offsets] = k[:n] and the same for v, in place");
}
