// One decoder layer of padengine/models/llama.py in a single call: the "cpp" op set's own ops (and oneDNN's
// matmul on prepacked weights) in the module path's order, with no Python between them. On this CPU the
// Python between a layer's ~20 ops cost more than its norms, rotary and KV write together; this is the
// layer without Qwen3's q/k norms, on one rank (a tensor-parallel layer all-reduces in Python).
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace padengine {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// as csrc/ops.py's linear: oneDNN's matmul on the prepacked weight where one is given, else at::linear
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& packed,
                  const std::optional<at::Tensor>& bias) {
  if (!packed.has_value()) return at::linear(x, weight, bias);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, *packed, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          c10::IValue()};
  op.callBoxed(stack);
  return stack.back().toTensor();
}

using Cache = at::Tensor&;
using In = const at::Tensor&;

// weights, packed, biases: qkv_proj, o_proj, gate_up_proj, down_proj; qkv_sizes: the q and the k (= v) widths
std::tuple<at::Tensor, at::Tensor> decoder_layer(
    In x, const std::optional<at::Tensor>& residual, In positions, In input_norm, In post_norm, double eps,
    at::TensorList weights, const c10::List<std::optional<at::Tensor>>& packed,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef qkv_sizes, In cos, In sin, Cache k_cache,
    Cache v_cache, In slot_mapping, In block_tables, In context_lens, at::IntArrayRef query_lens,
    std::optional<int64_t> window, double scale) {
  TORCH_CHECK(weights.size() == 4 && packed.size() == 4 && biases.size() == 4 && qkv_sizes.size() == 2,
              "decoder_layer: four linear layers (qkv, o, gate_up, down) and the q and kv widths");
  TORCH_CHECK(k_cache.dim() == 4, "decoder_layer: caches [blocks, block_size, kv_heads, dim]");
  static const auto rms = find<at::Tensor(In, In, double)>("padengine::rms_norm");
  static const auto add_rms = find<std::tuple<at::Tensor, at::Tensor>(In, In, In, double)>("padengine::add_rms_norm");
  static const auto rotary = find<void(at::Tensor&, at::Tensor&, In, In, In)>("padengine::rotary_");
  static const auto store = find<void(at::Tensor&, at::Tensor&, In, In, In)>("padengine::write_kv");
  static const auto attend = find<at::Tensor(In, In, In, In, In, at::IntArrayRef, std::optional<int64_t>, double)>(
      "padengine::paged_attention");
  static const auto silu_mul = find<at::Tensor(In)>("padengine::silu_and_mul");
  auto proj = [&](In in, int i) { return linear(in, weights[i], packed.get(i), biases.get(i)); };

  at::Tensor h, res;
  if (residual.has_value()) {
    std::tie(h, res) = add_rms.call(x, *residual, input_norm, eps);
  } else {
    h = rms.call(x, input_norm, eps);
    res = x;
  }
  const int64_t dim = k_cache.size(3);
  std::vector<at::Tensor> qkv = proj(h, 0).split_with_sizes({qkv_sizes[0], qkv_sizes[1], qkv_sizes[1]}, -1);
  at::Tensor q = qkv[0].view({-1, qkv_sizes[0] / dim, dim});
  at::Tensor k = qkv[1].view({-1, qkv_sizes[1] / dim, dim}), v = qkv[2].view({-1, qkv_sizes[1] / dim, dim});
  rotary.call(q, k, positions, cos, sin);
  store.call(k_cache, v_cache, k, v, slot_mapping);
  const at::Tensor attended = attend.call(q, k_cache, v_cache, block_tables, context_lens, query_lens, window, scale);
  std::tie(h, res) = add_rms.call(proj(attended.flatten(1), 1), res, post_norm, eps);
  return {proj(silu_mul.call(proj(h, 2)), 3), res};
}

}  // namespace
}  // namespace padengine

TORCH_LIBRARY_FRAGMENT(padengine, m) {
  m.def("decoder_layer(Tensor x, Tensor? residual, Tensor positions, Tensor input_norm, Tensor post_norm, "
        "float eps, Tensor[] weights, Tensor?[] packed, Tensor?[] biases, int[] qkv_sizes, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, "
        "int[] query_lens, int? window, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(padengine, CPU, m) {
  m.impl("decoder_layer", &padengine::decoder_layer);
}

// a prepacked weight is an MkldnnCPU tensor, which picks this key for the whole call
TORCH_LIBRARY_IMPL(padengine, MkldnnCPU, m) {
  m.impl("decoder_layer", &padengine::decoder_layer);
}
