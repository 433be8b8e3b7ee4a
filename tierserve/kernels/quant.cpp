// packed_linear: y = x @ w.T for a weight kept as GGML Q8_0 / Q4_0 / Q4_1 blocks or Q4_K / Q5_K /
// Q6_K super-blocks (tierserve/model/packed.py), the way llama.cpp computes it: each row of x is
// quantized per block of 32 to int8 with a float scale, the block products are summed in integers
// (a K-quant's sub-block codes and 6-bit or int8 scales decoded in registers from the raw bytes),
// then scaled and added in float32 (for K-quants llama.cpp rounds x per 256, its Q8_K; ours stays
// per 32, slightly finer).
// Decode at batch 1 streams the packed weight once (0.56 bytes a weight for Q4_1 against 2 for
// bfloat16), which is what bounds it. AVX2 integer dot products (maddubs + madd). Built as its own
// module (tierserve_quant_ops), only where the CPU has AVX2, FMA and F16C
// (kernels.quant_unsupported_reason), rather than the AVX-512 the other kernels need. Results
// equal tests/model/packed_reference.emulated_linear up to float32 rounding.
// decode_attention_f32: float32 paged decode attention in place over block tables, for the CPUs
// this module serves that lack the AVX-512 module (whose own kernel it stands in for).

#include <torch/extension.h>

#include "ops.h"  // elementwise.cpp, built into this module too (AVX2 and scalar loops)

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <vector>

#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "tierserve_quant_ops is built only for AVX2 + FMA + F16C (kernels.quant_unsupported_reason)"
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kSuper = 256;  // weights per K-quant super-block
// packed.QuantType's kernel codes
enum Kind : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kQ4_K = 3, kQ5_K = 4, kQ6_K = 5 };
constexpr bool is_k(int64_t kind) { return kind >= kQ4_K; }
constexpr int64_t k_block_bytes(int64_t kind) {
  return kind == kQ4_K ? 144 : kind == kQ5_K ? 176 : 210;
}
constexpr int64_t kRowGroup = 4;   // rows of x that share one unpacked weight block
constexpr int64_t kWeightTile = 16;  // weight rows kept hot while every row group passes

inline float half_to_float(uint16_t bits) {
  return _cvtsh_ss(bits);
}

// A Q4_K/Q5_K super-block's eight 6-bit sub-block scales and minimums (ggml's get_scale_min_k4).
inline void k4_scales(const uint8_t* packed, int32_t* scale, int32_t* minimum) {
  for (int j = 0; j < 4; ++j) {
    scale[j] = packed[j] & 63;
    minimum[j] = packed[j + 4] & 63;
    scale[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
    minimum[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
  }
}

// A Q4_K/Q5_K super-block's header: the float16 scale and minimum, and the eight 6-bit
// sub-block scales and minimums.
struct K4Header {
  float d, dmin;
  int32_t scale[8], minimum[8];
};

inline K4Header k4_header(const uint8_t* raw) {
  K4Header header;
  uint16_t d_bits, min_bits;
  std::memcpy(&d_bits, raw, 2);
  std::memcpy(&min_bits, raw + 2, 2);
  header.d = half_to_float(d_bits);
  header.dmin = half_to_float(min_bits);
  k4_scales(raw + 4, header.scale, header.minimum);
  return header;
}

// A K-quant super-block decoded: codes[256] (Q6_K's already less 32), the float scale of each
// 16 weights (scale16[16]: a Q4_K/Q5_K sub-block's twice) and the offset of each 32 (offset32[8],
// 0 for Q6_K), so that w = scale * code - offset as ggml dequantizes. Scalar; the AVX2 dot
// decodes in registers instead.
template <int64_t KIND>
void decode_k(const uint8_t* raw, int32_t* codes, float* scale16, float* offset32) {
  if constexpr (KIND == kQ6_K) {
    const uint8_t* ql = raw;
    const uint8_t* qh = raw + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(raw + 192);
    uint16_t d_bits;
    std::memcpy(&d_bits, raw + 208, 2);
    const float d = half_to_float(d_bits);
    for (int i = 0; i < 16; ++i) scale16[i] = d * static_cast<float>(sc[i]);
    for (int i = 0; i < 8; ++i) offset32[i] = 0.f;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t a = ql[64 * h + l], b = ql[64 * h + 32 + l], high = qh[32 * h + l];
        int32_t* out = codes + 128 * h;
        out[l] = ((a & 0x0F) | (((high >> 0) & 3) << 4)) - 32;
        out[l + 32] = ((b & 0x0F) | (((high >> 2) & 3) << 4)) - 32;
        out[l + 64] = ((a >> 4) | (((high >> 4) & 3) << 4)) - 32;
        out[l + 96] = ((b >> 4) | (((high >> 6) & 3) << 4)) - 32;
      }
    }
  } else {
    const K4Header header = k4_header(raw);
    const uint8_t* qh = raw + 16;
    const uint8_t* qs = raw + (KIND == kQ5_K ? 48 : 16);
    for (int i = 0; i < 8; ++i) {
      scale16[2 * i] = scale16[2 * i + 1] = header.d * static_cast<float>(header.scale[i]);
      offset32[i] = header.dmin * static_cast<float>(header.minimum[i]);
      for (int l = 0; l < 32; ++l) {
        const uint8_t byte = qs[32 * (i / 2) + l];
        int32_t code = (i % 2) ? byte >> 4 : byte & 0x0F;
        if constexpr (KIND == kQ5_K) code |= ((qh[l] >> i) & 1) << 4;
        codes[32 * i + l] = code;
      }
    }
  }
}

// One block of 32 values: int8 codes round-half-even(x / d), d = max|x| / 127, and d * sum(codes)
// (Q4_1's minimum term), in AVX2: the same float32 operations as the scalar loop it replaced
// and as packed_reference.quantize_activations (a multiply by 1 / d, rounded to nearest even),
// so the same bits. A block with a NaN or infinity gets scale NaN and codes 0: its outputs are
// NaN (as the float path's would be) and the runner's non-finite check still fires.
inline void quantize_block(const float* src, int8_t* codes, float* scale_out, float* sum_out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 v[4], peak = _mm256_setzero_ps();
  int finite = 0xFF;
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(src + 8 * i);
    const __m256 magnitude = _mm256_andnot_ps(sign, v[i]);
    finite &= _mm256_movemask_ps(_mm256_cmp_ps(magnitude, largest, _CMP_LE_OQ));  // NaN: false
    peak = _mm256_max_ps(peak, magnitude);
  }
  if (finite != 0xFF) {
    std::memset(codes, 0, kBlock);
    *scale_out = *sum_out = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  __m128 top = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
  top = _mm_max_ps(top, _mm_movehl_ps(top, top));
  top = _mm_max_ss(top, _mm_movehdup_ps(top));
  const float scale = _mm_cvtss_f32(top) / 127.f;
  const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inverse),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  const __m256i total =
      _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1));
  // packs interleave 128-bit lanes; the permute puts the 32 codes back in order.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                            _mm256_packs_epi32(q[2], q[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes),
                      _mm256_permutevar8x32_epi32(packed, order));
  *scale_out = scale;
  *sum_out = scale * static_cast<float>(_mm_cvtsi128_si32(sum));
}

// Every block of the rows of x (m, k), k a multiple of 32.
void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* codes, float* scales,
                   float* block_sums) {
  at::parallel_for(0, m * (k / kBlock), 256, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {  // rows are contiguous: r * blocks + b
      quantize_block(x + index * kBlock, codes + index * kBlock, scales + index,
                     block_sums + index);
    }
  });
}

// 16 bytes of nibbles -> 32 unsigned codes in element order (low nibbles, then high).
inline __m256i unpack_nibbles(const uint8_t* packed) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(bytes, mask);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  return _mm256_set_m128i(high, low);
}

// 32 unsigned x 32 signed bytes -> 8 float partial sums (exact: |pair sums| < 2^15).
inline __m256 dot_unsigned_signed(__m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// Signed x signed through the unsigned form: |a| * (b * sign(a)).
inline __m256 dot_signed(__m256i a, __m256i b) {
  return dot_unsigned_signed(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

struct PackedView {
  const uint8_t* quants;  // (n, blocks, quant_bytes); K-quants: (n, super-blocks, block bytes)
  const uint16_t* scales;  // (n, blocks) float16 bits (not for K-quants)
  const uint16_t* mins;  // (n, blocks) float16 bits, Q4_1 only
  int64_t blocks;  // blocks (K-quants: super-blocks) per row
  int64_t quant_bytes;
};

struct QuantizedRows {
  const int8_t* codes;  // (m, k)
  const float* scales;  // (m, k / 32)
  const float* block_sums;  // (m, k / 32)
  int64_t k;
};

// out[r] = row r of x (rows first .. first + R) . K-quant weight row j.
template <int64_t KIND, int64_t R>
void dot_k_weight_row(const PackedView& w, int64_t j, const QuantizedRows& x, int64_t first,
                      float* out) {
  constexpr int64_t kBytes = k_block_bytes(KIND);
  const int64_t x_blocks = x.k / kBlock;
  const uint8_t* row_bytes = w.quants + j * w.blocks * kBytes;
  float extra[R] = {};
  __m256 acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  for (int64_t s = 0; s < w.blocks; ++s) {
    const uint8_t* raw = row_bytes + s * kBytes;
    if constexpr (KIND == kQ6_K) {
      const int8_t* sc = reinterpret_cast<const int8_t*>(raw + 192);
      uint16_t d_bits;
      std::memcpy(&d_bits, raw + 208, 2);
      const float d = half_to_float(d_bits);
      for (int i = 0; i < 8; ++i) {  // sub-blocks of 32: half i / 4, quarter i % 4
        const int half = i / 4, quarter = i % 4;
        const __m256i ql = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(raw + 64 * half + 32 * (quarter & 1)));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(raw + 128 + 32 * half));
        const __m256i nibbles = quarter < 2 ? _mm256_and_si256(ql, low_mask)
                                            : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low_mask);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * quarter),
                                              _mm256_set1_epi8(3));
        const __m256i codes = _mm256_sub_epi8(
            _mm256_or_si256(nibbles, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
        // Weights 0-15 of the sub-block take scale sc[8 * half + 2 * quarter], 16-31 the next.
        const __m256i scale16 = _mm256_set_m128i(_mm_set1_epi16(sc[8 * half + 2 * quarter + 1]),
                                                 _mm_set1_epi16(sc[8 * half + 2 * quarter]));
        const __m256i magnitude = _mm256_sign_epi8(codes, codes);
        const int64_t b = s * 8 + i;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = first + r;
          const __m256i xv = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(x.codes + row * x.k + b * kBlock));
          // |code| <= 32, |x| <= 127, |sc| <= 128: every partial sum is exact in int32 and float.
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, codes));
          const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, scale16));
          acc[r] = _mm256_fmadd_ps(dots, _mm256_set1_ps(d * x.scales[row * x_blocks + b]), acc[r]);
        }
      }
    } else {
      const K4Header header = k4_header(raw);
      const uint8_t* qs = raw + (KIND == kQ5_K ? 48 : 16);
      __m256i qh;
      if constexpr (KIND == kQ5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(raw + 16));
      for (int i = 0; i < 8; ++i) {  // sub-block i: the low (even i) or high nibbles of 32 bytes
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (i / 2)));
        __m256i codes = (i % 2) ? _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask)
                                : _mm256_and_si256(bytes, low_mask);
        if constexpr (KIND == kQ5_K) {
          const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << i));
          const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
          codes = _mm256_or_si256(codes, _mm256_and_si256(set, _mm256_set1_epi8(16)));
        }
        const float weight_scale = header.d * static_cast<float>(header.scale[i]);
        const float weight_offset = header.dmin * static_cast<float>(header.minimum[i]);
        const int64_t b = s * 8 + i;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = first + r;
          const __m256i xv = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(x.codes + row * x.k + b * kBlock));
          acc[r] = _mm256_fmadd_ps(dot_unsigned_signed(codes, xv),
                                   _mm256_set1_ps(weight_scale * x.scales[row * x_blocks + b]),
                                   acc[r]);
          extra[r] -= weight_offset * x.block_sums[row * x_blocks + b];
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) out[r] = horizontal_sum(acc[r]) + extra[r];
}

// out[r] = row r of x (rows first .. first + R) . weight row j.
template <int64_t KIND, int64_t R>
void dot_weight_row(const PackedView& w, int64_t j, const QuantizedRows& x, int64_t first,
                    float* out) {
  const int64_t blocks = w.blocks;
  const uint8_t* quants = w.quants + j * blocks * w.quant_bytes;
  const uint16_t* scales = w.scales + j * blocks;
  const uint16_t* mins = KIND == kQ4_1 ? w.mins + j * blocks : nullptr;
  float extra[R] = {};
  __m256 acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const float weight_scale = half_to_float(scales[b]);
    const float weight_min = KIND == kQ4_1 ? half_to_float(mins[b]) : 0.f;  // once per block
    __m256i codes;
    if constexpr (KIND == kQ8_0) {
      codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + b * 32));
    } else {
      codes = unpack_nibbles(quants + b * 16);
      if constexpr (KIND == kQ4_0) codes = _mm256_sub_epi8(codes, _mm256_set1_epi8(8));
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = first + r;
      const __m256i xv = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(x.codes + row * x.k + b * kBlock));
      const __m256 dots = KIND == kQ4_1 ? dot_unsigned_signed(codes, xv) : dot_signed(codes, xv);
      acc[r] = _mm256_fmadd_ps(dots, _mm256_set1_ps(weight_scale * x.scales[row * blocks + b]),
                               acc[r]);
      if constexpr (KIND == kQ4_1) extra[r] += weight_min * x.block_sums[row * blocks + b];
    }
  }
  for (int64_t r = 0; r < R; ++r) out[r] = horizontal_sum(acc[r]) + extra[r];
}

template <int64_t KIND, int64_t R>
inline void dot_row(const PackedView& w, int64_t j, const QuantizedRows& x, int64_t first,
                    float* out) {
  if constexpr (is_k(KIND)) {
    dot_k_weight_row<KIND, R>(w, j, x, first, out);
  } else {
    dot_weight_row<KIND, R>(w, j, x, first, out);
  }
}

template <int64_t KIND>
void packed_linear_impl(const PackedView& w, int64_t n, const QuantizedRows& x, int64_t m,
                        float* y) {
  // NOTE: each output depends only on its own row of x and of w, computed by the same code
  // whatever m is, so a request's logits do not depend on what it is batched with.
  at::parallel_for(0, (n + kWeightTile - 1) / kWeightTile, 1, [&](int64_t begin, int64_t end) {
    float out[kRowGroup];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t j_end = std::min(n, (tile + 1) * kWeightTile);
      for (int64_t first = 0; first < m; first += kRowGroup) {
        const int64_t rows = std::min(kRowGroup, m - first);
        for (int64_t j = tile * kWeightTile; j < j_end; ++j) {
          switch (rows) {
            case 4: dot_row<KIND, 4>(w, j, x, first, out); break;
            case 3: dot_row<KIND, 3>(w, j, x, first, out); break;
            case 2: dot_row<KIND, 2>(w, j, x, first, out); break;
            default: dot_row<KIND, 1>(w, j, x, first, out); break;
          }
          for (int64_t r = 0; r < rows; ++r) y[(first + r) * n + j] = out[r];
        }
      }
    }
  });
}

// The packed weight's arrays checked against each other (any mismatch would read out of bounds).
// Returns the weight's columns.
int64_t check_packed(int64_t kind, const torch::Tensor& quants,
                     const c10::optional<torch::Tensor>& scales,
                     const c10::optional<torch::Tensor>& mins) {
  TORCH_CHECK(kind >= kQ8_0 && kind <= kQ6_K, "unknown packed format ", kind);
  TORCH_CHECK(quants.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(quants.dim() == 3 && quants.is_contiguous() && quants.element_size() == 1 &&
                  (quants.scalar_type() == at::kChar || quants.scalar_type() == at::kByte),
              "quants: contiguous (n, blocks, bytes) int8 or uint8");
  if (is_k(kind)) {
    TORCH_CHECK(quants.size(2) == k_block_bytes(kind), "block width does not match format");
    TORCH_CHECK(!scales.has_value() && !mins.has_value(),
                "K-quants keep their scales in their blocks: pass no scales or mins");
    return quants.size(1) * kSuper;
  }
  TORCH_CHECK(quants.size(2) == (kind == kQ8_0 ? 32 : 16), "block width does not match format");
  TORCH_CHECK(scales.has_value() && scales->device().is_cpu() &&
                  scales->scalar_type() == at::kHalf && scales->is_contiguous() &&
                  scales->dim() == 2 && scales->size(0) == quants.size(0) &&
                  scales->size(1) == quants.size(1),
              "scales: contiguous (n, blocks) float16");
  TORCH_CHECK((kind == kQ4_1) == mins.has_value(), "mins go with Q4_1 only");
  if (mins.has_value()) {
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->sizes() == scales->sizes() &&
                    mins->is_contiguous() && mins->device().is_cpu(),
                "mins: contiguous (n, blocks) float16");
  }
  return quants.size(1) * kBlock;
}

const uint16_t* half_bits(const c10::optional<torch::Tensor>& values) {
  return values.has_value() ? reinterpret_cast<const uint16_t*>(values->data_ptr()) : nullptr;
}

torch::Tensor packed_linear(torch::Tensor x, int64_t kind, torch::Tensor quants,
                            c10::optional<torch::Tensor> scales, c10::optional<torch::Tensor> mins) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x: (m, k) float32 on the CPU");
  const int64_t columns = check_packed(kind, quants, scales, mins);
  const int64_t n = quants.size(0), k = x.size(1), blocks = k / kBlock;
  TORCH_CHECK(k == columns, "x has ", k, " columns, the weight ", columns);
  x = x.contiguous();
  const int64_t m = x.size(0);
  // The quantized rows live in this thread's scratch buffers, reused across calls (a decode
  // token makes ~120 of them; three tensor allocations each cost more than quantizing).
  thread_local std::vector<int8_t> codes;
  thread_local std::vector<float> x_scales, x_sums;
  codes.resize(static_cast<size_t>(m * k));
  x_scales.resize(static_cast<size_t>(m * blocks));
  x_sums.resize(static_cast<size_t>(m * blocks));
  quantize_rows(x.data_ptr<float>(), m, k, codes.data(), x_scales.data(), x_sums.data());
  auto y = torch::empty({m, n}, x.options());
  const PackedView w{reinterpret_cast<const uint8_t*>(quants.data_ptr()), half_bits(scales),
                     half_bits(mins), quants.size(1), quants.size(2)};
  const QuantizedRows rows{codes.data(), x_scales.data(), x_sums.data(), k};
  float* out = y.data_ptr<float>();
  switch (kind) {
    case kQ8_0: packed_linear_impl<kQ8_0>(w, n, rows, m, out); break;
    case kQ4_0: packed_linear_impl<kQ4_0>(w, n, rows, m, out); break;
    case kQ4_1: packed_linear_impl<kQ4_1>(w, n, rows, m, out); break;
    case kQ4_K: packed_linear_impl<kQ4_K>(w, n, rows, m, out); break;
    case kQ5_K: packed_linear_impl<kQ5_K>(w, n, rows, m, out); break;
    default: packed_linear_impl<kQ6_K>(w, n, rows, m, out); break;
  }
  return y;
}

template <int64_t KIND>
void dequantize_k(const uint8_t* q, int64_t supers, float* dst) {
  at::parallel_for(0, supers, 64, [&](int64_t begin, int64_t end) {
    int32_t codes[kSuper];
    float scale16[16], offset32[8];
    for (int64_t index = begin; index < end; ++index) {
      decode_k<KIND>(q + index * k_block_bytes(KIND), codes, scale16, offset32);
      float* values = dst + index * kSuper;
      for (int64_t e = 0; e < kSuper; ++e) {  // ggml: (d * sc) * q - dmin * m
        values[e] = scale16[e / 16] * static_cast<float>(codes[e]) - offset32[e / 32];
      }
    }
  });
}

// The weight as float32 (n, k): what prefill-sized batches multiply by with a float GEMM, which
// beats the integer path there (it reuses each weight across many rows; ours re-reads blocks).
torch::Tensor packed_dequantize(int64_t kind, torch::Tensor quants,
                                c10::optional<torch::Tensor> scales,
                                c10::optional<torch::Tensor> mins) {
  const int64_t columns = check_packed(kind, quants, scales, mins);
  const int64_t n = quants.size(0), blocks = quants.size(1), width = quants.size(2);
  auto out = torch::empty({n, columns}, quants.options().dtype(at::kFloat));
  const uint8_t* q = reinterpret_cast<const uint8_t*>(quants.data_ptr());
  float* dst = out.data_ptr<float>();
  switch (kind) {
    case kQ4_K: dequantize_k<kQ4_K>(q, n * blocks, dst); return out;
    case kQ5_K: dequantize_k<kQ5_K>(q, n * blocks, dst); return out;
    case kQ6_K: dequantize_k<kQ6_K>(q, n * blocks, dst); return out;
    default: break;
  }
  const uint16_t* d = half_bits(scales);
  const uint16_t* mn = half_bits(mins);
  at::parallel_for(0, n * blocks, 512, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const float scale = half_to_float(d[index]);
      const uint8_t* block = q + index * width;
      float* values = dst + index * kBlock;
      if (kind == kQ8_0) {
        for (int64_t i = 0; i < kBlock; ++i) values[i] = scale * static_cast<int8_t>(block[i]);
      } else if (kind == kQ4_0) {
        for (int64_t i = 0; i < 16; ++i) {
          values[i] = scale * static_cast<float>((block[i] & 0x0F) - 8);
          values[i + 16] = scale * static_cast<float>((block[i] >> 4) - 8);
        }
      } else {  // Q4_1 (-ffp-contract may fuse this into one rounding: within 1 ulp of ggml's)
        const float low = half_to_float(mn[index]);
        for (int64_t i = 0; i < 16; ++i) {
          values[i] = scale * static_cast<float>(block[i] & 0x0F) + low;
          values[i + 16] = scale * static_cast<float>(block[i] >> 4) + low;
        }
      }
    }
  });
  return out;
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void add_scaled(float* acc, const float* v, float weight, int64_t n) {
  int64_t i = 0;
  const __m256 w = _mm256_set1_ps(weight);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
  }
  for (; i < n; ++i) acc[i] += weight * v[i];
}

// Decode attention for float32 over a paged cache, in place over block tables: what the
// AVX-512 module's paged_decode_attention does, for CPUs that have only AVX2 (the torch path
// gathers every block into a new tensor each layer and step). q (B, heads, hd); caches
// (blocks, block_size, kv_heads, hd), head_dim contiguous; tables (B, W) with lens (B,), or per
// kv head (B, kv_heads, W) with lens (B, kv_heads). Each (sequence, query head) is computed alone,
// in a fixed order (scores, max, exp, sum, then the weighted values), so a row does not depend
// on the batch.
torch::Tensor decode_attention_f32(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                   torch::Tensor tables, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.device().is_cpu(),
              "q: (batch, heads, head_dim) float32 on the CPU");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "caches: (blocks, block_size, kv_heads, head_dim) float32, K and V alike");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k_cache.strides() == v_cache.strides(), "K and V caches must share strides");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "q and the caches have different head_dim");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1),
                kv_heads = k_cache.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(block_size > 0, "blocks of no rows");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "tables and lens are int64");
  const bool per_head = tables.dim() == 3;
  TORCH_CHECK((tables.dim() == 2 && lens.dim() == 1 && tables.size(0) == batch &&
               lens.size(0) == batch) ||
                  (per_head && lens.dim() == 2 && tables.size(0) == batch &&
                   tables.size(1) == kv_heads && lens.size(0) == batch &&
                   lens.size(1) == kv_heads),
              "tables (batch, width) with lens (batch,), or per kv head: tables (batch, "
              "kv_heads, width) with lens (batch, kv_heads)");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  const int64_t width = tables.size(-1);
  const int64_t* table_data = tables.data_ptr<int64_t>();
  const int64_t* len_data = lens.data_ptr<int64_t>();
  // Every block a length reaches must exist: checked here, not inside the parallel loop.
  const int64_t lists = per_head ? batch * kv_heads : batch;
  for (int64_t list = 0; list < lists; ++list) {
    const int64_t len = len_data[list];
    TORCH_CHECK(len >= 0 && len <= width * block_size, "a length exceeds its block table");
    for (int64_t j = 0; j < (len + block_size - 1) / block_size; ++j) {
      const int64_t block = table_data[list * width + j];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block ", block, " is not in the cache");
    }
  }
  auto out = torch::empty_like(q);
  const float* q_data = q.data_ptr<float>();
  const float* k_data = k_cache.data_ptr<float>();
  const float* v_data = v_cache.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t s_block = k_cache.stride(0), s_row = k_cache.stride(1), s_head = k_cache.stride(2);
  const int64_t group = heads / kv_heads;
  const float softmax_scale = static_cast<float>(scale);
  // One task per (sequence, query head): at batch 1 the heads, not the few kv heads, spread
  // the work over the threads.
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, head = task % heads, kv = head / group;
      const int64_t list = per_head ? b * kv_heads + kv : b;
      const int64_t* table = table_data + list * width;
      const int64_t len = len_data[list];
      const float* query = q_data + task * head_dim;
      float* result = out_data + task * head_dim;
      std::fill(result, result + head_dim, 0.f);
      if (len == 0) continue;
      scores.resize(static_cast<size_t>(len));
      // Key t's row: block table[t / block_size], row t % block_size, walked block by block.
      auto for_each_key = [&](auto&& visit) {
        for (int64_t t0 = 0; t0 < len; t0 += block_size) {
          const float* k_rows = k_data + table[t0 / block_size] * s_block + kv * s_head;
          const float* v_rows = v_data + table[t0 / block_size] * s_block + kv * s_head;
          const int64_t rows = std::min(block_size, len - t0);
          for (int64_t i = 0; i < rows; ++i) visit(t0 + i, k_rows + i * s_row, v_rows + i * s_row);
        }
      };
      float top = -std::numeric_limits<float>::infinity();
      for_each_key([&](int64_t t, const float* key, const float*) {
        scores[t] = dot_f32(query, key, head_dim) * softmax_scale;
        top = std::fmax(top, scores[t]);
      });
      float total = 0.f;
      for (int64_t t = 0; t < len; ++t) {
        scores[t] = std::exp(scores[t] - top);
        total += scores[t];
      }
      const float inverse = 1.f / total;
      if (head_dim == 64) {  // SmolLM2, Llama 3.2 1B: the sum stays in registers
        __m256 acc[8];
        for (auto& a : acc) a = _mm256_setzero_ps();
        for_each_key([&](int64_t t, const float*, const float* value) {
          const __m256 w = _mm256_set1_ps(scores[t] * inverse);
          for (int i = 0; i < 8; ++i) {
            acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + 8 * i), acc[i]);
          }
        });
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(result + 8 * i, acc[i]);
      } else {
        for_each_key([&](int64_t t, const float*, const float* value) {
          add_scaled(result, value, scores[t] * inverse, head_dim);
        });
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_linear", &packed_linear,
        "y (m, n) float32 = x (m, k) float32 @ w.T for w packed as Q8_0 (0), Q4_0 (1), Q4_1 (2), "
        "Q4_K (3), Q5_K (4) or Q6_K (5); K-quants pass their raw blocks and no scales or mins");
  m.def("packed_dequantize", &packed_dequantize, "the packed weight as float32 (n, k)");
  // elementwise.cpp's fused layer steps: on an AVX2 CPU their AVX2 (float32) and scalar loops
  // replace several torch ops each, whose per-call overhead dominates a decode step there.
  m.def("add_rms_norm", &tierserve::add_rms_norm, "(weight * norm(x + residual), x + residual)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rotary_", &tierserve::rotary_, "rotary embedding of the first heads of qkv, in place");
  m.def("silu_mul", &tierserve::silu_mul, "SiLU(gate_up[:, :n]) * gate_up[:, n:]");
  // Named as the AVX-512 module names its own, so the fused forward takes either module.
  m.def("paged_decode_attention", &decode_attention_f32,
        "float32 paged decode attention over block tables (AVX2; the AVX-512 module has its own)");
  m.def("store_kv_", &tierserve::store_kv_,
        "k_cache[slot_blocks, slot_offsets] = k[:n] and the same for v, in place");
}
