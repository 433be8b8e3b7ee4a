// tierserve's native CPU kernels: what module.cpp exposes to Python.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace tierserve {

// linear.cpp: x @ w.T (+ bias) for at most 8 rows of x.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);

// attention.cpp: q (batch, heads, head_dim) over caches (blocks, block_size, kv_heads, head_dim)
// through tables (batch, max_blocks) int64, each sequence's first lens[b] cached tokens; or
// per kv head (KV selection): tables (batch, kv_heads, width) and lens (batch, kv_heads).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, double scale);
// paged_decode_attention of bfloat16 q and caches (2-d tables) into float32 ``out``, with each
// query's largest score and softmax sum in ``stats`` ((batch, heads, 2) floats): the per-
// sequence pass of the fused kernel below (attention_shared.cpp). Not bound to Python.
void paged_decode_attention_with_stats(const torch::Tensor& q, const torch::Tensor& k_cache,
                                       const torch::Tensor& v_cache, const torch::Tensor& tables,
                                       const torch::Tensor& lens, double scale, torch::Tensor& out,
                                       float* stats);
// The same, with the sequences whose tables start with the same blocks attending over those
// blocks together, at each depth of the prefix tree down to max_levels (a system prompt
// shared by all, then each template by its own sequences; a run needs min_shared_blocks
// blocks and enough sequences to fill a 16-query tile per kv head; bfloat16, head size 64 or
// 128; else as above).
torch::Tensor paged_decode_attention_shared(torch::Tensor q, torch::Tensor k_cache,
                                            torch::Tensor v_cache, torch::Tensor tables,
                                            torch::Tensor lens, double scale,
                                            int64_t min_shared_blocks, int64_t max_levels);

// elementwise.cpp, the fused steps of a Llama layer:
// (weight * norm(x + residual), x + residual); without a residual, (weight * norm(x), x).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x,
                                                      c10::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps);
// Rotary embedding of the first ``heads`` heads of every row of qkv, in place.
void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
             int64_t head_dim);
// SiLU(gate_up[:, :n]) * gate_up[:, n:].
torch::Tensor silu_mul(torch::Tensor gate_up);
// Row i of k and v (tokens, kv_heads, head_dim; rows past the slots are not read) into the
// caches (blocks, block_size, kv_heads, head_dim) at block slot_blocks[i], offset
// slot_offsets[i], in place: ``cache[slot_blocks, slot_offsets] = rows`` bit for bit.
void store_kv_(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
               torch::Tensor slot_blocks, torch::Tensor slot_offsets);

// selection.cpp: KV selection's per-block (cluster = 1) or per-cluster score from the key
// bounds (blocks, kv_heads, head_dim), through tables (decodes, width); -inf past num_blocks.
torch::Tensor block_bound_scores(torch::Tensor q_upper, torch::Tensor q_lower,
                                 torch::Tensor key_max, torch::Tensor key_min,
                                 torch::Tensor tables, torch::Tensor num_blocks, int64_t cluster);

}  // namespace tierserve
