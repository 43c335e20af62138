// A range of decoder layers in one call: the decoding step without Python in between.
//
// Why: a decoding step of a small model costs more in Python and torch dispatch (several hundred small ops)
// than in arithmetic, so the per-layer work (RMSNorm, the fused q/k/v product, RoPE, the KV-cache write,
// attention, the output product, the residuals, the gated MLP) runs here, calling the few-row kernels of
// fewrow.cpp. Every step is per row (norms, RoPE, SiLU), per query row (attention) or a row-invariant product,
// so a position's result never depends on the other rows of the pass: the property self-speculation and
// batching rely on. The graph is the one of model/transformer.py, which stays the reference (and runs training).

#include "fewrow.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fewrow {
namespace {

// Rows per task of the per-row steps (norms; fewrow.cpp's silu_gate likewise): a prompt's rows split across
// threads, a decoding step's few stay on one (each row's arithmetic is the same either way).
constexpr int64_t kRowGrain = 16;

// y = x W^T (+ bias) for one prepared weight matrix.
at::Tensor apply(const PreparedWeight& w, const at::Tensor& x) {
  at::Tensor y;
  switch (w.format) {
    case kFloat32: y = linear_f32(x, w.data, w.out_features); break;
    case kBFloat16: y = linear_bf16(x, w.data, w.out_features); break;
    default: y = linear_q(w.format, x, w.data, w.out_features); break;
  }
  if (w.bias.has_value()) y.add_(*w.bias);
  return y;
}

// RMSNorm of every row, in float32: the sum of squares in index order, then weight * (x / rms).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), width = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = in + r * width;
      float sum = 0.f;
      for (int64_t i = 0; i < width; ++i) sum += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(sum / float(width) + float(eps));
      for (int64_t i = 0; i < width; ++i) o[r * width + i] = w[i] * (xr[i] * inv);
    }
  });
  return out;
}

// Rotate the first `heads` head slices of each row in place (rotate-half layout, as HF Llama): row r is
// position t = r % T of its batch row; cos/sin are [T, D] (shared by the batch rows, `period` T) or [B * T, D]
// (one row each, `period` B * T), with both halves equal.
void rope(float* rows, int64_t stride, int64_t count, int64_t period, int64_t heads, int64_t D, const float* cos,
          const float* sin) {
  const int64_t half = D / 2;
  for (int64_t r = 0; r < count; ++r) {
    const float* c = cos + (r % period) * D;
    const float* s = sin + (r % period) * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = rows + r * stride + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  }
}

// Under tensor parallelism (model/parallel.py) the o and down products are this rank's partial sums: `reduce`, a
// Python callable (or None), sums them across ranks in place.
void all_reduce(const pybind11::object& reduce, at::Tensor& partial) {
  if (reduce.is_none()) return;
  pybind11::gil_scoped_acquire gil;
  reduce(partial);
}

}  // namespace

at::Tensor forward_layers(const at::Tensor& hidden, const LayerStack& stack, int64_t start_layer, int64_t end_layer,
                          int64_t start_pos, const c10::optional<at::Tensor>& keys,
                          const c10::optional<at::Tensor>& values, const c10::optional<at::Tensor>& attendable,
                          const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
                          int64_t head_dim, double eps, const c10::optional<at::Tensor>& starts,
                          const c10::optional<at::Tensor>& row_ids, const pybind11::object& reduce) {
  const std::vector<LayerWeights>& layers = stack.layers;
  TORCH_CHECK(hidden.dim() == 3 && hidden.scalar_type() == at::kFloat, "hidden must be float32 [B, T, H]");
  TORCH_CHECK(0 <= start_layer && start_layer <= end_layer && end_layer <= int64_t(layers.size()), "bad layer range");
  const int64_t B = hidden.size(0), T = hidden.size(1), width = hidden.size(2);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim, qkv_width = q_size + 2 * kv_size;
  const bool cached = keys.has_value() && keys->defined();
  const std::vector<int64_t> first = row_starts(B, start_pos, starts);  // each batch row's first position
  const int64_t end = *std::max_element(first.begin(), first.end()) + T;
  const bool per_row = starts.has_value() && starts->defined();
  const bool mapped = row_ids.has_value() && row_ids->defined();
  TORCH_CHECK(cached || !(per_row || mapped), "per-row starts and rows need a cache");
  std::vector<int64_t> kv_rows;
  if (cached) {
    TORCH_CHECK(keys->dim() == 5 && keys->scalar_type() == at::kFloat && keys->is_contiguous() &&
                    values->is_contiguous() && keys->size(3) >= end,
                "keys/values must be contiguous float32 [L, Bc, Hkv, capacity, D] with room for the pass");
    kv_rows = cache_rows(B, keys->size(1), row_ids);
  }
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const int64_t period = cos_c.numel() / head_dim;  // T (shared by the batch rows) or B * T (per row)
  TORCH_CHECK(period == T || period == B * T, "cos/sin must be [T, D] or [B, T, D]");
  at::Tensor x = hidden.reshape({B * T, width}).contiguous().clone();
  for (int64_t l = start_layer; l < end_layer; ++l) {
    const LayerWeights& layer = layers[l];
    at::Tensor qkv = apply(layer.qkv, rms_norm(x, layer.input_norm, eps));  // [B*T, q + 2 kv]
    float* rows = qkv.data_ptr<float>();
    rope(rows, qkv_width, B * T, period, num_heads, head_dim, cos_c.data_ptr<float>(), sin_c.data_ptr<float>());
    rope(rows + q_size, qkv_width, B * T, period, num_kv_heads, head_dim, cos_c.data_ptr<float>(),
         sin_c.data_ptr<float>());
    // q as [B, H, T, D], this pass's k/v as [B, Hkv, T, D]: strided views of the qkv rows.
    const at::Tensor q = qkv.as_strided({B, num_heads, T, head_dim}, {T * qkv_width, head_dim, qkv_width, 1});
    at::Tensor k = qkv.as_strided({B, num_kv_heads, T, head_dim}, {T * qkv_width, head_dim, qkv_width, 1}, q_size);
    at::Tensor v = qkv.as_strided({B, num_kv_heads, T, head_dim}, {T * qkv_width, head_dim, qkv_width, 1},
                                  q_size + kv_size);
    at::Tensor query_starts;  // without a cache, the pass's own keys: query t sees keys [0, t]
    if (cached) {
      at::Tensor layer_keys = keys->select(0, l), layer_values = values->select(0, l);
      for (int64_t b = 0; b < B; ++b) {
        layer_keys.select(0, kv_rows[b]).narrow(1, first[b], T).copy_(k.select(0, b));
        layer_values.select(0, kv_rows[b]).narrow(1, first[b], T).copy_(v.select(0, b));
      }
      k = layer_keys.narrow(2, 0, end);
      v = layer_values.narrow(2, 0, end);
      query_starts = at::tensor(first, at::kLong);
    }
    const at::Tensor attended = attention(q, k, v, 0, cached ? attendable : c10::nullopt,
                                          cached ? c10::optional<at::Tensor>(query_starts) : c10::nullopt,
                                          cached ? row_ids : c10::nullopt);
    at::Tensor projected = apply(layer.o, attended.permute({0, 2, 1, 3}).reshape({B * T, q_size}));
    all_reduce(reduce, projected);
    x.add_(projected);
    at::Tensor gate_up = apply(layer.gate_up, rms_norm(x, layer.post_norm, eps));  // [B*T, 2 I]
    at::Tensor down = apply(layer.down, silu_gate(gate_up));
    all_reduce(reduce, down);
    x.add_(down);
  }
  return x.view({B, T, width});
}

void bind_layers(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<PreparedWeight>(m, "PreparedWeight")
      .def(py::init([](int format, at::Tensor data, int64_t out_features, c10::optional<at::Tensor> bias) {
             return PreparedWeight{format, std::move(data), out_features, std::move(bias)};
           }),
           py::arg("format"), py::arg("data"), py::arg("out_features"), py::arg("bias") = py::none());
  py::class_<LayerWeights>(m, "LayerWeights")
      .def(py::init([](PreparedWeight qkv, PreparedWeight o, PreparedWeight gate_up, PreparedWeight down,
                       at::Tensor input_norm, at::Tensor post_norm) {
             return LayerWeights{qkv, o, gate_up, down, input_norm.contiguous(), post_norm.contiguous()};
           }),
           py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("input_norm"),
           py::arg("post_norm"));
  py::class_<LayerStack>(m, "LayerStack").def(py::init([](std::vector<LayerWeights> layers) {
    return LayerStack{std::move(layers)};
  }));
  m.def("forward_layers", &forward_layers, "decoder layers [start, end) in one call (model/transformer.py's graph)",
        py::arg("hidden"), py::arg("stack"), py::arg("start_layer"), py::arg("end_layer"), py::arg("start_pos"),
        py::arg("keys"), py::arg("values"), py::arg("attendable"), py::arg("cos"), py::arg("sin"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"),
        py::arg("starts") = py::none(), py::arg("rows") = py::none(), py::arg("reduce") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.attr("FORMATS") = py::dict(py::arg("float32") = int(kFloat32), py::arg("bfloat16") = int(kBFloat16),
                               py::arg("q8_0") = int(Q8_0), py::arg("q4_0") = int(Q4_0), py::arg("q4_1") = int(Q4_1));
}

}  // namespace fewrow
