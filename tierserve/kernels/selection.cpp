// block_bound_scores: KV selection's per-block (or per-cluster of neighbouring blocks) score
// from the key bounds kept in the cache, read in place through each decode's block table:
//   score = sum_c q_upper[c] * max_j key_max[j][c] + q_lower[c] * min_j key_min[j][c]
// over the cluster's valid blocks j. Quest passes (q+, q-), MPCache (a q, (1 - a) q). Clusters
// past a decode's blocks score -inf. The torch reference is selection/policies.py's.

#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace tierserve {
namespace {

template <typename T>
void bound_scores_impl(const torch::Tensor& q_upper, const torch::Tensor& q_lower,
                       const torch::Tensor& key_max, const torch::Tensor& key_min,
                       const torch::Tensor& tables, const torch::Tensor& num_blocks,
                       int64_t cluster, torch::Tensor& out) {
  const int64_t decodes = tables.size(0), width = tables.size(1);
  const int64_t nkv = q_upper.size(1), hd = q_upper.size(2);
  const int64_t clusters = out.size(2);
  const int64_t mb = key_max.stride(0), mh = key_max.stride(1);
  const int64_t nb_ = key_min.stride(0), nh = key_min.stride(1);
  const T* kmax = key_max.data_ptr<T>();
  const T* kmin = key_min.data_ptr<T>();
  const float* qu = q_upper.data_ptr<float>();
  const float* ql = q_lower.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* np = num_blocks.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, decodes * nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> upper(hd), lower(hd);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task / nkv, h = task % nkv;
      const int64_t used = std::min(np[d], width);
      const float* qup = qu + task * hd;
      const float* qlo = ql + task * hd;
      float* row = op + task * clusters;
      for (int64_t c = 0; c < clusters; ++c) {
        const int64_t first = c * cluster, last = std::min(first + cluster, used);
        if (first >= used) {
          row[c] = neg_inf;
          continue;
        }
        for (int64_t j = first; j < last; ++j) {
          const T* mx = kmax + tp[d * width + j] * mb + h * mh;
          const T* mn = kmin + tp[d * width + j] * nb_ + h * nh;
          if (j == first) {
            for (int64_t e = 0; e < hd; ++e) {
              upper[e] = static_cast<float>(mx[e]);
              lower[e] = static_cast<float>(mn[e]);
            }
          } else {
            for (int64_t e = 0; e < hd; ++e) {
              upper[e] = std::max(upper[e], static_cast<float>(mx[e]));
              lower[e] = std::min(lower[e], static_cast<float>(mn[e]));
            }
          }
        }
        float sum = 0.f;
        for (int64_t e = 0; e < hd; ++e) sum += qup[e] * upper[e] + qlo[e] * lower[e];
        row[c] = sum;
      }
    }
  });
}

}  // namespace

torch::Tensor block_bound_scores(torch::Tensor q_upper, torch::Tensor q_lower,
                                 torch::Tensor key_max, torch::Tensor key_min,
                                 torch::Tensor tables, torch::Tensor num_blocks, int64_t cluster) {
  TORCH_CHECK(q_upper.dim() == 3 && q_upper.sizes() == q_lower.sizes(),
              "q_upper, q_lower: (decodes, kv_heads, head_dim)");
  TORCH_CHECK(q_upper.scalar_type() == at::kFloat && q_lower.scalar_type() == at::kFloat,
              "queries are float32");
  TORCH_CHECK(key_max.dim() == 3 && key_min.dim() == 3 && key_max.stride(2) == 1 &&
                  key_min.stride(2) == 1 && key_max.scalar_type() == key_min.scalar_type(),
              "bounds: (blocks, kv_heads, head_dim), head_dim contiguous, one dtype");
  TORCH_CHECK(key_max.size(1) == q_upper.size(1) && key_max.size(2) == q_upper.size(2),
              "bounds and queries disagree on kv heads or head_dim");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong &&
                  num_blocks.dim() == 1 && num_blocks.scalar_type() == at::kLong &&
                  num_blocks.size(0) == tables.size(0) && tables.size(0) == q_upper.size(0),
              "tables (decodes, width) and num_blocks (decodes,) int64");
  TORCH_CHECK(cluster >= 1, "cluster must be >= 1");
  q_upper = q_upper.contiguous();
  q_lower = q_lower.contiguous();
  tables = tables.contiguous();
  num_blocks = num_blocks.contiguous();
  const int64_t clusters = (tables.size(1) + cluster - 1) / cluster;
  auto out = torch::empty({tables.size(0), q_upper.size(1), clusters}, q_upper.options());
  if (key_max.scalar_type() == at::kBFloat16) {
    bound_scores_impl<at::BFloat16>(q_upper, q_lower, key_max, key_min, tables, num_blocks,
                                    cluster, out);
  } else {
    TORCH_CHECK(key_max.scalar_type() == at::kFloat, "float32 or bfloat16 bounds only");
    bound_scores_impl<float>(q_upper, q_lower, key_max, key_min, tables, num_blocks, cluster, out);
  }
  return out;
}

}  // namespace tierserve
