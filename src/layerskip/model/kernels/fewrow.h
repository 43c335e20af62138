// The few-row kernels' C++ interface, shared by fewrow.cpp (the kernels) and layers.cpp (decoder layers in one
// call). All tensors on the CPU; x float32 [R, K]; results float32.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace fewrow {

// Weight formats: the GGUF block formats, and the two float ones (negative: not block formats).
enum Fmt : int { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, kFloat32 = -1, kBFloat16 = -2 };

// Float weights as panels [ceil(N/16), K, 16]: 16 output features a panel, each k's 16 weights adjacent.
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, int64_t out_features);
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, int64_t out_features);
// Block weights as panels of 16 features [ceil(N/16), K/32 * 16 * block bytes] (linear.py: block_panels).
at::Tensor linear_q(int fmt, const at::Tensor& x, const at::Tensor& w, int64_t out_features);
// SiLU(gate) * up, gate_up float32 [R, 2 I] -> [R, I] (the gated MLP's activation, vectorized).
at::Tensor silu_gate(const at::Tensor& gate_up);
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t start_pos,
                     const c10::optional<at::Tensor>& attendable, const c10::optional<at::Tensor>& starts,
                     const c10::optional<at::Tensor>& rows);

// Each batch row's first position: `starts` (int64 [B]) when given, else start_pos for every row.
std::vector<int64_t> row_starts(int64_t B, int64_t start_pos, const c10::optional<at::Tensor>& starts);

// Each batch row's row of a cache with `cached` rows: `rows` (int64 [B]) when given, else row b itself.
std::vector<int64_t> cache_rows(int64_t B, int64_t cached, const c10::optional<at::Tensor>& rows);

// One weight matrix as the Python side prepared it (model/kernels/linear.py: NativeLinear).
struct PreparedWeight {
  int format;
  at::Tensor data;
  int64_t out_features;
  c10::optional<at::Tensor> bias;
};

struct LayerWeights {
  PreparedWeight qkv, o, gate_up, down;
  at::Tensor input_norm, post_norm;
};

// Every decoder layer of a model, built once when its weights are prepared.
struct LayerStack {
  std::vector<LayerWeights> layers;
};

// Layers [start_layer, end_layer) over hidden [B, T, H] at positions [start_pos, start_pos + T) (with `starts`:
// row b at [starts[b], starts[b] + T), and cos/sin [B, T, D] for its rows), writing their keys and values into
// the cache ([L, Bc, Hkv, capacity, D], or none; row b into cache row rows[b], or b without `rows`);
// model/transformer.py's graph. `reduce` (a Python callable or None) sums the o and down products across
// tensor-parallel ranks.
at::Tensor forward_layers(const at::Tensor& hidden, const LayerStack& stack, int64_t start_layer, int64_t end_layer,
                          int64_t start_pos, const c10::optional<at::Tensor>& keys,
                          const c10::optional<at::Tensor>& values, const c10::optional<at::Tensor>& attendable,
                          const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
                          int64_t head_dim, double eps, const c10::optional<at::Tensor>& starts,
                          const c10::optional<at::Tensor>& rows, const pybind11::object& reduce);

// The Python bindings of layers.cpp, called from fewrow.cpp's module definition.
void bind_layers(pybind11::module& m);

}  // namespace fewrow
