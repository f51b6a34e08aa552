// Paged attention read straight from the KV pool through the block tables (no gather): the C++ twin of
// padengine/layers/attention.py's paged_attention (its write_kv is in elementwise.cpp).
//
// One call attends every sequence of a step, decoding ones (one query) and prefilling ones (their new
// tokens, causal among themselves, after any cached prefix). A work item is (sequence, KV head, tile of
// queries): the query heads sharing a KV head are scored together (GQA), so an item reads each K/V row
// once. A decode item over a long context, in a batch too small to keep every thread busy, is split
// over context chunks whose partial softmax states are merged after. The softmax is online (running
// max and sum) and everything accumulates in float32 whatever the cache dtype.
#include "common.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

namespace padengine {
namespace {

constexpr int64_t kRun = 64;         // keys scored at once (a run never crosses a block)
static_assert(kRun % kLanes == 0, "a score row is whole vectors");
constexpr int64_t kTileRows = 32;    // query rows (queries x grouped heads) of a prefill item
constexpr int64_t kMinSplit = 256;   // decode contexts are split in chunks no shorter than this
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Layout {
  int64_t heads, kv_heads, group, dim, block_size, table_width, q_tok, q_head, window;  // window 0: none
  float scale;
};

// Rows r of an item: query q_begin + r / (heads * group), query head head_begin * group + r % (heads * group)
struct Item {
  int64_t seq, head_begin, heads;         // KV heads [head_begin, head_begin + heads)
  int64_t q_begin, q_count, pos_begin;    // rows [q_begin, q_begin + q_count) of the flat q, first position
  int64_t key_begin, key_end;             // the keys they may attend
  int64_t part;                           // >= 0: a split, written to that scratch slot
  int64_t cost() const { return q_count * heads * (key_end - key_begin); }
};

template <typename T>
struct Attend {
  Layout L;
  const T *q, *k, *v;
  const int64_t* tables;
  T* out;
  float* scratch;   // per split: m, l [rows] then acc [rows][D]

  // the item's query rows, scaled, into qs (m set to -inf); returns where each row's head starts in a
  // token's K/V row
  std::vector<int64_t> load_rows(const Item& it, int64_t R, float* qs, float* m) const {
    const int64_t G = L.group, D = L.dim, per_q = it.heads * G;
    std::vector<int64_t> koff(R);
    for (int64_t r = 0; r < R; ++r) {
      const T* src = q + (it.q_begin + r / per_q) * L.q_tok + (it.head_begin * G + r % per_q) * L.q_head;
      for (int64_t d = 0; d < D; ++d) qs[r * D + d] = to_float(src[d]) * L.scale;
      m[r] = kNegInf;
      koff[r] = (r % per_q) / G * D;
    }
    return koff;
  }

  // a run: keys t0 .. t0 + n - 1 of the item, contiguous in one block; returns their offset in the caches
  int64_t run_at(const Item& it, int64_t t0, int64_t& n) const {
    const int64_t in_block = t0 % L.block_size;
    n = std::min({kRun, L.block_size - in_block, it.key_end - t0});
    return (tables[it.seq * L.table_width + t0 / L.block_size] * L.block_size + in_block) * L.kv_heads * L.dim +
           it.head_begin * L.dim;
  }

  void run(const Item& it) const {
    if (it.q_count == 1 && L.dim % kLanes == 0) return decode(it);
    const int64_t G = L.group, D = L.dim, per_q = it.heads * G, R = it.q_count * per_q, W = it.heads * D;
    std::vector<float> buf(R * (2 * D + 2 + kRun) + D * kRun + (std::is_same_v<T, float> ? 0 : kRun * W));
    float *qs = buf.data(), *acc = qs + R * D, *m = acc + R * D, *l = m + R, *s = l + R, *kt = s + R * kRun;
    float* rows = kt + D * kRun;         // a run's K (then V) as float32, all the item's heads, unless T is
    const std::vector<int64_t> koff = load_rows(it, R, qs, m);
    const int64_t stride = L.kv_heads * D, last = it.pos_begin + it.q_count - 1;
    auto run_at = [&](int64_t t0, int64_t& n) { return this->run_at(it, t0, n); };
    int64_t n, next_n = 0;
    for (int64_t t0 = it.key_begin, off = run_at(t0, n); t0 < it.key_end; t0 += n, off = run_at(t0, n)) {
      if (t0 + n < it.key_end) {   // blocks lie anywhere in the pool: fetch the next run while this one computes
        const int64_t next = run_at(t0 + n, next_n);
        prefetch(k + next, next_n, stride, W);
        prefetch(v + next, next_n, stride, W);
      }
      if (it.heads == 1 && R >= 8) {
        score_tile(qs, R, k + off, stride, n, s, kt);
      } else {
        int64_t at;
        const float* kr = as_float(k + off, n, stride, W, rows, at);
        for (int64_t c = 0; c < n; ++c)
          for (int64_t r = 0; r < R; ++r) s[r * kRun + c] = dot(qs + r * D, kr + c * at + koff[r], D);
      }
      if (t0 + n - 1 > it.pos_begin || (L.window && t0 <= last - L.window)) mask(s, R, per_q, n, t0, it.pos_begin);
      update(s, R, n, v + off, stride, m, l, acc, koff.data(), rows, W);
    }
    finish(it, R, m, l, acc);
  }

  // A decoding sequence over all its KV heads. Keys go a vector's width at a time: each query row's scores
  // come out of a transpose-and-add tree as one vector, which the online softmax works on whole. The next run is
  // prefetched a few lines per row of work: a burst of prefetches stalls once the line fill buffers are full.
  void decode(const Item& it) const {
    const int64_t D = L.dim, R = it.heads * L.group, W = it.heads * D, stride = L.kv_heads * D;
    constexpr bool kFloat = std::is_same_v<T, float>;
    thread_local std::vector<float> buf;
    buf.assign(2 * R * D + 2 * R + kLanes * R + (kFloat ? 0 : 2 * kRun * W), 0.f);
    float *qs = buf.data(), *acc = qs + R * D, *m = acc + R * D, *l = m + R, *p = l + R, *k_run = p + kLanes * R;
    float* v_run = k_run + kRun * W;
    const std::vector<int64_t> koff = load_rows(it, R, qs, m);
    auto run_at = [&](int64_t t0, int64_t& n) { return this->run_at(it, t0, n); };
    const vi lane = lane_index();
    int64_t n, next_n = 0;
    for (int64_t t0 = it.key_begin, off = run_at(t0, n); t0 < it.key_end; t0 += n, off = run_at(t0, n)) {
      Prefetch ahead{};
      const int64_t chunks = (n + kLanes - 1) / kLanes;
      if (t0 + n < it.key_end) {
        const int64_t next = run_at(t0 + n, next_n);
        const int64_t bytes = ((next_n - 1) * stride + W) * static_cast<int64_t>(sizeof(T));
        ahead = {reinterpret_cast<const char*>(k + next), reinterpret_cast<const char*>(v + next), bytes,
                 (bytes / 64 + 2 * R * chunks) / (2 * R * chunks)};
      }
      int64_t at;
      const float* kr = as_float(k + off, n, stride, W, k_run, at);
      const float* vr = as_float(v + off, n, stride, W, v_run, at);
      for (int64_t c0 = 0; c0 < n; c0 += kLanes) {
        const int live = static_cast<int>(std::min<int64_t>(kLanes, n - c0));
        for (int64_t r = 0; r < R; ++r) {
          ahead.step();
          const float* qr = qs + r * D;
          const float* kc = kr + c0 * at + koff[r];
          vf part[kLanes] = {};
          for (int64_t d = 0; d < D; d += kLanes) {
            const vf qd = loadv(qr + d);
#pragma GCC unroll 16
            for (int c = 0; c < kLanes; ++c) part[c] += qd * loadv(kc + (c < live ? c : 0) * at + d);
          }
          vf sc = hsum_each(part);
          sc = lane < live ? sc : vf{} + kNegInf;
          const float top = std::max(m[r], hmax(sc));
          const vf e = lane < live ? fast_expv(sc - top) : vf{};
          const float alpha = fast_exp(m[r] - top);
          l[r] = l[r] * alpha + hsum(e);
          m[r] = top;
          float* ar = acc + r * D;
          for (int64_t d = 0; d < D; d += kLanes) storev(ar + d, loadv(ar + d) * alpha);
          storev(p + r * kLanes, e);
        }
        for (int64_t r = 0; r < R; ++r) {
          ahead.step();
          accumulate(acc + r * D, p + r * kLanes, live, vr + c0 * at + koff[r], at, D);
        }
      }
    }
    finish(it, R, m, l, acc);
  }

  // two ranges (the next run's K and V) prefetched `per` lines each per step
  struct Prefetch {
    const char *a = nullptr, *b = nullptr;
    int64_t bytes = 0, per = 0, at = 0;
    void step() {
      for (int64_t i = 0; i < per && at < bytes; ++i, at += 64) {
        __builtin_prefetch(a + at, 0, 1);
        __builtin_prefetch(b + at, 0, 1);
      }
    }
  };

  void prefetch(const T* p, int64_t n, int64_t stride, int64_t width) const {
    for (int64_t c = 0; c < n; ++c)
      for (int64_t b = 0; b < width * static_cast<int64_t>(sizeof(T)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(p + c * stride) + b);
  }

  // n rows of K or V (`width` values every `stride`) as float32: the cache itself (its stride into `at`),
  // or converted into buf (rows `width` apart)
  const float* as_float(const T* p, int64_t n, int64_t stride, int64_t width, float* buf, int64_t& at) const {
    if constexpr (std::is_same_v<T, float>) {
      at = stride;
      return p;
    } else {
      at = width;
      for (int64_t c = 0; c < n; ++c)
        for (int64_t d = 0; d < width; ++d) buf[c * width + d] = to_float(p[c * stride + d]);
      return buf;
    }
  }

  // a prefill tile's scores: K transposed once into kt [D][kRun], then each row's scores as a sum of D
  // scaled rows of kt (columns past n hold stale values, scored and then ignored)
  void score_tile(const float* qs, int64_t R, const T* kp, int64_t stride, int64_t n, float* s, float* kt) const {
    const int64_t D = L.dim;
    for (int64_t c = 0; c < n; ++c)
      for (int64_t d = 0; d < D; ++d) kt[d * kRun + c] = to_float(kp[c * stride + d]);
    for (int64_t r = 0; r < R; ++r) {
      float row[kRun] = {};
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qs[r * D + d];
        const float* kd = kt + d * kRun;
#pragma omp simd
        for (int64_t c = 0; c < kRun; ++c) row[c] += qd * kd[c];
      }
      std::memcpy(s + r * kRun, row, sizeof(row));
    }
  }

  // causal (a key after the query's position) and window masks of the run's keys t0 .. t0 + n - 1
  void mask(float* s, int64_t R, int64_t per_q, int64_t n, int64_t t0, int64_t pos_begin) const {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t p = pos_begin + r / per_q;
      const int64_t lo = L.window ? p - L.window + 1 : std::numeric_limits<int64_t>::min();
      for (int64_t c = 0; c < n; ++c)
        if (t0 + c > p || t0 + c < lo) s[r * kRun + c] = kNegInf;
    }
  }

  // the online softmax: fold a run's scores (turned into weights in place) and V rows into m, l, acc
  void update(float* s, int64_t R, int64_t n, const T* vp, int64_t stride, float* m, float* l, float* acc,
              const int64_t* koff, float* rows, int64_t W) const {
    const int64_t D = L.dim;
    const vi lane = lane_index();
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * kRun;
      float top = m[r];
#pragma omp simd reduction(max : top)
      for (int64_t c = 0; c < n; ++c) top = std::max(top, sr[c]);
      if (top == kNegInf) {      // nothing visible yet: no weights, and no exp(-inf - -inf)
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      vf sum = {};
      for (int64_t c = 0; c < n; c += kLanes) {   // whole vectors: the row has kRun slots, a multiple of kLanes
        const vf x = loadv(sr + c);
        const vf e = (x != kNegInf) & (lane + static_cast<int>(c) < static_cast<int>(n)) ? fast_expv(x - top) : vf{};
        storev(sr + c, e);
        sum += e;
      }
      const float alpha = fast_exp(m[r] - top);
      l[r] = l[r] * alpha + hsum(sum);
      m[r] = top;
      float* ar = acc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
    }
    int64_t at;
    const float* vr = as_float(vp, n, stride, W, rows, at);
    for (int64_t r = 0; r < R; ++r) accumulate(acc + r * D, s + r * kRun, n, vr + koff[r], at, D);
  }

  T* out_row(const Item& it, int64_t r) const {
    const int64_t per_q = it.heads * L.group;
    return out + ((it.q_begin + r / per_q) * L.heads + it.head_begin * L.group + r % per_q) * L.dim;
  }

  void finish(const Item& it, int64_t R, const float* m, const float* l, const float* acc) const {
    const int64_t D = L.dim;
    if (it.part >= 0) {
      float* dst = scratch + it.part * R * (D + 2);
      std::copy(m, m + R, dst);
      std::copy(l, l + R, dst + R);
      std::copy(acc, acc + R * D, dst + 2 * R);
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      T* dst = out_row(it, r);
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[r * D + d] * inv);
    }
  }

  // the output of a decode item split into parts first .. first + parts - 1
  void merge(const Item& it, int64_t first, int64_t parts) const {
    const int64_t D = L.dim, R = it.heads * L.group;
    std::vector<float> o(D);
    for (int64_t r = 0; r < R; ++r) {
      float top = kNegInf, total = 0.f;
      for (int64_t p = 0; p < parts; ++p) top = std::max(top, scratch[(first + p) * R * (D + 2) + r]);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const float* part = scratch + (first + p) * R * (D + 2);
        if (part[R + r] == 0.f) continue;
        const float w = std::exp(part[r] - top);
        total += part[R + r] * w;
        for (int64_t d = 0; d < D; ++d) o[d] += part[2 * R + r * D + d] * w;
      }
      T* dst = out_row(it, r);
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(total > 0.f ? o[d] / total : 0.f);
    }
  }
};

// The step's work items: a decoding sequence is one item over all its KV heads (each token's K/V row is
// then read whole, in order); a prefilling one is a tile of queries per KV head. When there are too few
// items for the threads, long decode items are split over context chunks: splits gets (item, first slot).
std::vector<Item> plan(const Layout& L, const int64_t* ctx, at::IntArrayRef query_lens,
                       std::vector<std::pair<Item, int64_t>>& splits) {
  std::vector<Item> items;
  const int64_t tile = std::max<int64_t>(1, kTileRows / L.group);
  int64_t row = 0;
  for (int64_t b = 0; b < static_cast<int64_t>(query_lens.size()); ++b) {
    const int64_t qlen = query_lens[b];
    for (int64_t j = 0; j < qlen; j += tile) {
      const int64_t count = std::min(tile, qlen - j), pos = ctx[b] - qlen + j;
      const int64_t lo = L.window ? std::max<int64_t>(0, pos - L.window + 1) : 0;
      if (qlen == 1)
        items.push_back({b, 0, L.kv_heads, row, 1, pos, lo, pos + 1, -1});
      else
        for (int64_t h = 0; h < L.kv_heads; ++h) items.push_back({b, h, 1, row + j, count, pos, lo, pos + count, -1});
    }
    row += qlen;
  }
  const int64_t target = 4 * at::get_num_threads(), n = items.size();
  if (n == 0 || n >= target) return items;
  std::vector<Item> out;
  int64_t slot = 0;
  for (const Item& it : items) {
    const int64_t parts = std::min((target + n - 1) / n, (it.key_end - it.key_begin) / kMinSplit);
    if (it.q_count != 1 || parts < 2) {
      out.push_back(it);
      continue;
    }
    splits.emplace_back(it, slot);
    const int64_t len = it.key_end - it.key_begin;
    for (int64_t p = 0; p < parts; ++p) {
      Item part = it;
      part.key_begin = it.key_begin + len * p / parts;
      part.key_end = it.key_begin + len * (p + 1) / parts;
      part.part = slot++;
      out.push_back(part);
    }
  }
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           at::IntArrayRef query_lens, std::optional<int64_t> window, double scale) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) check_cpu(*t, name);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && q.stride(2) == 1, "paged_attention: q [T, heads, dim] with "
              "contiguous rows, caches [blocks, block_size, kv_heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "paged_attention: K and V caches must be contiguous and of one shape");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_attention: q and the caches must share a dtype");
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  int64_t total = 0;
  for (int64_t n : query_lens) total += n;
  TORCH_CHECK(total == q.size(0) && lens.numel() == static_cast<int64_t>(query_lens.size()) &&
              tables.size(0) == lens.numel(), "paged_attention: query_lens, context_lens and block_tables must "
              "describe the rows of q");
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), dim = q.size(2);
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(3) == dim, "paged_attention: head counts or dims disagree");
  Layout L{heads, kv_heads, heads / kv_heads, dim, k_cache.size(1), tables.size(1), q.stride(0), q.stride(1),
           window.value_or(0), static_cast<float>(scale)};
  at::Tensor out = at::empty({q.size(0), heads, dim}, q.options());
  std::vector<std::pair<Item, int64_t>> splits;
  std::vector<Item> items = plan(L, lens.data_ptr<int64_t>(), query_lens, splits);
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost() > b.cost(); });
  int64_t slots = 0;
  for (const Item& it : items) slots = std::max(slots, it.part + 1);
  std::vector<float> scratch(slots * heads * (dim + 2));
  dispatch_float(q.scalar_type(), "paged_attention", [&](auto tag) {
    using T = decltype(tag);
    Attend<T> a{L, static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k_cache.const_data_ptr()),
                static_cast<const T*>(v_cache.const_data_ptr()), tables.const_data_ptr<int64_t>(),
                static_cast<T*>(out.mutable_data_ptr()), scratch.data()};
    parallel_items(items.size(), [&](int64_t i) { a.run(items[i]); });
    for (size_t i = 0; i < splits.size(); ++i) {
      const int64_t next = i + 1 < splits.size() ? splits[i + 1].second : slots;
      a.merge(splits[i].first, splits[i].second, next - splits[i].second);
    }
  });
  return out;
}

}  // namespace
}  // namespace padengine

TORCH_LIBRARY_FRAGMENT(padengine, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "int[] query_lens, int? window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(padengine, CPU, m) {
  m.impl("paged_attention", &padengine::paged_attention);
}
