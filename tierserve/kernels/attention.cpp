// paged_decode_attention: one query token per sequence attends to its keys and values in place,
// through its block table: no gather of the cache into a contiguous copy, no padding to the
// longest sequence. Each task (a sequence, or one of its kv heads) is computed the same way
// whatever else is in the batch, so a row's result never depends on the batch. Accumulates in
// float32 and rounds once to the output dtype.

#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace tierserve {
namespace {

inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i));
    __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(widened));
  }
#endif
  for (; i < n; ++i) dst[i] = bf16_to_float(bits[i]);
}

inline void to_float(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// s[i] = exp(s[i] - top) for all i; returns the sum. Vectorized with a degree-6 polynomial on
// the reduced argument (relative error ~2e-7, as good as expf for softmax weights).
// The largest of s[0..n) (std::max_element is a scalar loop: a third of a long context's
// softmax time).
inline float max_of(const float* s, int64_t n) {
  int64_t i = 0;
  float top = -INFINITY;
#if defined(__AVX512F__)
  __m512 most = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(s + i));
  top = _mm512_reduce_max_ps(most);
#endif
  for (; i < n; ++i) top = std::max(top, s[i]);
  return top;
}

inline float exp_shifted_sum(float* s, int64_t n, float top) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 e = tierserve::exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), shift));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - top);
    total += s[i];
  }
  return total;
}

// y += p * x
inline void axpy(float p, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 scale = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(scale, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += p * x[i];
}

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

// Every row of kv heads [h0, h0 + span) of the first ``len`` tokens, keys and values, read once
// in address order (a block's keys, head after head, then its values: one run in the engine's
// block-major cache). The hardware prefetcher follows demand loads that run through memory, so
// this runs near streaming speed and leaves the rows in L2, where passes that jump (one head's
// key rows block after block, then its values, then the next head's) wait on each miss, and
// software prefetches are held to the core's few outstanding misses. Measured on Zen 5: a
// batch's 80-token tails, 6.0 -> 5.0 ms over 30 layers (docs/benchmarks.md).
template <typename T>
inline void read_in_order(const T* kp, const T* vp, const int64_t* table, int64_t len,
                          int64_t block_size, int64_t kb, int64_t ko, int64_t kh, int64_t vb,
                          int64_t vo, int64_t vh, int64_t h0, int64_t span, int64_t head_dim) {
#if defined(__AVX512F__)
  __m512i sink = _mm512_setzero_si512();
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t blk = 0; blk * block_size < len; ++blk) {
    const int64_t rows = std::min(block_size, len - blk * block_size);
    for (int kv = 0; kv < 2; ++kv) {
      const T* base = kv == 0 ? kp + table[blk] * kb : vp + table[blk] * vb;
      const int64_t head_stride = kv == 0 ? kh : vh, row_stride = kv == 0 ? ko : vo;
      for (int64_t i = 0; i < span; ++i)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t e = 0; e < head_dim; e += kLine)
            sink = _mm512_xor_si512(
                sink, _mm512_loadu_si512(base + (h0 + i) * head_stride + r * row_stride + e));
    }
  }
  asm volatile("" : : "v"(sink));
#endif
}

#if defined(__AVX512F__)
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16));
}

// One kv head of one sequence, for a head size and group size known at compile time: the
// queries and the output accumulators stay in registers while the keys and values stream past.
// Same arithmetic, in the same order, as the generic loop below.
constexpr int64_t kPrefetchBlocks = 2;  // blocks of one head requested ahead of use
constexpr int64_t kTouchBytes = 256 << 10;  // a task's keys and values read ahead up to this (L2 / 4)

#if defined(__AVX512BF16__)
// Sixteen vectors in, one out: lane r of the result is the sum of v[r]'s sixteen lanes. A
// transpose-and-add tree, ~3 instructions a vector where sixteen separate reductions take ~10.
inline __m512 reduce16(__m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // per 128-bit chunk: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per chunk: rows 4i..4i+3, each summed over that chunk
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i) {  // chunks: [b0 (c0+c1), b0 (c2+c3), b1 (c0+c1), b1 (c2+c3)]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of G bfloat16 queries against the ``rows`` (<= 16) cached bfloat16 keys at ``keys``:
// AVX-512 BF16 dot products (exact products, float32 sums), sixteen rows reduced at once.
template <int HD, int G>
inline void score_rows_bf16(const __m512bh (&q)[G][HD / 32], const at::BFloat16* keys,
                            int64_t row_stride, int64_t rows, float scale, float* scores,
                            int64_t len) {
  const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
  for (int g = 0; g < G; ++g) {
    __m512 sums[16];
    for (int64_t r = 0; r < 16; ++r) {
      sums[r] = _mm512_setzero_ps();
      if (r >= rows) continue;
      for (int j = 0; j < HD / 32; ++j) {
        __m512bh k = (__m512bh)_mm512_loadu_si512(keys + r * row_stride + j * 32);
        sums[r] = _mm512_dpbf16_ps(sums[r], k, q[g][j]);
      }
    }
    _mm512_mask_storeu_ps(scores + g * len, valid,
                          _mm512_mul_ps(reduce16(sums), _mm512_set1_ps(scale)));
  }
}
#endif

#if defined(__AVX512BF16__)
// sum_r p[g][r] * V[r] for bfloat16 values, with AVX-512 BF16 dot products over pairs of rows:
// the probabilities are rounded to bfloat16 (as torch's CPU flash attention does before its
// P @ V) and each product pair summed in float32. Rows r, r+1 are interleaved 16 bits at a time
// (unpacklo/hi inside each 128-bit lane), so accumulator 2j holds dims 32j + {0-3, 8-11, 16-19,
// 24-27} and 2j+1 the other four of each eight; the result is put back in order at the end.
// ``block_size`` must be even (row pairs never straddle blocks).
template <int HD, int G>
inline void weigh_values_bf16(const float* probs, const at::BFloat16* vp, const int64_t* table,
                              int64_t len, int64_t block_size, int64_t vb, int64_t vo,
                              int64_t v_head, __m512 (&acc)[G][HD / 16]) {
  constexpr int V = HD / 16;
  const int64_t num_pairs = (len + 1) / 2;
  thread_local std::vector<uint32_t> pairs;  // (p[2i], p[2i+1]) as two bfloat16, per query
  pairs.resize(G * num_pairs);
  for (int g = 0; g < G; ++g) {
    const float* p = probs + g * len;
    uint32_t* out = pairs.data() + g * num_pairs;
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
      __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + i + 16), _mm512_loadu_ps(p + i));
      _mm512_storeu_si512(out + i / 2, (__m512i)packed);
    }
    for (; i < len; i += 2) {
      const at::BFloat16 lo(p[i]), hi(i + 1 < len ? p[i + 1] : 0.f);
      out[i / 2] = static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
    }
  }
  __m512 part[G][V];  // permuted dims, see above
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < V; ++j) part[g][j] = _mm512_setzero_ps();
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    prefetch_block(vp, table, blk + kPrefetchBlocks, len, block_size, vb, vo, v_head, HD);
    const at::BFloat16* block = vp + table[blk] * vb + v_head;
    const int64_t first = blk * block_size, rows = std::min(block_size, len - first);
    for (int64_t r = 0; r < rows; r += 2) {
      const bool both = r + 1 < rows;  // an odd last row pairs with zeros (and p = 0)
      for (int j = 0; j < HD / 32; ++j) {
        const __m512i a = _mm512_loadu_si512(block + r * vo + j * 32);
        const __m512i b = both ? _mm512_loadu_si512(block + (r + 1) * vo + j * 32)
                               : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
        const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        for (int g = 0; g < G; ++g) {
          const __m512bh w = (__m512bh)_mm512_set1_epi32(
              static_cast<int>(pairs[g * num_pairs + (first + r) / 2]));
          part[g][2 * j] = _mm512_dpbf16_ps(part[g][2 * j], lo, w);
          part[g][2 * j + 1] = _mm512_dpbf16_ps(part[g][2 * j + 1], hi, w);
        }
      }
    }
  }
  // Back in order: dims 32j + 8L + c come from lane 4L + c of part 2j (c < 4) or 2j+1 (c >= 4).
  alignas(64) float lo[16], hi[16], ordered[32];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < HD / 32; ++j) {
      _mm512_store_ps(lo, part[g][2 * j]);
      _mm512_store_ps(hi, part[g][2 * j + 1]);
      for (int lane = 0; lane < 4; ++lane) {
        for (int c = 0; c < 4; ++c) {
          ordered[8 * lane + c] = lo[4 * lane + c];
          ordered[8 * lane + 4 + c] = hi[4 * lane + c];
        }
      }
      acc[g][2 * j] = _mm512_load_ps(ordered);
      acc[g][2 * j + 1] = _mm512_load_ps(ordered + 16);
    }
  }
}
#endif

// ``stats`` (or nullptr): per query, the largest score and the softmax's sum of exponentials
// relative to it, so a caller can merge this result with one over other keys.
template <typename T, int HD, int G>
void attend_head(const float* query, const T* kp, const T* vp, const int64_t* table, int64_t len,
                 int64_t block_size, int64_t kb, int64_t ko, int64_t vb, int64_t vo,
                 int64_t k_head, int64_t v_head, float scale, float* scores, float* out,
                 float* stats) {
  constexpr int V = HD / 16;
  __m512 q[G][V];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < V; ++j) q[g][j] = _mm512_loadu_ps(query + g * HD + j * 16);
#if defined(__AVX512BF16__)
  // The queries were bfloat16: packing them back is exact. Used by the keys' dot products.
  __m512bh qb[G][HD / 32];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < HD / 32; ++j) qb[g][j] = _mm512_cvtne2ps_pbh(q[g][2 * j + 1], q[g][2 * j]);
#endif
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t ahead = 0; ahead < kPrefetchBlocks; ++ahead) {
    prefetch_block(kp, table, ahead, len, block_size, kb, ko, k_head, HD);
  }
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    prefetch_block(kp, table, blk + kPrefetchBlocks, len, block_size, kb, ko, k_head, HD);
    if (blk + kPrefetchBlocks >= num_blocks) {  // keys nearly done: start on the values
      prefetch_block(vp, table, blk + kPrefetchBlocks - num_blocks, len, block_size, vb, vo,
                     v_head, HD);
    }
    const T* block = kp + table[blk] * kb + k_head;
    const int64_t first = blk * block_size, rows = std::min(block_size, len - first);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        score_rows_bf16<HD, G>(qb, block + r0 * ko, ko, std::min<int64_t>(16, rows - r0), scale,
                               scores + first + r0, len);
      }
      continue;
    }
#endif
    for (int64_t r = 0; r < rows; ++r) {
      __m512 k[V];
      for (int j = 0; j < V; ++j) k[j] = load16(block + r * ko + j * 16);
      for (int g = 0; g < G; ++g) {
        __m512 sum = _mm512_mul_ps(q[g][0], k[0]);
        for (int j = 1; j < V; ++j) sum = _mm512_fmadd_ps(q[g][j], k[j], sum);
        scores[g * len + first + r] = _mm512_reduce_add_ps(sum) * scale;
      }
    }
  }
  float denom[G];
  for (int g = 0; g < G; ++g) {
    float* s = scores + g * len;
    const float top = max_of(s, len);
    denom[g] = exp_shifted_sum(s, len, top);
    if (stats != nullptr) {
      stats[2 * g] = top;
      stats[2 * g + 1] = denom[g];
    }
  }
  __m512 acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < V; ++j) acc[g][j] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (block_size % 2 == 0) {
      weigh_values_bf16<HD, G>(scores, vp, table, len, block_size, vb, vo, v_head, acc);
      for (int g = 0; g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(1.f / denom[g]);
        for (int j = 0; j < V; ++j) _mm512_storeu_ps(out + g * HD + j * 16, _mm512_mul_ps(acc[g][j], inv));
      }
      return;
    }
  }
#endif
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    prefetch_block(vp, table, blk + kPrefetchBlocks, len, block_size, vb, vo, v_head, HD);
    const T* block = vp + table[blk] * vb + v_head;
    const int64_t first = blk * block_size, rows = std::min(block_size, len - first);
    for (int64_t r = 0; r < rows; ++r) {
      __m512 v[V];
      for (int j = 0; j < V; ++j) v[j] = load16(block + r * vo + j * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * len + first + r]);
        for (int j = 0; j < V; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = 1.f / denom[g];
    for (int j = 0; j < V; ++j) {
      _mm512_storeu_ps(out + g * HD + j * 16, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv)));
    }
  }
}

template <typename T>
using AttendHead = void (*)(const float*, const T*, const T*, const int64_t*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float*,
                            float*, float*);

template <typename T, int HD>
AttendHead<T> attend_head_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_head<T, HD, 1>;
    case 2: return attend_head<T, HD, 2>;
    case 3: return attend_head<T, HD, 3>;
    case 4: return attend_head<T, HD, 4>;
    case 5: return attend_head<T, HD, 5>;
    case 6: return attend_head<T, HD, 6>;
    case 7: return attend_head<T, HD, 7>;
    case 8: return attend_head<T, HD, 8>;
    default: return nullptr;
  }
}

template <typename T>
AttendHead<T> attend_head_for(int64_t head_dim, int64_t group) {
  if (head_dim == 64) return attend_head_for_group<T, 64>(group);
  if (head_dim == 128) return attend_head_for_group<T, 128>(group);
  return nullptr;
}
#endif

// ``stats`` (or nullptr): (batch, heads, 2) floats, each query's largest score and sum of
// exponentials relative to it (see attend_head).
// ``O``: the output's element type (float32 for a caller that merges results before rounding).
template <typename T, typename O = T>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache,
                           const torch::Tensor& v_cache, const torch::Tensor& tables,
                           const torch::Tensor& lens, double scale, torch::Tensor& out,
                           float* stats = nullptr) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  // Cache strides (elements): block, offset in block, kv head; head_dim is contiguous.
  const int64_t kb = k_cache.stride(0), ko = k_cache.stride(1), kh = k_cache.stride(2);
  const int64_t vb = v_cache.stride(0), vo = v_cache.stride(1), vh = v_cache.stride(2);
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  O* op = out.data_ptr<O>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t table_width = tables.size(-1);
  const float fscale = static_cast<float>(scale);
  // Per-head tables (KV selection): tables (batch, kv_heads, width), lens (batch, kv_heads);
  // each kv head reads its own blocks. Otherwise one table and length per sequence.
  const bool per_head = tables.dim() == 3;
  auto head_len = [&](int64_t b, int64_t h) { return per_head ? lp[b * num_kv_heads + h] : lp[b]; };
  auto head_table = [&](int64_t b, int64_t h) {
    return tp + (per_head ? b * num_kv_heads + h : b) * table_width;
  };

  // A task is one sequence with all its kv heads (each cached row is then read front to back),
  // or, when there are too few sequences to keep every thread busy or each head reads its own
  // blocks, one (sequence, kv head).
  const int64_t span = !per_head && batch >= 2 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t tasks_per_seq = num_kv_heads / span;
#if defined(__AVX512F__)
  const AttendHead<T> fast = attend_head_for<T>(head_dim, group);
#endif
  // Threads take tasks longest context first from a shared counter, so sequences of very
  // different lengths still finish together (a static split leaves one thread idle).
  const int64_t num_tasks = batch * tasks_per_seq;
  std::vector<int64_t> order(num_tasks);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return head_len(x / tasks_per_seq, (x % tasks_per_seq) * span) >
           head_len(y / tasks_per_seq, (y % tasks_per_seq) * span);
  });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t queries = span * group;  // query heads of one task
    std::vector<float> query(queries * head_dim), acc(queries * head_dim), row(head_dim), scores,
        denom(queries);
    for (int64_t taken = next++; taken < num_tasks; taken = next++) {
      const int64_t task = order[taken];
      const int64_t b = task / tasks_per_seq, h0 = (task % tasks_per_seq) * span;
      const int64_t len = head_len(b, h0);
      const int64_t* table = head_table(b, h0);
      // A short task's rows are read once, in address order, before its passes (read_in_order).
      if (!per_head && len * span * head_dim * 2 * static_cast<int64_t>(sizeof(T)) <= kTouchBytes) {
        read_in_order(kp, vp, table, len, block_size, kb, ko, kh, vb, vo, vh, h0, span, head_dim);
      }
      to_float(qp + (b * num_heads + h0 * group) * head_dim, query.data(), queries * head_dim);
      scores.assign(queries * len, 0.f);
#if defined(__AVX512F__)
      if (fast != nullptr) {
        for (int64_t i = 0; i < span; ++i) {
          fast(query.data() + i * group * head_dim, kp, vp, table, len, block_size, kb, ko, vb,
               vo, (h0 + i) * kh, (h0 + i) * vh, fscale, scores.data() + i * group * len,
               acc.data() + i * group * head_dim,
               stats == nullptr ? nullptr : stats + 2 * (b * num_heads + (h0 + i) * group));
        }
        O* out_row = op + (b * num_heads + h0 * group) * head_dim;
        for (int64_t e = 0; e < queries * head_dim; ++e) out_row[e] = static_cast<O>(acc[e]);
        continue;
      }
#endif
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        prefetch_block(kp, table, blk + 1, len, block_size, kb, ko, h0 * kh, span * kh);
        const T* block = kp + table[blk] * kb;
        const int64_t first = blk * block_size, rows = std::min(block_size, len - first);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t i = 0; i < span; ++i) {
            to_float(block + r * ko + (h0 + i) * kh, row.data(), head_dim);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t qi = i * group + g;
              scores[qi * len + first + r] =
                  dot(query.data() + qi * head_dim, row.data(), head_dim) * fscale;
            }
          }
        }
      }
      for (int64_t qi = 0; qi < queries; ++qi) {
        float* s = scores.data() + qi * len;
        const float top = max_of(s, len);
        denom[qi] = exp_shifted_sum(s, len, top);
        if (stats != nullptr) {
          stats[2 * (b * num_heads + h0 * group + qi)] = top;
          stats[2 * (b * num_heads + h0 * group + qi) + 1] = denom[qi];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t blk = 0; blk < num_blocks; ++blk) {
        prefetch_block(vp, table, blk + 1, len, block_size, vb, vo, h0 * vh, span * vh);
        const T* block = vp + table[blk] * vb;
        const int64_t first = blk * block_size, rows = std::min(block_size, len - first);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t i = 0; i < span; ++i) {
            to_float(block + r * vo + (h0 + i) * vh, row.data(), head_dim);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t qi = i * group + g;
              axpy(scores[qi * len + first + r], row.data(), acc.data() + qi * head_dim,
                   head_dim);
            }
          }
        }
      }
      O* out_row = op + (b * num_heads + h0 * group) * head_dim;
      for (int64_t qi = 0; qi < queries; ++qi) {
        const float inv = 1.f / denom[qi];
        for (int64_t d = 0; d < head_dim; ++d) {
          out_row[qi * head_dim + d] = static_cast<O>(acc[qi * head_dim + d] * inv);
        }
      }
    }
  });
}


#if defined(__AVX512BF16__)
// ---- Shared-prefix decode attention: BatchLLM's horizontally fused prefix-shared attention ----
// Sequences whose block tables start with the same blocks (a batch group's prefix, n > 1
// siblings, any prefix-cache hit) attend over those blocks together: a task takes many queries
// of one kv head (16 at a time), transposes each key block once so that a query's scores over
// its 16 keys are one vector (one vdpbf16ps per dim pair, no horizontal sums) and interleaves
// each value block once, and the group's queries all use them while they sit in L1/L2. The
// result over the prefix and each sequence's own result over the rest of its blocks are merged
// by their softmax statistics (largest score, sum of exponentials).

constexpr int kScoreTile = 16;  // queries scored together against one transposed key block
constexpr int64_t kMaxParts = 16;  // a run is split in at most this many key ranges
constexpr int64_t kMaxLevels = 8;  // runs along one sequence's path, at most
constexpr int64_t kPrefixAhead = 4;  // blocks requested ahead while transposing the prefix

// Sixteen rows of 16 dwords transposed in registers: r[i] lane j becomes r[j] lane i (unpacks
// within 128-bit lanes, then lane shuffles; a gather per column costs several times more).
inline void transpose16x16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: column 4L + c of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i a = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    const __m512i b = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    const __m512i e = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i f = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(a, e, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(b, f, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(a, e, 0xdd);
    t[12 + c] = _mm512_shuffle_i32x4(b, f, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// kt[d], lane r: dims 2d, 2d+1 of key row r (16 rows from ``rows``, ``row_stride`` apart).
template <int HD>
inline void transpose_keys(const at::BFloat16* rows, int64_t row_stride, __m512i* kt) {
  for (int half = 0; half < HD / 32; ++half) {  // dims [32 half, 32 half + 32): 16 dwords a row
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows + i * row_stride + 32 * half);
    transpose16x16(r);
    for (int i = 0; i < 16; ++i) kt[16 * half + i] = r[i];
  }
}

// Scores of kScoreTile queries (bfloat16 pairs, HD / 2 a query) over one transposed key block.
template <int HD>
inline void score_tile(const __m512i (&kt)[HD / 2], const uint32_t* pairs, float scale,
                       float* scores, int64_t stride, __m512 (&top)[kScoreTile]) {
  __m512 acc[kScoreTile];
  for (int i = 0; i < kScoreTile; ++i) acc[i] = _mm512_setzero_ps();
  for (int d = 0; d < HD / 2; ++d) {
    const __m512bh k = (__m512bh)kt[d];
    for (int i = 0; i < kScoreTile; ++i) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[i * (HD / 2) + d]));
      acc[i] = _mm512_dpbf16_ps(acc[i], k, q);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < kScoreTile; ++i) {
    const __m512 scaled = _mm512_mul_ps(acc[i], s);
    _mm512_storeu_ps(scores + i * stride, scaled);
    top[i] = _mm512_max_ps(top[i], scaled);
  }
}

// score_tile over two key tiles at once, eight queries a pass: each query pair broadcast feeds
// two dot products, so the loads per vdpbf16ps drop from 1 + 1/16 to 10/16 (the broadcasts,
// not the dot products, were the score loop's limit). Same sums in the same order.
template <int HD>
inline void score_tile_pair(const __m512i* kt0, const __m512i* kt1, const uint32_t* pairs,
                            float scale, float* scores, int64_t stride,
                            __m512 (&top)[kScoreTile]) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int half = 0; half < kScoreTile; half += 8) {
    __m512 a0[8], a1[8];
    for (int i = 0; i < 8; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    for (int d = 0; d < HD / 2; ++d) {
      const __m512bh k0 = (__m512bh)_mm512_load_si512(kt0 + d);
      const __m512bh k1 = (__m512bh)_mm512_load_si512(kt1 + d);
      for (int i = 0; i < 8; ++i) {
        const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[(half + i) * (HD / 2) + d]));
        a0[i] = _mm512_dpbf16_ps(a0[i], k0, q);
        a1[i] = _mm512_dpbf16_ps(a1[i], k1, q);
      }
    }
    for (int i = 0; i < 8; ++i) {
      const __m512 x0 = _mm512_mul_ps(a0[i], s), x1 = _mm512_mul_ps(a1[i], s);
      _mm512_storeu_ps(scores + (half + i) * stride, x0);
      _mm512_storeu_ps(scores + (half + i) * stride + 16, x1);
      top[half + i] = _mm512_max_ps(top[half + i], _mm512_max_ps(x0, x1));
    }
  }
}

// Each of a tile's score rows (``n`` a multiple of 16): exp(s - top) rounded to bfloat16 into
// ``out`` (pairs, as weigh_tile reads them); returns the sum of the exponentials (unrounded).
inline float exp_to_bf16(const float* s, int64_t n, float top, uint32_t* out) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 e = tierserve::exp512(_mm512_sub_ps(_mm512_loadu_ps(s + k), shift));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k / 2), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(sum);
}

// out[i] = sum over the prefix of p_i * V, for QV queries, from values interleaved two rows at a
// time (vi: per row pair, per 32 dims, the unpacklo and unpackhi of the two rows) and the
// probabilities as bfloat16 pairs (as weigh_values_bf16), times ``inv[i]``.
template <int HD, int QV>
inline void weigh_tile(const __m512i* vi, int64_t num_pairs, const uint32_t* probs,
                       int64_t probs_stride, const float* inv, float* out) {
  constexpr int V = HD / 16;
  __m512 part[QV][V];
  for (int i = 0; i < QV; ++i)
    for (int j = 0; j < V; ++j) part[i][j] = _mm512_setzero_ps();
  for (int64_t pair = 0; pair < num_pairs; ++pair) {
    const __m512i* rows = vi + pair * V;
    for (int j = 0; j < HD / 32; ++j) {
      const __m512bh lo = (__m512bh)_mm512_loadu_si512(rows + 2 * j);
      const __m512bh hi = (__m512bh)_mm512_loadu_si512(rows + 2 * j + 1);
      for (int i = 0; i < QV; ++i) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(probs[i * probs_stride + pair]));
        part[i][2 * j] = _mm512_dpbf16_ps(part[i][2 * j], lo, w);
        part[i][2 * j + 1] = _mm512_dpbf16_ps(part[i][2 * j + 1], hi, w);
      }
    }
  }
  alignas(64) float lo[16], hi[16];
  for (int i = 0; i < QV; ++i) {
    for (int j = 0; j < HD / 32; ++j) {  // back in order, as in weigh_values_bf16
      _mm512_store_ps(lo, part[i][2 * j]);
      _mm512_store_ps(hi, part[i][2 * j + 1]);
      float* o = out + i * HD + j * 32;
      for (int lane = 0; lane < 4; ++lane) {
        for (int c = 0; c < 4; ++c) {
          o[8 * lane + c] = lo[4 * lane + c] * inv[i];
          o[8 * lane + 4 + c] = hi[4 * lane + c] * inv[i];
        }
      }
    }
  }
}

// Blocks [start, end) that every one of ``members`` has at the same place in its table: a node
// of the batch's prefix tree, ``level`` runs deep along its members' paths.
struct SharedRun {
  std::vector<int64_t> members;
  int64_t start, end, level;
};

// Finds the runs worth reading together: a run needs a score tile of queries per kv head (fewer
// pad the tile with nothing) and ``min_blocks`` blocks (measured: docs/benchmarks.md). A node
// too short to be a run is not lost: its blocks go to each child's run. Each member keeps at
// least one token of its own.
struct SharedRunPlanner {
  const int64_t* tp;
  const int64_t* lp;
  int64_t width, block_size, group, min_blocks, max_levels;
  std::vector<SharedRun> runs;
  std::vector<int64_t> rest_from;           // per sequence: its first block attended alone
  std::vector<std::vector<int64_t>> path;  // per sequence: its runs, shallowest first

  // ``ms`` share blocks [0, agree); [from, agree) are in no run yet; ``level`` runs above.
  void node(const std::vector<int64_t>& ms, int64_t from, int64_t agree, int64_t level) {
    if (static_cast<int64_t>(ms.size()) * group < kScoreTile || level >= max_levels) return;
    int64_t limit = width;
    for (int64_t b : ms) limit = std::min(limit, (lp[b] - 1) / block_size);
    const int64_t* lead = tp + ms[0] * width;
    auto all_agree = [&](int64_t i) {
      for (int64_t b : ms) if (tp[b * width + i] != lead[i]) return false;
      return true;
    };
    while (agree < limit && all_agree(agree)) ++agree;
    if (agree - from >= min_blocks) {
      runs.push_back({ms, from, agree, level});
      for (int64_t b : ms) {
        rest_from[b] = agree;
        path[b].push_back(static_cast<int64_t>(runs.size()) - 1);
      }
      from = agree;
      ++level;
    }
    children(ms, from, agree, level);
  }

  // The members that go on past block ``agree``, grouped by their block there.
  void children(const std::vector<int64_t>& ms, int64_t from, int64_t agree, int64_t level) {
    std::vector<int64_t> on;
    for (int64_t b : ms) if ((lp[b] - 1) / block_size > agree) on.push_back(b);
    std::stable_sort(on.begin(), on.end(), [&](int64_t x, int64_t y) {
      return tp[x * width + agree] < tp[y * width + agree];
    });
    for (size_t start = 0; start < on.size();) {
      size_t end = start + 1;
      while (end < on.size() && tp[on[end] * width + agree] == tp[on[start] * width + agree]) ++end;
      if (end - start >= 2) {
        node(std::vector<int64_t>(on.begin() + start, on.begin() + end), from, agree, level);
      }
      start = end;
    }
  }
};

struct PrefixTask {
  // every query of (group, kv head) over its shared blocks [first_block, first_block + blocks),
  // the group's part ``part`` of its prefix
  int64_t group, kv_head, first_block, blocks, part;
};

// One task: ``count`` queries of one kv head over a group's ``num_blocks`` shared blocks
// (``block_size`` a multiple of 16). Writes each query's normalized output and its statistics.
template <int HD>
void attend_prefix(const at::BFloat16* qp, const at::BFloat16* kp, const at::BFloat16* vp,
                   const int64_t* table, int64_t num_blocks, int64_t block_size, int64_t kb,
                   int64_t ko, int64_t vb, int64_t vo, int64_t kv_head, int64_t kh, int64_t vh,
                   const std::vector<int64_t>& members, int64_t group, int64_t num_heads,
                   int64_t first, int64_t count, float scale, float* prefix_out,
                   float* prefix_stats) {
  constexpr int V = HD / 16;
  constexpr int QV = HD == 64 ? 4 : 2;  // accumulators: QV * V registers
  const int64_t len = num_blocks * block_size, padded = (count + kScoreTile - 1) / kScoreTile * kScoreTile;
  // The query (member m, head kv_head * group + g) of index i = m * group + g, as bf16 pairs.
  auto query_row = [&](int64_t i) {
    const int64_t b = members[i / group], head = kv_head * group + i % group;
    return reinterpret_cast<const uint32_t*>(qp + (b * num_heads + head) * HD);
  };
  thread_local std::vector<uint32_t> pairs, probs;
  thread_local std::vector<float> scores;
  thread_local std::vector<__m512i> kt, vi;
  pairs.assign(padded * (HD / 2), 0u);
  for (int64_t i = 0; i < count; ++i) std::memcpy(pairs.data() + i * (HD / 2), query_row(first + i), HD * 2);
  // Once per task: every key block transposed, every value block interleaved (L2-resident).
  const int64_t num_tiles = len / 16, num_pairs = len / 2;
  kt.resize(num_tiles * (HD / 2));
  vi.resize(num_pairs * V);
  // The cached rows are cold (another layer ran since) and a gather waits on each line it
  // touches: ask for the blocks ahead, their lines all at once.
  for (int64_t ahead = 0; ahead < kPrefixAhead && ahead < num_blocks; ++ahead) {
    prefetch_block(kp, table, ahead, len, block_size, kb, ko, kv_head * kh, HD);
    prefetch_block(vp, table, ahead, len, block_size, vb, vo, kv_head * vh, HD);
  }
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    prefetch_block(kp, table, blk + kPrefixAhead, len, block_size, kb, ko, kv_head * kh, HD);
    prefetch_block(vp, table, blk + kPrefixAhead, len, block_size, vb, vo, kv_head * vh, HD);
    const at::BFloat16* kblock = kp + table[blk] * kb + kv_head * kh;
    for (int64_t r0 = 0; r0 < block_size; r0 += 16) {
      transpose_keys<HD>(kblock + r0 * ko, ko, kt.data() + (blk * block_size + r0) / 16 * (HD / 2));
    }
    const at::BFloat16* vblock = vp + table[blk] * vb + kv_head * vh;
    for (int64_t r = 0; r < block_size; r += 2) {
      __m512i* dst = vi.data() + (blk * block_size + r) / 2 * V;
      for (int j = 0; j < HD / 32; ++j) {
        const __m512i a = _mm512_loadu_si512(vblock + r * vo + j * 32);
        const __m512i c = _mm512_loadu_si512(vblock + (r + 1) * vo + j * 32);
        dst[2 * j] = _mm512_unpacklo_epi16(a, c);
        dst[2 * j + 1] = _mm512_unpackhi_epi16(a, c);
      }
    }
  }
  // Then per tile of queries: scores over the whole prefix, softmax, values, while the tile's
  // scores (16 x len floats) stay in cache.
  scores.resize(kScoreTile * len);
  probs.resize(kScoreTile * num_pairs);
  alignas(64) float inv[kScoreTile], tile_out[QV * HD];
  for (int64_t t = 0; t < padded; t += kScoreTile) {
    __m512 top[kScoreTile];
    for (int i = 0; i < kScoreTile; ++i) top[i] = _mm512_set1_ps(-INFINITY);
    int64_t k16 = 0;
    for (; k16 + 2 <= num_tiles; k16 += 2) {
      score_tile_pair<HD>(kt.data() + k16 * (HD / 2), kt.data() + (k16 + 1) * (HD / 2),
                          pairs.data() + t * (HD / 2), scale, scores.data() + k16 * 16, len, top);
    }
    if (k16 < num_tiles) {
      score_tile<HD>(*reinterpret_cast<const __m512i(*)[HD / 2]>(kt.data() + k16 * (HD / 2)),
                     pairs.data() + t * (HD / 2), scale, scores.data() + k16 * 16, len, top);
    }
    const int64_t in_tile = std::min<int64_t>(kScoreTile, count - t);
    for (int64_t i = 0; i < kScoreTile; ++i) {
      uint32_t* out = probs.data() + i * num_pairs;
      if (i >= in_tile) {  // padding: weighs nothing
        std::fill(out, out + num_pairs, 0u);
        inv[i] = 0.f;
        continue;
      }
      const float most = _mm512_reduce_max_ps(top[i]);
      const float denom = exp_to_bf16(scores.data() + i * len, len, most, out);
      inv[i] = 1.f / denom;
      const int64_t q = first + t + i;
      const int64_t b = members[q / group], head = kv_head * group + q % group;
      prefix_stats[2 * (b * num_heads + head)] = most;
      prefix_stats[2 * (b * num_heads + head) + 1] = denom;
    }
    for (int64_t sub = 0; sub < in_tile; sub += QV) {
      weigh_tile<HD, QV>(vi.data(), num_pairs, probs.data() + sub * num_pairs, num_pairs,
                         inv + sub, tile_out);
      for (int64_t i = sub; i < std::min<int64_t>(in_tile, sub + QV); ++i) {
        const int64_t q = first + t + i;
        const int64_t b = members[q / group], head = kv_head * group + q % group;
        std::memcpy(prefix_out + (b * num_heads + head) * HD, tile_out + (i - sub) * HD,
                    HD * sizeof(float));
      }
    }
  }
}
#endif

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "q: (batch, heads, head_dim)");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "caches: (blocks, block_size, kv_heads, head_dim)");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "tables and lens are int64");
  TORCH_CHECK((tables.dim() == 2 && lens.dim() == 1) ||
                  (tables.dim() == 3 && lens.dim() == 2 && tables.size(1) == k_cache.size(2) &&
                   lens.size(1) == k_cache.size(2)),
              "tables (batch, width) with lens (batch,), or per kv head: tables (batch, "
              "kv_heads, width) with lens (batch, kv_heads)");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == at::kBFloat16) {
    decode_attention_impl<at::BFloat16>(q, k_cache, v_cache, tables, lens, scale, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "float32 or bfloat16 only");
    decode_attention_impl<float>(q, k_cache, v_cache, tables, lens, scale, out);
  }
  return out;
}

torch::Tensor paged_decode_attention_shared(torch::Tensor q, torch::Tensor k_cache,
                                            torch::Tensor v_cache, torch::Tensor tables,
                                            torch::Tensor lens, double scale,
                                            int64_t min_shared_blocks, int64_t max_levels) {
  const bool fusable = q.scalar_type() == at::kBFloat16 && tables.dim() == 2 &&
                       (q.size(2) == 64 || q.size(2) == 128) && k_cache.size(1) % 16 == 0 &&
                       k_cache.scalar_type() == at::kBFloat16 && min_shared_blocks >= 1 &&
                       max_levels >= 1;
#if !defined(__AVX512BF16__)
  return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale);
#else
  if (!fusable) return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale);
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && lens.dim() == 1,
              "tables (batch, width) and lens (batch,), int64");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, width = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();

  // Runs: the prefix tree of the block tables, each node's blocks read together by its
  // sequences (a system prompt by all its sequences, then each template by its own...).
  SharedRunPlanner planner{tp, lp, width, block_size, group, min_shared_blocks,
                           std::min<int64_t>(max_levels, kMaxLevels)};
  planner.rest_from.assign(batch, 0);
  planner.path.assign(batch, {});
  std::vector<int64_t> everyone(batch);
  std::iota(everyone.begin(), everyone.end(), 0);
  planner.children(everyone, 0, 0, 0);
  const std::vector<SharedRun>& runs = planner.runs;
  if (runs.empty()) return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale);

  // Everyone attends alone over what it does not share: the unfused its whole table, a member
  // of runs the blocks after its deepest run's (its statistics kept for the merge).
  auto rest_tables = torch::zeros_like(tables);
  auto rest_lens = torch::empty_like(lens);
  int64_t* rt = rest_tables.data_ptr<int64_t>();
  int64_t* rl = rest_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t skip = planner.rest_from[b];
    std::copy(tp + b * width + skip, tp + (b + 1) * width, rt + b * width);
    rl[b] = lp[b] - skip * block_size;
  }
  const int64_t threads = at::get_num_threads();
  auto rest_out = torch::empty({batch, num_heads, head_dim}, q.options().dtype(at::kFloat));
  auto rest_stats = torch::empty({batch, num_heads, 2}, q.options().dtype(at::kFloat));
  decode_attention_impl<at::BFloat16, float>(q, k_cache, v_cache, rest_tables, rest_lens, scale,
                                             rest_out, rest_stats.data_ptr<float>());

  // The runs: tasks of (run, kv head, a part of its blocks), enough of them to keep every
  // thread busy. Split by keys, not queries, so each block is read and transposed once; the
  // parts are merged like the rest (by their softmax statistics). A sequence's results live
  // in slots (its run's depth, part).
  std::vector<PrefixTask> tasks;
  const int64_t num_runs = static_cast<int64_t>(runs.size());
  const int64_t wanted = std::max<int64_t>(
      1, (2 * threads + num_runs * num_kv_heads - 1) / (num_runs * num_kv_heads));
  std::vector<int64_t> parts_of(num_runs);
  int64_t parts = 1, levels = 1;
  for (int64_t g = 0; g < num_runs; ++g) {
    const int64_t blocks = runs[g].end - runs[g].start;
    // at least 4 blocks a part (a part of one block would spend more on its merge)
    const int64_t n = std::max<int64_t>(1, std::min({wanted, kMaxParts, blocks / 4}));
    const int64_t step = (blocks + n - 1) / n;
    int64_t part = 0;
    for (int64_t first = 0; first < blocks; first += step, ++part) {
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        tasks.push_back({g, h, runs[g].start + first, std::min(step, blocks - first), part});
      }
    }
    parts_of[g] = part;
    parts = std::max(parts, part);
    levels = std::max(levels, runs[g].level + 1);
  }
  auto prefix_out = torch::empty({levels * parts, batch, num_heads, head_dim},
                                 q.options().dtype(at::kFloat));
  auto prefix_stats = torch::empty({levels * parts, batch, num_heads, 2}, q.options().dtype(at::kFloat));
  float* po = prefix_out.data_ptr<float>();
  float* ps = prefix_stats.data_ptr<float>();
  const int64_t rows = batch * num_heads;  // per slot: rows * head_dim outputs, rows * 2 stats
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = k_cache.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = v_cache.data_ptr<at::BFloat16>();
  const int64_t kb = k_cache.stride(0), ko = k_cache.stride(1), kh = k_cache.stride(2);
  const int64_t vb = v_cache.stride(0), vo = v_cache.stride(1), vh = v_cache.stride(2);
  const float fscale = static_cast<float>(scale);
  std::atomic<int64_t> next{0};
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min(threads, num_tasks), 1, [&](int64_t, int64_t) {
    for (int64_t taken = next++; taken < num_tasks; taken = next++) {
      const PrefixTask& task = tasks[taken];
      const SharedRun& shared = runs[task.group];
      const int64_t* table = tp + shared.members[0] * width + task.first_block;
      const int64_t count = static_cast<int64_t>(shared.members.size()) * group;
      const int64_t slot = shared.level * parts + task.part;
      auto run = head_dim == 64 ? attend_prefix<64> : attend_prefix<128>;
      run(qp, kp, vp, table, task.blocks, block_size, kb, ko, vb, vo, task.kv_head, kh, vh,
          shared.members, group, num_heads, 0, count, fscale, po + slot * rows * head_dim,
          ps + slot * rows * 2);
    }
  });

  // Merge: each sequence's results (each part of each run it is in, and its rest) weighed by
  // their softmax sums, rounded once.
  auto out = torch::empty_like(q);
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const float* ro = rest_out.data_ptr<float>();
  const float* rs = rest_stats.data_ptr<float>();
  at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slots;
    std::vector<float> weight;
    for (int64_t b = begin; b < end; ++b) {
      slots.clear();
      for (int64_t g : planner.path[b]) {
        for (int64_t p = 0; p < parts_of[g]; ++p) slots.push_back(runs[g].level * parts + p);
      }
      weight.resize(slots.size() + 1);
      for (int64_t head = 0; head < num_heads; ++head) {
        const int64_t row = b * num_heads + head;
        float top = rs[2 * row];
        for (int64_t slot : slots) top = std::max(top, ps[(slot * rows + row) * 2]);
        float total = weight[0] = rs[2 * row + 1] * std::exp(rs[2 * row] - top);
        for (size_t i = 0; i < slots.size(); ++i) {
          const float* stat = ps + (slots[i] * rows + row) * 2;
          total += weight[i + 1] = stat[1] * std::exp(stat[0] - top);
        }
        // head_dim is 64 or 128 here; rounding as static_cast<BFloat16> (to nearest even).
        const float* rest = ro + row * head_dim;
        at::BFloat16* o = op + row * head_dim;
        for (int64_t d = 0; d < head_dim; d += 16) {
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(rest + d), _mm512_set1_ps(weight[0] / total));
          for (size_t i = 0; i < slots.size(); ++i) {
            x = _mm512_fmadd_ps(_mm512_loadu_ps(po + (slots[i] * rows + row) * head_dim + d),
                                _mm512_set1_ps(weight[i + 1] / total), x);
          }
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), (__m256i)_mm512_cvtneps_pbh(x));
        }
      }
    }
  });
  return out;
#endif
}

}  // namespace tierserve
