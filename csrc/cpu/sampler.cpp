// The fused PAD sampler: padengine/layers/sampler.py's pad_sample, one pass over each row's logits.
//
// Per row: the base top-k by a selection scan (or the whole vocabulary), the reward logits gathered at the
// candidates, the PAD score, temperature, top-p / min-p as filter_scores defines them, then argmax or the
// Gumbel-max draw with the torch sampler's lowbias32 noise keyed by (seed, position, token id), the
// choice's log-probability and the most likely alternatives. Equal values are ordered by token id (lower
// first), at the top-k cut and in every argmax: torch leaves their order unspecified, the Triton sampler
// orders them the same way.
#include "common.h"

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace padengine {
namespace {

constexpr int64_t kScanBlock = 64;   // the scan skips a block whose max cannot enter the top k
constexpr int64_t kMaxScanK = 128;   // past this k, std::nth_element instead of the sorted insertion
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline uint32_t mix32(uint32_t x) {   // lowbias32, as _mix32 in layers/sampler.py
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

inline float gumbel(uint32_t h) {     // gumbel_from_hash
  const float u = (static_cast<float>(h >> 9) + 0.5f) * (1.0f / 8388608.0f);
  return -std::log(-std::log(u));
}

struct Cand {
  float value;
  int64_t id;
};

inline bool before(const Cand& a, const Cand& b) { return a.value > b.value || (a.value == b.value && a.id < b.id); }

// The k largest of a row (equal values: lower ids first), any order.
template <typename T>
void top_k(const T* row, int64_t V, int64_t k, std::vector<Cand>& out) {
  out.clear();
  if (k > kMaxScanK) {
    out.resize(V);
    for (int64_t i = 0; i < V; ++i) out[i] = {to_float(row[i]), i};
    std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), before);
    out.resize(k);
    return;
  }
  // sorted insertion in id order: a later id enters only strictly above the current k-th value
  out.reserve(k + 1);
  float kth = kNegInf;
  for (int64_t b = 0; b < V; b += kScanBlock) {
    const int64_t e = std::min(V, b + kScanBlock);
    const bool full = static_cast<int64_t>(out.size()) == k;
    if (full) {
      float top = kNegInf;
#pragma omp simd reduction(max : top)
      for (int64_t i = b; i < e; ++i) top = std::max(top, to_float(row[i]));
      if (!(top > kth)) continue;
    }
    for (int64_t i = b; i < e; ++i) {
      const float x = to_float(row[i]);
      if (static_cast<int64_t>(out.size()) == k && !(x > kth)) continue;
      out.insert(std::upper_bound(out.begin(), out.end(), x, [](float v, const Cand& c) { return v > c.value; }),
                 Cand{x, i});
      if (static_cast<int64_t>(out.size()) > k) out.pop_back();
      if (static_cast<int64_t>(out.size()) == k) kth = out.back().value;
    }
  }
}

inline float load_float(const void* p, at::ScalarType type, int64_t i) {
  switch (type) {
    case at::kBFloat16: return to_float(static_cast<const c10::BFloat16*>(p)[i]);
    case at::kHalf: return to_float(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// the max and the log of sum(exp(x - max)) over the finite entries, as torch's log_softmax takes them
// (summed in float64: a whole vocabulary summed one by one in float32 would drift by ~1e-4)
std::pair<float, float> log_normalizer(const std::vector<float>& x) {
  float top = kNegInf;
  double sum = 0.;
  for (float v : x) top = std::max(top, v);
  for (float v : x) sum += v == kNegInf ? 0.f : std::exp(v - top);
  return {top, static_cast<float>(std::log(sum))};
}

// filter_scores on one row of scaled scores: min_p against the most likely, top_p by the mass before
// each candidate in descending order (a float64 running sum, as torch's CPU cumsum), ties at the cut kept
void filter(std::vector<float>& s, const float* top_p, const float* min_p) {
  auto [top, log_sum] = log_normalizer(s);
  std::vector<float> logp(s.size());
  for (size_t c = 0; c < s.size(); ++c) logp[c] = (s[c] - top) - log_sum;
  float cut = kNegInf;
  if (min_p) cut = -log_sum + std::log(*min_p);
  if (top_p && *top_p < 1.f) {
    std::vector<float> ranked(logp);
    std::sort(ranked.begin(), ranked.end(), std::greater<float>());
    double mass = 0.;
    float keep = std::numeric_limits<float>::infinity();
    for (float r : ranked) {
      const float e = std::exp(r);
      mass += e;
      if (static_cast<float>(mass) - e < *top_p) keep = std::min(keep, r);
    }
    cut = std::max(cut, keep);
  }
  for (size_t c = 0; c < s.size(); ++c)
    if (logp[c] < cut) s[c] = kNegInf;
}

struct Params {
  const int64_t *top_k, *seed, *position;
  const float *weight, *temperature, *top_p, *min_p;   // top_p, min_p: null when not given
  std::optional<int64_t> max_k;
  int64_t num_top;
  const void* reward;                                  // null: no reward model
  at::ScalarType reward_type;
  int64_t reward_stride;
};

struct Out {
  int64_t* tokens;
  float* logprobs;
  int64_t* top_ids;
  float* top_logprobs;
};

template <typename T>
void sample_row(const T* zb, int64_t V, int64_t i, const Params& p, const Out& o) {
  int64_t k = p.top_k[i] <= 0 || p.top_k[i] >= V ? V : p.top_k[i];
  if (p.max_k) k = std::min(k, std::min(*p.max_k, V));
  std::vector<Cand> cand;
  if (k < V) {
    top_k(zb, V, k, cand);
  } else {
    cand.resize(V);
    for (int64_t j = 0; j < V; ++j) cand[j] = {to_float(zb[j]), j};
  }
  const size_t K = cand.size();
  std::vector<float> s(K);
  for (size_t c = 0; c < K; ++c) s[c] = cand[c].value;
  if (p.reward) {   // score = zb + w * (log_softmax_C(zr) - log_softmax_C(zb))
    const void* zr_row = static_cast<const char*>(p.reward) + i * p.reward_stride * c10::elementSize(p.reward_type);
    std::vector<float> zr(K);
    for (size_t c = 0; c < K; ++c) zr[c] = load_float(zr_row, p.reward_type, cand[c].id);
    auto [top_b, log_b] = log_normalizer(s);
    auto [top_r, log_r] = log_normalizer(zr);
    for (size_t c = 0; c < K; ++c)
      s[c] = s[c] + p.weight[i] * (((zr[c] - top_r) - log_r) - ((s[c] - top_b) - log_b));
  }
  const bool greedy = p.temperature[i] <= 0.f;
  const float temp = greedy ? 1.f : p.temperature[i];
  for (float& v : s) v = v / temp;
  if (p.top_p || p.min_p) filter(s, p.top_p ? p.top_p + i : nullptr, p.min_p ? p.min_p + i : nullptr);
  // the pick: the highest score, or the highest score + noise (a candidate that cannot beat the best so
  // far even with the largest noise is not hashed)
  const uint64_t seed = static_cast<uint64_t>(p.seed[i]);
  uint32_t key = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32)));
  key = mix32(key + static_cast<uint32_t>(p.position[i]));
  const float max_noise = gumbel(0xFFFFFFFFu);
  size_t pick = K;
  float best = kNegInf;
  for (size_t c = 0; c < K; ++c) {
    if (s[c] == kNegInf || (!greedy && s[c] + max_noise < best)) continue;
    const float v = greedy ? s[c] : s[c] + gumbel(mix32(key ^ static_cast<uint32_t>(cand[c].id)));
    if (pick == K || v > best || (v == best && cand[c].id < cand[pick].id)) {
      best = v;
      pick = c;
    }
  }
  auto [top, log_sum] = log_normalizer(s);
  o.tokens[i] = cand[pick].id;
  o.logprobs[i] = (s[pick] - top) - log_sum;
  if (p.num_top == 0) return;
  std::vector<size_t> order;
  for (size_t c = 0; c < K; ++c)
    if (s[c] != kNegInf) order.push_back(c);
  const size_t n = std::min<size_t>(p.num_top, order.size());
  std::partial_sort(order.begin(), order.begin() + n, order.end(),
                    [&](size_t a, size_t b) { return before({s[a], cand[a].id}, {s[b], cand[b].id}); });
  for (size_t j = 0; j < n; ++j) {
    o.top_ids[i * p.num_top + j] = cand[order[j]].id;
    o.top_logprobs[i * p.num_top + j] = (s[order[j]] - top) - log_sum;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pad_sample(
    const at::Tensor& base_logits, const std::optional<at::Tensor>& reward_logits, const at::Tensor& top_k,
    const at::Tensor& weight, const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& position,
    const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p, std::optional<int64_t> max_k,
    int64_t num_top) {
  check_cpu(base_logits, "base_logits");
  TORCH_CHECK(base_logits.dim() == 2 && num_top >= 0, "pad_sample: base_logits [N, V], num_top >= 0");
  const at::Tensor base = base_logits.stride(1) == 1 ? base_logits : base_logits.contiguous();
  const int64_t N = base.size(0), V = base.size(1);
  auto rows = [N](const at::Tensor& t, at::ScalarType type) {
    TORCH_CHECK(t.numel() == N, "pad_sample: per-row arguments need one value per row");
    return t.to(type).contiguous();
  };
  const at::Tensor k = rows(top_k, at::kLong), w = rows(weight, at::kFloat), t = rows(temperature, at::kFloat);
  const at::Tensor sd = rows(seed, at::kLong), pos = rows(position, at::kLong);
  const at::Tensor tp = top_p ? rows(*top_p, at::kFloat) : at::Tensor();
  const at::Tensor mp = min_p ? rows(*min_p, at::kFloat) : at::Tensor();
  at::Tensor reward;
  if (reward_logits) {
    reward = reward_logits->stride(1) == 1 ? *reward_logits : reward_logits->contiguous();
    TORCH_CHECK(reward.dim() == 2 && reward.size(0) == N && reward.size(1) >= V,
                "pad_sample: reward_logits [N, >= V]");
    dispatch_float(reward.scalar_type(), "reward_logits", [](auto) {});
  }
  const auto opts = base.options();
  at::Tensor tokens = at::zeros({N}, opts.dtype(at::kLong)), logprobs = at::zeros({N}, opts.dtype(at::kFloat));
  at::Tensor top_ids = at::zeros({N, num_top}, opts.dtype(at::kLong));
  at::Tensor top_lps = at::full({N, num_top}, kNegInf, opts.dtype(at::kFloat));
  Params p{k.const_data_ptr<int64_t>(), sd.const_data_ptr<int64_t>(), pos.const_data_ptr<int64_t>(),
           w.const_data_ptr<float>(), t.const_data_ptr<float>(), tp.defined() ? tp.const_data_ptr<float>() : nullptr,
           mp.defined() ? mp.const_data_ptr<float>() : nullptr, max_k, num_top,
           reward.defined() ? reward.const_data_ptr() : nullptr,
           reward.defined() ? reward.scalar_type() : at::kFloat, reward.defined() ? reward.stride(0) : 0};
  Out o{tokens.mutable_data_ptr<int64_t>(), logprobs.mutable_data_ptr<float>(), top_ids.mutable_data_ptr<int64_t>(),
        top_lps.mutable_data_ptr<float>()};
  dispatch_float(base.scalar_type(), "base_logits", [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(base.const_data_ptr());
    parallel_items(N, [&](int64_t i) { sample_row(data + i * base.stride(0), V, i, p, o); });
  });
  return {tokens, logprobs, top_ids, top_lps};
}

}  // namespace
}  // namespace padengine

TORCH_LIBRARY_FRAGMENT(padengine, m) {
  m.def("pad_sample(Tensor base_logits, Tensor? reward_logits, Tensor top_k, Tensor weight, Tensor temperature, "
        "Tensor seed, Tensor position, Tensor? top_p=None, Tensor? min_p=None, int? max_k=None, int num_top=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(padengine, CPU, m) { m.impl("pad_sample", &padengine::pad_sample); }
