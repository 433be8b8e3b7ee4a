// Fused element-wise steps of a Llama layer (elementwise.cpp).
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace tierserve {

// (weight * norm(x + residual), x + residual); without a residual, (weight * norm(x), x).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x,
                                                      c10::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps);
// Rotary embedding of the first ``heads`` heads of every row of qkv, in place.
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
             int64_t head_dim);
// SiLU(gate_up[:, :n]) * gate_up[:, n:].
torch::Tensor silu_mul(torch::Tensor gate_up);

}  // namespace tierserve
