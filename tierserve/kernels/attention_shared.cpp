// paged_decode_attention_shared: BatchLLM's horizontally fused prefix-shared attention.
// Sequences of a decode step that share leading blocks (found here, as the prefix tree of their
// block tables) read those blocks together: each key block is transposed once so that 16
// queries score 16 keys with one vdpbf16ps per dim pair, each value block interleaved once,
// and every sequence's results (each shared run on its path, then its own blocks through
// paged_decode_attention) are merged by their softmax statistics. docs/design.md has the rest.

#include "common.h"
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

namespace tierserve {
namespace {

#if defined(__AVX512BF16__)
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

// Scores of kScoreTile queries (bfloat16 pairs, HD / 2 a query) over T consecutive transposed
// key tiles (``kt``: T x HD / 2 vectors), eight queries a pass, each query's running max kept in
// ``top``. With T = 2 one broadcast of a query pair feeds two dot products: the broadcasts, not
// the dot products, limit this loop.
template <int HD, int T>
inline void score_tiles(const __m512i* kt, const uint32_t* pairs, float scale, float* scores,
                        int64_t stride, __m512 (&top)[kScoreTile]) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int half = 0; half < kScoreTile; half += 8) {
    __m512 acc[T][8];
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < 8; ++i) acc[t][i] = _mm512_setzero_ps();
    for (int d = 0; d < HD / 2; ++d) {
      __m512bh k[T];
      for (int t = 0; t < T; ++t) k[t] = (__m512bh)_mm512_load_si512(kt + t * (HD / 2) + d);
      for (int i = 0; i < 8; ++i) {
        const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[(half + i) * (HD / 2) + d]));
        for (int t = 0; t < T; ++t) acc[t][i] = _mm512_dpbf16_ps(acc[t][i], k[t], q);
      }
    }
    for (int i = 0; i < 8; ++i) {
      for (int t = 0; t < T; ++t) {
        const __m512 x = _mm512_mul_ps(acc[t][i], s);
        _mm512_storeu_ps(scores + (half + i) * stride + 16 * t, x);
        top[half + i] = _mm512_max_ps(top[half + i], x);
      }
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
  for (int i = 0; i < QV; ++i) {
    const __m512 scale = _mm512_set1_ps(inv[i]);
    for (int j = 0; j < HD / 32; ++j) {
      __m512 first, second;
      interleaved_in_order(part[i][2 * j], part[i][2 * j + 1], first, second);
      _mm512_storeu_ps(out + i * HD + j * 32, _mm512_mul_ps(first, scale));
      _mm512_storeu_ps(out + i * HD + j * 32 + 16, _mm512_mul_ps(second, scale));
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
  // per sequence: (run, its index among the run's members), shallowest run first
  std::vector<std::vector<std::pair<int64_t, int64_t>>> path;

  // The runs of sequences [0, batch).
  void plan(int64_t batch) {
    rest_from.assign(batch, 0);
    path.assign(batch, {});
    std::vector<int64_t> everyone(batch);
    std::iota(everyone.begin(), everyone.end(), 0);
    children(everyone, 0, 0, 0);
  }

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
      for (int64_t m = 0; m < static_cast<int64_t>(ms.size()); ++m) {
        rest_from[ms[m]] = agree;
        path[ms[m]].emplace_back(static_cast<int64_t>(runs.size()) - 1, m);
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
  // every query of run ``run`` for one kv head over blocks [first_block, first_block + blocks):
  // the run's part ``part``
  int64_t run, kv_head, first_block, blocks, part;
};

// One task: the ``count`` queries of a run's ``members`` for one kv head over ``num_blocks``
// shared blocks (``block_size`` a multiple of 16). Writes each query's normalized output and its
// statistics at row (member, query head).
template <int HD>
void attend_prefix(const at::BFloat16* qp, const at::BFloat16* kp, const at::BFloat16* vp,
                   const int64_t* table, int64_t num_blocks, int64_t block_size, int64_t kb,
                   int64_t ko, int64_t vb, int64_t vo, int64_t kv_head, int64_t kh, int64_t vh,
                   const std::vector<int64_t>& members, int64_t group, int64_t num_heads,
                   int64_t count, float scale, float* prefix_out, float* prefix_stats) {
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
  for (int64_t i = 0; i < count; ++i) std::memcpy(pairs.data() + i * (HD / 2), query_row(i), HD * 2);
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
      score_tiles<HD, 2>(kt.data() + k16 * (HD / 2), pairs.data() + t * (HD / 2), scale,
                         scores.data() + k16 * 16, len, top);
    }
    if (k16 < num_tiles) {
      score_tiles<HD, 1>(kt.data() + k16 * (HD / 2), pairs.data() + t * (HD / 2), scale,
                         scores.data() + k16 * 16, len, top);
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
      const int64_t q = t + i;
      const int64_t row = (q / group) * num_heads + kv_head * group + q % group;
      prefix_stats[2 * row] = most;
      prefix_stats[2 * row + 1] = denom;
    }
    for (int64_t sub = 0; sub < in_tile; sub += QV) {
      weigh_tile<HD, QV>(vi.data(), num_pairs, probs.data() + sub * num_pairs, num_pairs,
                         inv + sub, tile_out);
      for (int64_t i = sub; i < std::min<int64_t>(in_tile, sub + QV); ++i) {
        const int64_t q = t + i;
        const int64_t row = (q / group) * num_heads + kv_head * group + q % group;
        std::memcpy(prefix_out + row * HD, tile_out + (i - sub) * HD,
                    HD * sizeof(float));
      }
    }
  }
}

// Everyone attends alone over what it does not share: a sequence in no run its whole table, a
// member of runs the blocks after its deepest run's. Float32 results with their statistics (each
// query's largest score and softmax sum) for the merge.
std::pair<torch::Tensor, torch::Tensor> attend_rest(const torch::Tensor& q,
                                                    const torch::Tensor& k_cache,
                                                    const torch::Tensor& v_cache,
                                                    const torch::Tensor& tables,
                                                    const torch::Tensor& lens, double scale,
                                                    const SharedRunPlanner& planner) {
  const int64_t batch = q.size(0), width = tables.size(1), block_size = k_cache.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  auto rest_tables = torch::zeros_like(tables);
  auto rest_lens = torch::empty_like(lens);
  int64_t* rt = rest_tables.data_ptr<int64_t>();
  int64_t* rl = rest_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t skip = planner.rest_from[b];
    std::copy(tp + b * width + skip, tp + (b + 1) * width, rt + b * width);
    rl[b] = lp[b] - skip * block_size;
  }
  auto out = torch::empty(q.sizes(), q.options().dtype(at::kFloat));
  auto stats = torch::empty({batch, q.size(1), 2}, q.options().dtype(at::kFloat));
  paged_decode_attention_with_stats(q, k_cache, v_cache, rest_tables, rest_lens, scale, out,
                                    stats.data_ptr<float>());
  return {out, stats};
}

// Where a run's part writes its results: rows (member, query head) of its own, the run's parts
// one after another, the runs one after another.
struct PartLayout {
  std::vector<int64_t> parts_of, first_row, members_of;
  int64_t total_rows = 0, num_heads = 0;
  int64_t row(int64_t run, int64_t part) const {  // the first row of a run's part
    return first_row[run] + part * members_of[run] * num_heads;
  }
};

// The tasks of (run, kv head, a part of its blocks), enough of them to keep every thread busy.
// Split by keys, not queries, so each block is read and transposed once; the parts are merged
// like the rest (by their softmax statistics).
PartLayout plan_tasks(const std::vector<SharedRun>& runs, int64_t threads, int64_t num_kv_heads,
                      int64_t num_heads, std::vector<PrefixTask>& tasks) {
  const int64_t num_runs = static_cast<int64_t>(runs.size());
  const int64_t wanted = std::max<int64_t>(
      1, (2 * threads + num_runs * num_kv_heads - 1) / (num_runs * num_kv_heads));
  PartLayout layout;
  layout.num_heads = num_heads;
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
    const int64_t members = static_cast<int64_t>(runs[g].members.size());
    layout.parts_of.push_back(part);
    layout.first_row.push_back(layout.total_rows);
    layout.members_of.push_back(members);
    layout.total_rows += part * members * num_heads;
  }
  return layout;
}

// Each sequence's results (each part of each run on its path, and its rest: ``rest_out`` with
// ``rest_stats``) weighed by their softmax sums and rounded once into ``out``.
void merge_results(const SharedRunPlanner& planner, const PartLayout& layout, int64_t num_heads,
                   int64_t head_dim, const float* ro, const float* rs, const float* po,
                   const float* ps, at::BFloat16* op) {
  const int64_t batch = static_cast<int64_t>(planner.path.size());
  at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows_of;  // per result: the row of the sequence's first head
    std::vector<float> weight;
    for (int64_t b = begin; b < end; ++b) {
      rows_of.clear();
      for (const auto& [g, m] : planner.path[b]) {
        for (int64_t p = 0; p < layout.parts_of[g]; ++p) rows_of.push_back(layout.row(g, p) + m * num_heads);
      }
      weight.resize(rows_of.size() + 1);
      for (int64_t head = 0; head < num_heads; ++head) {
        const int64_t row = b * num_heads + head;
        float top = rs[2 * row];
        for (int64_t r : rows_of) top = std::max(top, ps[(r + head) * 2]);
        float total = weight[0] = rs[2 * row + 1] * std::exp(rs[2 * row] - top);
        for (size_t i = 0; i < rows_of.size(); ++i) {
          const float* stat = ps + (rows_of[i] + head) * 2;
          total += weight[i + 1] = stat[1] * std::exp(stat[0] - top);
        }
        // head_dim is 64 or 128 here; rounding as static_cast<BFloat16> (to nearest even).
        const float* rest = ro + row * head_dim;
        at::BFloat16* o = op + row * head_dim;
        for (int64_t d = 0; d < head_dim; d += 16) {
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(rest + d), _mm512_set1_ps(weight[0] / total));
          for (size_t i = 0; i < rows_of.size(); ++i) {
            x = _mm512_fmadd_ps(_mm512_loadu_ps(po + (rows_of[i] + head) * head_dim + d),
                                _mm512_set1_ps(weight[i + 1] / total), x);
          }
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), (__m256i)_mm512_cvtneps_pbh(x));
        }
      }
    }
  });
}
#endif

}  // namespace

torch::Tensor paged_decode_attention_shared(torch::Tensor q, torch::Tensor k_cache,
                                            torch::Tensor v_cache, torch::Tensor tables,
                                            torch::Tensor lens, double scale,
                                            int64_t min_shared_blocks, int64_t max_levels) {
#if !defined(__AVX512BF16__)
  return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale);
#else
  const bool fusable = q.scalar_type() == at::kBFloat16 && tables.dim() == 2 &&
                       (q.size(2) == 64 || q.size(2) == 128) && k_cache.size(1) % 16 == 0 &&
                       k_cache.scalar_type() == at::kBFloat16 && min_shared_blocks >= 1 &&
                       max_levels >= 1;
  if (!fusable) return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale);
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && lens.dim() == 1,
              "tables (batch, width) and lens (batch,), int64");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                  q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0 &&
                  tables.size(0) == q.size(0) && lens.size(0) == q.size(0),
              "q (batch, heads, head_dim) and caches (blocks, block_size, kv_heads, head_dim), "
              "heads a multiple of kv heads; tables and lens of the same batch");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, width = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block_size, "lens must lie in [1, table width x "
                "block size]; sequence ", b, " has ", lp[b]);
  }

  // Runs: the prefix tree of the block tables, each node's blocks read together by its
  // sequences (a system prompt by all its sequences, then each template by its own...).
  SharedRunPlanner planner{tp, lp, width, block_size, group, min_shared_blocks,
                           std::min<int64_t>(max_levels, kMaxLevels)};
  planner.plan(batch);
  const std::vector<SharedRun>& runs = planner.runs;
  if (runs.empty()) return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale);

  const auto [rest_out, rest_stats] = attend_rest(q, k_cache, v_cache, tables, lens, scale, planner);
  const int64_t threads = at::get_num_threads();
  std::vector<PrefixTask> tasks;
  const PartLayout layout = plan_tasks(runs, threads, num_kv_heads, num_heads, tasks);
  auto prefix_out = torch::empty({layout.total_rows, head_dim}, q.options().dtype(at::kFloat));
  auto prefix_stats = torch::empty({layout.total_rows, 2}, q.options().dtype(at::kFloat));
  float* po = prefix_out.data_ptr<float>();
  float* ps = prefix_stats.data_ptr<float>();
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
      const SharedRun& shared = runs[task.run];
      const int64_t* table = tp + shared.members[0] * width + task.first_block;
      const int64_t count = static_cast<int64_t>(shared.members.size()) * group;
      const int64_t row = layout.row(task.run, task.part);
      auto attend = head_dim == 64 ? attend_prefix<64> : attend_prefix<128>;
      attend(qp, kp, vp, table, task.blocks, block_size, kb, ko, vb, vo, task.kv_head, kh, vh,
             shared.members, group, num_heads, count, fscale, po + row * head_dim, ps + row * 2);
    }
  });

  auto out = torch::empty_like(q);
  merge_results(planner, layout, num_heads, head_dim, rest_out.data_ptr<float>(),
                rest_stats.data_ptr<float>(), po, ps, out.data_ptr<at::BFloat16>());
  return out;
#endif
}

}  // namespace tierserve
