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

// s[i] = exp(s[i] - top) for all i; returns the sum. Vectorized with a degree-6 polynomial on
// the reduced argument (relative error ~2e-7, as good as expf for softmax weights).
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
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  if (head_dim % kLine != 0) return;  // whole 64-byte rows only (no read past a row's end)
  __m512i sink = _mm512_setzero_si512();
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

// A task's keys and values read ahead (read_in_order) up to this many bytes (L2 / 4).
constexpr int64_t kTouchBytes = 256 << 10;

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
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < HD / 32; ++j)
      interleaved_in_order(part[g][2 * j], part[g][2 * j + 1], acc[g][2 * j], acc[g][2 * j + 1]);
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

void paged_decode_attention_with_stats(const torch::Tensor& q, const torch::Tensor& k_cache,
                                       const torch::Tensor& v_cache, const torch::Tensor& tables,
                                       const torch::Tensor& lens, double scale, torch::Tensor& out,
                                       float* stats) {
  decode_attention_impl<at::BFloat16, float>(q, k_cache, v_cache, tables, lens, scale, out, stats);
}

}  // namespace tierserve
