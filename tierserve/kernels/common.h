// Helpers shared by tierserve's CPU kernels: bfloat16 <-> float32 and a vector exp.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tierserve {

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &widened, sizeof(out));
  return out;
}

// exp(x) = 2^k * p(r), k = round(x * log2 e), r = x - k ln 2 (ln 2 in two parts) and p a
// degree-6 polynomial (relative error ~2e-7, as good as expf for softmax weights and
// activations): exp512 and exp256 share these constants and operations.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if defined(__AVX2__) && defined(__FMA__)
// exp for 8 floats (the AVX2 module's float32 SiLU). Inputs are clamped to [-87.3, 88.3], where
// 2^k stays a normal float: below, ~0 as exp512; above, ~2e38 rather than inf (SiLU(x) for
// x < -88.3 is then a denormal-sized -x * 5e-39 instead of -0).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_k = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));  // p * 2^k
}
#endif

#if defined(__AVX512F__)
// exp for 16 floats. Inputs below -87.3 give ~0; large ones overflow to inf as expf does.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);  // p * 2^k
}

// Load n <= 16 elements as float32 (masked: lanes past n are 0).
inline __m512 load_f32(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
inline __m512 load_f32(const at::BFloat16* p, int64_t n) {
  __m256i packed = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16));
}

// Round 16 floats to bfloat16, nearest-even as torch does (NaN stays NaN).
inline __m256i round_to_bf16_bits(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
}

// Store n <= 16 floats as T (bfloat16: rounded nearest-even).
inline void store_as(float* p, __m512 v, int64_t n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
inline void store_as(at::BFloat16* p, __m512 v, int64_t n) {
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), round_to_bf16_bits(v));
}

// What a tensor of dtype T holds after a float32 result is stored in it: identity for float32,
// rounding to bfloat16 for bfloat16. Lets a fused kernel round where torch's separate ops do.
template <typename T>
inline __m512 as_stored(__m512 v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_to_bf16_bits(v)), 16));
  } else {
    return v;
  }
}
#endif

#if defined(__AVX512F__)
// Weighing values with vdpbf16ps over rows interleaved two at a time (unpacklo/unpackhi of two
// value rows) leaves 32 dims permuted over two accumulators: dim 8L + c sits in lane 4L + c of
// ``lo`` (c < 4) or of ``hi`` (c >= 4). Back in order: dims 0-15 into ``first``, 16-31 into
// ``second``.
inline void interleaved_in_order(__m512 lo, __m512 hi, __m512& first, __m512& second) {
  const __m512i low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i high = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  first = _mm512_permutex2var_ps(lo, low, hi);
  second = _mm512_permutex2var_ps(lo, high, hi);
}
#endif

// Cached rows of one head in block ``index`` of a table: the hardware prefetcher does not follow
// a sequence from one block to the next (they are pages apart), so ask for the next one ahead.
template <typename T>
inline void prefetch_block(const T* base, const int64_t* table, int64_t index, int64_t len,
                           int64_t block_size, int64_t block_stride, int64_t row_stride,
                           int64_t head_offset, int64_t row_elems) {
#if defined(__AVX512F__)
  if (index * block_size >= len) return;
  const char* block = reinterpret_cast<const char*>(base + table[index] * block_stride + head_offset);
  const int64_t rows = std::min(block_size, len - index * block_size);
  const int64_t row_bytes = row_elems * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < row_bytes; b += 64) {
      _mm_prefetch(block + r * row_stride * static_cast<int64_t>(sizeof(T)) + b, _MM_HINT_T1);
    }
  }
#endif
}

}  // namespace tierserve
