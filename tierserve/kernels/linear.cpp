// skinny_linear: y = x @ w.T (+ bias) for a few rows of x (decode at small batch). Stock bfloat16
// F.linear reads weights at ~10 GB/s here; this streams each weight row once, for all rows of x,
// with AVX-512 BF16 dot products where the CPU has them, accumulating in float32 and rounding
// once to the output dtype.

#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

namespace tierserve {
namespace {

// Dot products of rows x[0..m) (each k long) with one weight row, into acc[0..m).
inline void dot_rows_bf16(const at::BFloat16* x, int64_t m, const at::BFloat16* w, int64_t k,
                          float* acc) {
#if defined(__AVX512BF16__)
  __m512 sums[8];
  for (int64_t r = 0; r < m; ++r) sums[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512bh wv = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(w + i));
    for (int64_t r = 0; r < m; ++r) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(x + r * k + i));
      sums[r] = _mm512_dpbf16_ps(sums[r], xv, wv);
    }
  }
  if (i < k) {
    __mmask32 tail = static_cast<__mmask32>((1ULL << (k - i)) - 1);
    __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + i);
    for (int64_t r = 0; r < m; ++r) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + r * k + i);
      sums[r] = _mm512_dpbf16_ps(sums[r], xv, wv);
    }
  }
  for (int64_t r = 0; r < m; ++r) acc[r] = _mm512_reduce_add_ps(sums[r]);
#else
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(w);
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  for (int64_t r = 0; r < m; ++r) {
    float sum = 0.f;
    for (int64_t i = 0; i < k; ++i) sum += bf16_to_float(xb[r * k + i]) * bf16_to_float(wb[i]);
    acc[r] = sum;
  }
#endif
}

inline void dot_rows_f32(const float* x, int64_t m, const float* w, int64_t k, float* acc) {
  for (int64_t r = 0; r < m; ++r) {
    float sum = 0.f;
    const float* xr = x + r * k;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < k; ++i) sum += xr[i] * w[i];
    acc[r] = sum;
  }
}

template <typename T>
void skinny_linear_impl(const T* x, const T* w, const T* bias, T* y, int64_t m, int64_t n,
                        int64_t k) {
  // Grain: 64 weight rows (~72 KB of bfloat16 at k = 576) per task.
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    float acc[8];
    for (int64_t j = begin; j < end; ++j) {
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        dot_rows_bf16(x, m, w + j * k, k, acc);
      } else {
        dot_rows_f32(x, m, w + j * k, k, acc);
      }
      float b = bias ? static_cast<float>(bias[j]) : 0.f;
      for (int64_t r = 0; r < m; ++r) y[r * n + j] = static_cast<T>(acc[r] + b);
    }
  });
}

}  // namespace

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x (m, k), w (n, k)");
  TORCH_CHECK(x.size(0) <= 8, "skinny_linear takes at most 8 rows");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must share a dtype");
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  auto y = torch::empty({m, n}, x.options());
  torch::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  if (x.scalar_type() == at::kBFloat16) {
    skinny_linear_impl<at::BFloat16>(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(),
                                     b.defined() ? b.data_ptr<at::BFloat16>() : nullptr,
                                     y.data_ptr<at::BFloat16>(), m, n, k);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "float32 or bfloat16 only");
    skinny_linear_impl<float>(x.data_ptr<float>(), w.data_ptr<float>(),
                              b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                              m, n, k);
  }
  return y;
}

}  // namespace tierserve
