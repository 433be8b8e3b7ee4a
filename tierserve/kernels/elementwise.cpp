// Fused element-wise steps of a Llama layer. Each replaces several torch ops (and their
// per-op overhead and trips through memory) and rounds where those ops round, so its results
// equal theirs: exactly for the rotary embedding and the residual add, to within the last bit
// of a float32 exp or rsqrt (then one bfloat16 rounding) for the norm and SiLU. store_kv_, the
// step's K/V rows copied into the paged cache, replaces two index_put_ calls bit for bit.

// Each product and sum is rounded on its own, as torch's separate ops round them: no FMA
// contraction here (the build's -ffp-contract=fast would fuse x * cos + y * sin).
#pragma GCC optimize("fp-contract=off")

#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace tierserve {
namespace {

// Rows per parallel task: about 16 K elements, so a one-token decode stays on one thread.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

template <typename T>
float stored(float v) {  // scalar as_stored
  return static_cast<float>(static_cast<T>(v));
}

// ---- residual add + RMSNorm ------------------------------------------------------------------
// hidden = x + residual (rounded to T), out = weight * T(hidden * rsqrt(mean(hidden^2) + eps)),
// the HF Llama order of roundings.
template <typename T>
void add_rms_norm_impl(const T* x, const T* residual, const T* weight, T* hidden, T* out,
                       int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      T* hr = hidden + r * n;
      T* orow = out + r * n;
      float sumsq = 0.f;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; i < n; i += 16) {
        const int64_t m = std::min<int64_t>(16, n - i);
        __m512 h = load_f32(xr + i, m);
        if (residual != nullptr) {
          h = as_stored<T>(_mm512_add_ps(load_f32(residual + r * n + i, m), h));
          store_as(hr + i, h, m);
        }
        acc = _mm512_fmadd_ps(h, h, acc);
      }
      sumsq = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {  // the AVX2 module: float32 models only
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
          __m256 h = _mm256_loadu_ps(xr + i);
          if (residual != nullptr) {
            h = _mm256_add_ps(_mm256_loadu_ps(residual + r * n + i), h);
            _mm256_storeu_ps(hr + i, h);
          }
          acc = _mm256_fmadd_ps(h, h, acc);
        }
        const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        sumsq = _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
      }
#endif
      for (; i < n; ++i) {
        float h = static_cast<float>(xr[i]);
        if (residual != nullptr) {
          h = stored<T>(static_cast<float>(residual[r * n + i]) + h);
          hr[i] = static_cast<T>(h);
        }
        sumsq += h * h;
      }
      const T* src = residual != nullptr ? hr : xr;
      const float inv = 1.f / std::sqrt(sumsq / static_cast<float>(n) + eps);
      i = 0;
#if defined(__AVX512F__)
      const __m512 scale = _mm512_set1_ps(inv);
      for (; i < n; i += 16) {
        const int64_t m = std::min<int64_t>(16, n - i);
        __m512 normed = as_stored<T>(_mm512_mul_ps(load_f32(src + i, m), scale));
        store_as(orow + i, _mm512_mul_ps(load_f32(weight + i, m), normed), m);
      }
#elif defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {
        const __m256 scale = _mm256_set1_ps(inv);
        for (; i + 8 <= n; i += 8) {
          const __m256 normed = _mm256_mul_ps(_mm256_loadu_ps(src + i), scale);
          _mm256_storeu_ps(orow + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), normed));
        }
      }
#endif
      for (; i < n; ++i) {
        const float normed = stored<T>(static_cast<float>(src[i]) * inv);
        orow[i] = static_cast<T>(static_cast<float>(weight[i]) * normed);
      }
    }
  });
}

// ---- rotary embedding, in place ----------------------------------------------------------------
// x = x * cos + rotate_half(x) * sin for the first ``heads`` heads of each row (HF's halves
// convention), each product and the sum rounded to T as torch's three ops round them.
template <typename T>
void rotary_impl(T* qkv, int64_t row_stride, const T* cos, const T* sin, int64_t rows,
                 int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, rows, grain(heads * head_dim), [&](int64_t begin, int64_t end) {
    std::vector<float> x(head_dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + r * head_dim;
      const T* s = sin + r * head_dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* xr = qkv + r * row_stride + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) x[d] = static_cast<float>(xr[d]);
        int64_t d = 0;
#if defined(__AVX512F__)
        for (; d < half; d += 16) {
          const int64_t m = std::min<int64_t>(16, half - d);
          const __m512 x1 = load_f32(x.data() + d, m), x2 = load_f32(x.data() + half + d, m);
          const __m512 c1 = load_f32(c + d, m), c2 = load_f32(c + half + d, m);
          const __m512 s1 = load_f32(s + d, m), s2 = load_f32(s + half + d, m);
          const __m512 neg_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
          store_as(xr + d, _mm512_add_ps(as_stored<T>(_mm512_mul_ps(x1, c1)),
                                         as_stored<T>(_mm512_mul_ps(neg_x2, s1))), m);
          store_as(xr + half + d, _mm512_add_ps(as_stored<T>(_mm512_mul_ps(x2, c2)),
                                                as_stored<T>(_mm512_mul_ps(x1, s2))), m);
        }
#endif
        for (; d < half; ++d) {
          const float x1 = x[d], x2 = x[half + d];
          xr[d] = static_cast<T>(stored<T>(x1 * static_cast<float>(c[d])) +
                                 stored<T>(-x2 * static_cast<float>(s[d])));
          xr[half + d] = static_cast<T>(stored<T>(x2 * static_cast<float>(c[half + d])) +
                                        stored<T>(x1 * static_cast<float>(s[half + d])));
        }
      }
    }
  });
}

// ---- SiLU(gate) * up -----------------------------------------------------------------------
template <typename T>
void silu_mul_impl(const T* gate_up, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * n;
      const T* u = g + n;
      T* o = out + r * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i < n; i += 16) {
        const int64_t m = std::min<int64_t>(16, n - i);
        const __m512 gv = load_f32(g + i, m);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 act = as_stored<T>(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
        store_as(o + i, _mm512_mul_ps(act, load_f32(u + i, m)), m);
      }
#elif defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {
        const __m256 one = _mm256_set1_ps(1.f);
        for (; i + 8 <= n; i += 8) {
          const __m256 gv = _mm256_loadu_ps(g + i);
          const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
          const __m256 act = _mm256_div_ps(gv, _mm256_add_ps(one, e));
          _mm256_storeu_ps(o + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
        }
      }
#endif
      for (; i < n; ++i) {
        const float gv = static_cast<float>(g[i]);
        o[i] = static_cast<T>(stored<T>(gv / (1.f + std::exp(-gv))) * static_cast<float>(u[i]));
      }
    }
  });
}

// ---- this step's K/V rows into the paged cache ---------------------------------------------
// Row i of k and v goes to (blocks[i], offsets[i]); strides in elements, head_dim contiguous on
// both sides. A plain copy: bit for bit what index_put_ writes.
void store_kv_impl(char* k_cache, char* v_cache, const char* k, const char* v,
                   const int64_t* blocks, const int64_t* offsets, int64_t n, int64_t kv_heads,
                   int64_t head_dim, int64_t elem_size, at::IntArrayRef k_cache_strides,
                   at::IntArrayRef v_cache_strides, at::IntArrayRef k_strides,
                   at::IntArrayRef v_strides) {
  const size_t row_bytes = static_cast<size_t>(head_dim * elem_size);
  at::parallel_for(0, n, grain(2 * kv_heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k_slot = blocks[i] * k_cache_strides[0] + offsets[i] * k_cache_strides[1];
      const int64_t v_slot = blocks[i] * v_cache_strides[0] + offsets[i] * v_cache_strides[1];
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(k_cache + (k_slot + h * k_cache_strides[2]) * elem_size,
                    k + (i * k_strides[0] + h * k_strides[1]) * elem_size, row_bytes);
        std::memcpy(v_cache + (v_slot + h * v_cache_strides[2]) * elem_size,
                    v + (i * v_strides[0] + h * v_strides[1]) * elem_size, row_bytes);
      }
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous (rows, n) tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              ": float32 or bfloat16 only");
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x,
                                                      c10::optional<torch::Tensor> residual,
                                                      torch::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(), "weight: (n,) of x's dtype");
  const bool add = residual.has_value();
  if (add) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x");
  }
  auto hidden = add ? torch::empty_like(x) : x;
  auto out = torch::empty_like(x);
  const float feps = static_cast<float>(eps);
  if (x.scalar_type() == at::kBFloat16) {
    add_rms_norm_impl<at::BFloat16>(x.data_ptr<at::BFloat16>(),
                                    add ? residual->data_ptr<at::BFloat16>() : nullptr,
                                    weight.data_ptr<at::BFloat16>(),
                                    hidden.data_ptr<at::BFloat16>(),
                                    out.data_ptr<at::BFloat16>(), x.size(0), x.size(1), feps);
  } else {
    add_rms_norm_impl<float>(x.data_ptr<float>(), add ? residual->data_ptr<float>() : nullptr,
                             weight.data_ptr<float>(), hidden.data_ptr<float>(),
                             out.data_ptr<float>(), x.size(0), x.size(1), feps);
  }
  return {out, hidden};
}

void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
             int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv: (rows, width), width contiguous");
  TORCH_CHECK(head_dim % 2 == 0 && heads * head_dim <= qkv.size(1), "heads * head_dim > width");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == qkv.size(0) &&
                  cos.size(1) == head_dim, "cos and sin: (rows, head_dim)");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "cos and sin must be in qkv's dtype");
  if (qkv.scalar_type() == at::kBFloat16) {
    rotary_impl<at::BFloat16>(qkv.data_ptr<at::BFloat16>(), qkv.stride(0),
                              cos.data_ptr<at::BFloat16>(), sin.data_ptr<at::BFloat16>(),
                              qkv.size(0), heads, head_dim);
  } else {
    TORCH_CHECK(qkv.scalar_type() == at::kFloat, "float32 or bfloat16 only");
    rotary_impl<float>(qkv.data_ptr<float>(), qkv.stride(0), cos.data_ptr<float>(),
                       sin.data_ptr<float>(), qkv.size(0), heads, head_dim);
  }
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: (rows, 2 * n)");
  const int64_t n = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), n}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_impl<at::BFloat16>(gate_up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                                gate_up.size(0), n);
  } else {
    silu_mul_impl<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), gate_up.size(0), n);
  }
  return out;
}

void store_kv_(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
               torch::Tensor slot_blocks, torch::Tensor slot_offsets) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "caches: (blocks, block_size, kv_heads, head_dim), K and V alike");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "caches: float32 or bfloat16 only");
  TORCH_CHECK(v_cache.scalar_type() == dtype && k.scalar_type() == dtype &&
                  v.scalar_type() == dtype, "k, v and the caches must share one dtype");
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && k.device().is_cpu() &&
                  v.device().is_cpu() && slot_blocks.device().is_cpu() &&
                  slot_offsets.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "the caches' head_dim must be contiguous");
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == kv_heads &&
                  k.size(2) == head_dim,
              "k and v: (tokens, kv_heads, head_dim) with the caches' kv_heads and head_dim");
  TORCH_CHECK(slot_blocks.scalar_type() == at::kLong && slot_offsets.scalar_type() == at::kLong &&
                  slot_blocks.dim() == 1 && slot_blocks.sizes() == slot_offsets.sizes(),
              "slot_blocks and slot_offsets: (n,) int64 each");
  const int64_t n = slot_blocks.size(0);
  TORCH_CHECK(n <= k.size(0), n, " slots but only ", k.size(0), " rows of k and v");
  slot_blocks = slot_blocks.contiguous();
  slot_offsets = slot_offsets.contiguous();
  const int64_t* blocks = slot_blocks.data_ptr<int64_t>();
  const int64_t* offsets = slot_offsets.data_ptr<int64_t>();
  // Every slot checked before any row is written: bad input raises and leaves the cache as is.
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(blocks[i] >= 0 && blocks[i] < num_blocks, "slot ", i, ": block ", blocks[i],
                " is not in the cache (", num_blocks, " blocks)");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] < block_size, "slot ", i, ": offset ", offsets[i],
                " is outside a block of ", block_size, " rows");
  }
  if (k.stride(2) != 1) k = k.contiguous();
  if (v.stride(2) != 1) v = v.contiguous();
  store_kv_impl(static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()),
                static_cast<const char*>(k.data_ptr()), static_cast<const char*>(v.data_ptr()),
                blocks, offsets, n, kv_heads, head_dim, k.element_size(), k_cache.strides(),
                v_cache.strides(), k.strides(), v.strides());
}

}  // namespace tierserve
