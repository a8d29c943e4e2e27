// DVT's relationship resize on CPU, in one pass over memory (see `kernel.py`).
//
// Input: attention-shaped maps (B, H, n, n), n = 1 + g², the last two axes contiguous (any batch
// strides: a per-layer slice of the (B, H·L, n, n) relations). Output: (B, H, N, N), N = 1 + s².
// The patch part of each axis is a g×g grid resized to s×s by the 1-D resize of Figure 5 (nearest
// ×2, then adaptive average pooling), which takes every output from at most two inputs:
// out[i] = w[i][0]·in[taps[i][0]] + w[i][1]·in[taps[i][1]] (`taps` and `weights`, (s, 2)). The
// cls row and column are only resized along the other axis; the cls/cls entry passes.
//
// Per map: first every input row is resized along the keys (2-D, into a small buffer that stays
// in cache), then every output row is the weighted sum of (at most) four of those rows along the
// queries. Arithmetic in float for float, bfloat16 and half storage, in double for double.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

template <typename scalar_t>
void resize_maps(const scalar_t* in, int64_t batch_stride, int64_t head_stride, int64_t heads,
                 scalar_t* out, int64_t maps, const int64_t* taps, const float* weights, int64_t g,
                 int64_t s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = 1 + g * g, N = 1 + s * s;
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> keyed(n * N), columns(g * s);
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* map = in + (m / heads) * batch_stride + (m % heads) * head_stride;
      scalar_t* dst_map = out + m * N * N;
      // keys: every input row (the cls query's too) to N columns: grid columns, then grid rows
      for (int64_t q = 0; q < n; ++q) {
        const scalar_t* row = map + q * n;
        acc_t* keyed_row = keyed.data() + q * N;
        keyed_row[0] = static_cast<acc_t>(row[0]);
        const scalar_t* patches = row + 1;
        for (int64_t r = 0; r < g; ++r)
          for (int64_t j = 0; j < s; ++j)
            columns[r * s + j] = weights[2 * j] * static_cast<acc_t>(patches[r * g + taps[2 * j]]) +
                                 weights[2 * j + 1] * static_cast<acc_t>(patches[r * g + taps[2 * j + 1]]);
        for (int64_t i = 0; i < s; ++i) {
          const acc_t w0 = weights[2 * i], w1 = weights[2 * i + 1];
          const acc_t* c0 = columns.data() + taps[2 * i] * s;
          const acc_t* c1 = columns.data() + taps[2 * i + 1] * s;
          acc_t* dst = keyed_row + 1 + i * s;
          for (int64_t j = 0; j < s; ++j) dst[j] = w0 * c0[j] + w1 * c1[j];
        }
      }
      // queries: the cls row as it is, each patch row from the keyed rows of its four taps
      for (int64_t k = 0; k < N; ++k) dst_map[k] = static_cast<scalar_t>(keyed[k]);
      for (int64_t i = 0; i < s; ++i) {
        for (int64_t j = 0; j < s; ++j) {
          const acc_t* r00 = keyed.data() + (1 + taps[2 * i] * g + taps[2 * j]) * N;
          const acc_t* r01 = keyed.data() + (1 + taps[2 * i] * g + taps[2 * j + 1]) * N;
          const acc_t* r10 = keyed.data() + (1 + taps[2 * i + 1] * g + taps[2 * j]) * N;
          const acc_t* r11 = keyed.data() + (1 + taps[2 * i + 1] * g + taps[2 * j + 1]) * N;
          const acc_t w00 = acc_t(weights[2 * i]) * weights[2 * j], w01 = acc_t(weights[2 * i]) * weights[2 * j + 1];
          const acc_t w10 = acc_t(weights[2 * i + 1]) * weights[2 * j], w11 = acc_t(weights[2 * i + 1]) * weights[2 * j + 1];
          scalar_t* dst = dst_map + (1 + i * s + j) * N;
          for (int64_t k = 0; k < N; ++k)
            dst[k] = static_cast<scalar_t>(w00 * r00[k] + w01 * r01[k] + w10 * r10[k] + w11 * r11[k]);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor resize_relation(const torch::Tensor& relation, const torch::Tensor& taps,
                              const torch::Tensor& weights, int64_t grid, int64_t size) {
  TORCH_CHECK(relation.device().is_cpu() && relation.dim() == 4, "resize_relation: (B, H, n, n) CPU maps");
  const int64_t n = 1 + grid * grid, N = 1 + size * size;
  TORCH_CHECK(relation.size(2) == n && relation.size(3) == n, "resize_relation: maps are not 1 + ", grid, "²");
  TORCH_CHECK(relation.stride(3) == 1 && relation.stride(2) == n, "resize_relation: maps must be contiguous");
  TORCH_CHECK(taps.scalar_type() == torch::kLong && taps.is_contiguous() && taps.numel() == 2 * size,
              "resize_relation: taps must be contiguous int64 (size, 2)");
  TORCH_CHECK(weights.scalar_type() == torch::kFloat && weights.is_contiguous() && weights.numel() == 2 * size,
              "resize_relation: weights must be contiguous float32 (size, 2)");
  const int64_t batch = relation.size(0), heads = relation.size(1);
  auto out = torch::empty({batch, heads, N, N}, relation.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, relation.scalar_type(), "resize_relation", [&] {
    resize_maps<scalar_t>(relation.data_ptr<scalar_t>(), relation.stride(0), relation.stride(1), heads,
                          out.data_ptr<scalar_t>(), batch * heads, taps.data_ptr<int64_t>(),
                          weights.data_ptr<float>(), grid, size);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("resize_relation", &resize_relation, "DVT relationship resize (CPU)");
}
