// The row-wise ops of a layer, each one pass instead of a chain of torch ops: RMSNorm with the residual add
// fused (padengine/layers/norm.py), rotary embedding in place (layers/rotary.py), and the KV write by slot
// mapping (layers/attention.py's write_kv), and SiLU-and-multiply (layers/activation.py). Intermediate
// values are rounded to the activation dtype where the torch references round them, so bfloat16 results
// match theirs up to float32 summation order.
#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace padengine {
namespace {

template <typename T>
inline float round_trip(float x) { return to_float(from_float<T>(x)); }   // what storing in T keeps

// rows of `width` values, `rows` of them: split so that a thread gets at least ~32K values
inline int64_t grain(int64_t width) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(width, 1)); }

at::Tensor contiguous_rows(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  return x.is_contiguous() ? x : x.contiguous();
}

// out = weight * T(h * rsqrt(mean(h^2) + eps)) with h = x (+ residual, rounded to T, which is the new residual)
std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& x_in, const at::Tensor* residual_in,
                                        const at::Tensor& weight_in, double eps) {
  const at::Tensor x = contiguous_rows(x_in, "x"), weight = contiguous_rows(weight_in, "weight");
  const at::Tensor res = residual_in ? contiguous_rows(*residual_in, "residual") : at::Tensor();
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && (!res.defined() || res.scalar_type() == x.scalar_type()),
              "rms_norm: x, residual and weight must share a dtype");
  const int64_t width = x.size(-1), rows = x.numel() / std::max<int64_t>(width, 1);
  TORCH_CHECK(weight.numel() == width && (!res.defined() || res.sizes() == x.sizes()), "rms_norm: shapes disagree");
  at::Tensor out = at::empty_like(x), summed = res.defined() ? at::empty_like(x) : x;
  dispatch_float(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T *xp = static_cast<const T*>(x.const_data_ptr()), *wp = static_cast<const T*>(weight.const_data_ptr());
    const T* rp = res.defined() ? static_cast<const T*>(res.const_data_ptr()) : nullptr;
    T *op = static_cast<T*>(out.mutable_data_ptr()), *sp = static_cast<T*>(summed.mutable_data_ptr());
    at::parallel_for(0, rows, grain(width), [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        const T* xr = xp + r * width;
        T* sr = sp + r * width;
        if (rp) {
          for (int64_t d = 0; d < width; ++d) sr[d] = from_float<T>(to_float(xr[d]) + to_float(rp[r * width + d]));
          xr = sr;
        }
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t d = 0; d < width; ++d) sq += to_float(xr[d]) * to_float(xr[d]);
        const float inv = 1.f / std::sqrt(sq / width + static_cast<float>(eps));
        for (int64_t d = 0; d < width; ++d)
          op[r * width + d] = from_float<T>(to_float(wp[d]) * round_trip<T>(to_float(xr[d]) * inv));
      }
    });
  });
  return {out, summed};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<0>(norm(x, nullptr, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return norm(x, &residual, weight, eps);
}

// x [T, 2I] (gate, then up) -> silu(gate) * up, float32 a vector at a time; bfloat16 and float16 through
// torch's own ops, as the reference (our scalar rounding measured 1.3-2.6x slower than its vectorized one)
at::Tensor silu_and_mul(const at::Tensor& x_in) {
  const at::Tensor x = contiguous_rows(x_in, "x");
  TORCH_CHECK(x.size(-1) % 2 == 0, "silu_and_mul: the last dimension must be even (gate, then up)");
  if (x.scalar_type() != at::kFloat) {
    const std::vector<at::Tensor> halves = x.chunk(2, -1);
    return at::mul(at::silu(halves[0]), halves[1]);
  }
  const int64_t width = x.size(-1) / 2, rows = x.numel() / std::max<int64_t>(2 * width, 1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, grain(2 * width), [&](int64_t a, int64_t b) {
    float g[kLanes] = {}, u[kLanes] = {}, o[kLanes];
    auto silu_mul = [](vf gv, vf uv) { return gv / (1.0f + fast_expv(-gv)) * uv; };
    for (int64_t r = a; r < b; ++r) {
      const float *gate = xp + r * 2 * width, *up = gate + width;
      float* dst = op + r * width;
      int64_t d0 = 0;
      for (; d0 + kLanes <= width; d0 += kLanes) storev(dst + d0, silu_mul(loadv(gate + d0), loadv(up + d0)));
      if (d0 < width) {      // the row's tail, through a zero-padded copy
        std::copy(gate + d0, gate + width, g);
        std::copy(up + d0, up + width, u);
        storev(o, silu_mul(loadv(g), loadv(u)));
        std::copy(o, o + (width - d0), dst + d0);
      }
    }
  });
  return out;
}

// x [T, heads, dim] (rows contiguous) rotated in place: x * cos + rotate_half(x) * sin, with the float32
// tables' rows at `positions` rounded to x's dtype, and each product and the sum rounded as torch's ops do
template <typename T>
void rotate(at::Tensor& x, const int64_t* pos, const float* cos, const float* sin, int64_t table_dim) {
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  T* base = static_cast<T*>(x.mutable_data_ptr());
  at::parallel_for(0, tokens, grain(heads * 2 * half), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const float *c = cos + pos[t] * table_dim, *s = sin + pos[t] * table_dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = base + t * x.stride(0) + h * x.stride(1);
        for (int64_t d = 0; d < half; ++d) {
          const float lo = to_float(row[d]), hi = to_float(row[d + half]);
          const float c_lo = round_trip<T>(c[d]), c_hi = round_trip<T>(c[d + half]);
          const float s_lo = round_trip<T>(s[d]), s_hi = round_trip<T>(s[d + half]);
          row[d] = from_float<T>(round_trip<T>(lo * c_lo) + round_trip<T>(-hi * s_lo));
          row[d + half] = from_float<T>(round_trip<T>(hi * c_hi) + round_trip<T>(lo * s_hi));
        }
      }
    }
  });
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_in,
             const at::Tensor& sin_in) {
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const at::Tensor cos = contiguous_rows(cos_in, "cos"), sin = contiguous_rows(sin_in, "sin");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes(), "rotary: float32 cos/sin tables");
  for (at::Tensor* x : {&q, &k}) {
    check_cpu(*x, "q/k");
    TORCH_CHECK(x->dim() == 3 && x->stride(2) == 1 && x->size(0) == pos.numel() && x->size(2) == cos.size(1) &&
                x->size(2) % 2 == 0, "rotary: q, k [T, heads, dim] with contiguous rows and a position each");
    dispatch_float(x->scalar_type(), "rotary", [&](auto tag) {
      rotate<decltype(tag)>(*x, pos.const_data_ptr<int64_t>(), cos.const_data_ptr<float>(),
                            sin.const_data_ptr<float>(), cos.size(1));
    });
  }
}

void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k.dim() == 3 && v.sizes() == k.sizes(),
              "write_kv: contiguous caches, k and v [T, kv_heads, dim]");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "write_kv: k, v and the caches must share a dtype");
  TORCH_CHECK(k_cache.numel() == v_cache.numel() && k.size(1) * k.size(2) == k_cache.size(-2) * k_cache.size(-1),
              "write_kv: a token's K/V must fill one cache slot");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t tokens = k.size(0), heads = k.size(1), row = k.size(2) * k.element_size();
  const int64_t slot_bytes = heads * row, capacity = k_cache.numel() / (k.size(1) * k.size(2));
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  char *kc = static_cast<char*>(k_cache.mutable_data_ptr()), *vc = static_cast<char*>(v_cache.mutable_data_ptr());
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "write_kv: slot ", slot[t], " is outside the cache");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "write_kv: k and v need contiguous rows");
  auto copy = [&](char* cache, const at::Tensor& x, int64_t t) {
    const char* src = static_cast<const char*>(x.const_data_ptr());
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(cache + slot[t] * slot_bytes + h * row, src + (t * x.stride(0) + h * x.stride(1)) * x.element_size(),
                  row);
  };
  at::parallel_for(0, tokens, std::max<int64_t>(1, (1 << 16) / (2 * slot_bytes)), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      copy(kc, k, t);
      copy(vc, v, t);
    }
  });
}

}  // namespace
}  // namespace padengine

TORCH_LIBRARY_FRAGMENT(padengine, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(padengine, CPU, m) {
  m.impl("rms_norm", &padengine::rms_norm);
  m.impl("add_rms_norm", &padengine::add_rms_norm);
  m.impl("rotary_", &padengine::rotary_);
  m.impl("write_kv", &padengine::write_kv);
  m.impl("silu_and_mul", &padengine::silu_and_mul);
}
