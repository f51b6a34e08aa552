// What the CPU kernels share: float32 views of the three cache/activation dtypes, the machine's vector type
// with a branch-free exp, horizontal sums and maxima, a dot product and row accumulation, and a parallel
// loop that hands out work items one at a time.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace padengine {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }     // round to nearest even

// The machine's own vector: one zmm with AVX-512, else one ymm. (A 16-lane vector on AVX2 is a pair of ymm,
// and the 16 partial sums of a key chunk then no longer fit the 16 registers: measured 8x slower.)
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
// loads and stores through a 4-byte-aligned twin: memcpy into a vector compiles (under GCC's preference for
// 256-bit moves) to two ymm stores to the stack and a zmm load back, a store-forwarding stall per load
typedef float vf_unaligned __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
inline vf loadv(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void storev(float* p, vf x) { *reinterpret_cast<vf_unaligned*>(p) = x; }

inline vi lane_index() {
  vi x;
  for (int i = 0; i < kLanes; ++i) x[i] = i;
  return x;
}

// e^x lane by lane to about 2 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n from the
// exponent bits; floor as truncation, corrected where it rounded up). No branches and no libm call; inputs
// are clamped to [-87, 88], so exp(-inf) comes out as 1.6e-38, not 0: callers that need an exact 0 select it.
inline vf fast_expv(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;
  x = x > 88.0f ? vf{} + 88.0f : x;
  const vf t = x * 1.44269504088896341f + 0.5f;
  vi ni = __builtin_convertvector(t, vi);
  ni += __builtin_convertvector(ni, vf) > t;        // true is -1: truncation rounded a negative t up
  const vf n = __builtin_convertvector(ni, vf);
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * reinterpret_cast<vf>((ni + 127) << 23);
}

inline float fast_exp(float x) { return fast_expv(vf{} + x)[0]; }    // one lane of it

// the lanes swapped in neighbouring blocks of 8, 4 or 2: the steps of a shuffle tree for horizontal sums
// and maxima (a loop's simd reduction takes the lanes one after another)
#ifdef __AVX512F__
#define PAD_SWAP8(x) __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
#define PAD_SWAP4(x) __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
#define PAD_SWAP2(x) __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
#else
#define PAD_SWAP4(x) __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3)
#define PAD_SWAP2(x) __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5)
#endif

inline float hsum(vf x) {
#ifdef __AVX512F__
  x += PAD_SWAP8(x);
#endif
  x += PAD_SWAP4(x);
  x += PAD_SWAP2(x);
  return x[0] + x[1];
}

inline float hmax(vf x) {
#ifdef __AVX512F__
  x = x > PAD_SWAP8(x) ? x : PAD_SWAP8(x);
#endif
  x = x > PAD_SWAP4(x) ? x : PAD_SWAP4(x);
  x = x > PAD_SWAP2(x) ? x : PAD_SWAP2(x);
  return std::max(x[0], x[1]);
}

// {sum of p[c]'s lanes : c < kLanes}: a transpose-and-add tree (45 vector operations for 16 lanes, where
// 16 separate horizontal sums take about 130); each level halves the vectors and the lanes each one sums
inline vf hsum_each(const vf* p) {
#ifdef __AVX512F__
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  vf b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

inline float dot(const float* a, const float* b, int64_t n) {
  vf acc = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) acc += loadv(a + d) * loadv(b + d);
  float sum = hsum(acc);
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// acc[0:D] += sum_c p[c] * rows[c * stride : c * stride + D], the accumulators held in registers over the
// run (4 vectors of columns at a time), where a loop over acc per key would load and store them for every key
inline void accumulate(float* acc, const float* p, int64_t n, const float* rows, int64_t stride, int64_t D) {
  constexpr int64_t W = 4 * kLanes;
  int64_t d0 = 0;
  for (; d0 + W <= D; d0 += W) {
    float* o = acc + d0;
    vf a0 = loadv(o), a1 = loadv(o + kLanes), a2 = loadv(o + 2 * kLanes), a3 = loadv(o + 3 * kLanes);
    for (int64_t c = 0; c < n; ++c) {
      const float* x = rows + c * stride + d0;
      const vf pc = vf{} + p[c];
      a0 += pc * loadv(x), a1 += pc * loadv(x + kLanes), a2 += pc * loadv(x + 2 * kLanes), a3 += pc * loadv(x + 3 * kLanes);
    }
    storev(o, a0), storev(o + kLanes, a1), storev(o + 2 * kLanes, a2), storev(o + 3 * kLanes, a3);
  }
  for (; d0 + kLanes <= D; d0 += kLanes) {
    vf a = loadv(acc + d0);
    for (int64_t c = 0; c < n; ++c) a += (vf{} + p[c]) * loadv(rows + c * stride + d0);
    storev(acc + d0, a);
  }
  for (; d0 < D; ++d0)
    for (int64_t c = 0; c < n; ++c) acc[d0] += p[c] * rows[c * stride + d0];
}

// f(i) for every i in [0, n), the items taken one at a time by the intra-op threads: items of unequal
// cost (ragged contexts, prefill tiles beside decode rows) would leave threads idle under a static split.
template <typename F>
void parallel_items(int64_t n, const F& f) {
  int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(i);
  });
}

// f(T{}) for T the C++ type of a float32 / bfloat16 / float16 tensor (no float64: nothing here runs in it).
template <typename F>
void dispatch_float(at::ScalarType type, const char* what, const F& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "padengine CPU kernels: ", what, " must be float32, bfloat16 or float16, got ", type);
  }
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "padengine CPU kernels: ", name, " is on ", t.device(), ", not the CPU");
}

}  // namespace padengine
