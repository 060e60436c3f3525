// C++ CPU kernels for decoding (one token per row, no autograd, float32/float64): the TTT-Linear inner step
// (ttt_linear_decode) and whole blocks (ttt_linear_decode_blocks, one block after the other, with their projections,
// RMSNorms and causal convs).
// The inner step first:
// Returns [out, G_W, G_b] when no row ends its mini-batch (W0, b0 unchanged), else [out, G_W, G_b, W0, b0].
//
// The same numbers as `_ttt_one_token("linear", ...)` in modeling_ttt/ops/torch_chunk.py (the spec is naive.py),
// written as plain loops over each (row, head) so that a token costs one call instead of ~35 PyTorch kernels:
// when decoding a small model on a CPU the per-kernel overhead, not the arithmetic, is what the step pays for.
// tests/test_ops_cpu.py holds this file to the reference.
//
// Per (row, head), with the token at position p of its mini-batch and s = token_scale[p] (Eq. 6/7 of the paper):
//   z = x_k W0 + b0;  grad_z = LayerNorm-l2 gradient at z (target x_v - x_k);  G_W += x_k^T (lr grad_z);
//   G_b += lr grad_z;  z_q = x_q W0 + b0 - s (x_q G_W + G_b)   (= x_q W_t + b_t with W_t = W0 - s G_W);
//   out = x_q + LN(z_q) * ln_w + ln_b;  at the end of the mini-batch (p = M-1), W0 <- W_t, b0 <- b_t, G <- 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lanes.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

// Mean and 1/std of a row, with double accumulators.
template <typename T>
void mean_rstd(const T* z, int64_t d, double eps, double& mean, double& rstd) {
  double sum = 0.0;
  for (int64_t j = 0; j < d; ++j) sum += z[j];
  mean = sum / d;
  double var = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double c = z[j] - mean;
    var += c * c;
  }
  rstd = 1.0 / std::sqrt(var / d + eps);
}

// y = x W + b for one row: x [d], W [d, d] (in x out, row-major), b [d].
template <typename T>
void row_times_matrix(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, int64_t d,
                      T* __restrict__ y) {
  for (int64_t j = 0; j < d; ++j) y[j] = b[j];
  for (int64_t k = 0; k < d; ++k) {
    const T a = x[k];
    const T* __restrict__ w_k = w + k * d;
    for (int64_t j = 0; j < d; ++j) y[j] += a * w_k[j];
  }
}

// y1 = x1 W + b and y2 = x2 W + b in one pass over W.
template <typename T>
void two_rows_times_matrix(const T* __restrict__ x1, const T* __restrict__ x2, const T* __restrict__ w,
                           const T* __restrict__ b, int64_t d, T* __restrict__ y1, T* __restrict__ y2) {
  for (int64_t j = 0; j < d; ++j) y1[j] = y2[j] = b[j];
  for (int64_t k = 0; k < d; ++k) {
    const T a1 = x1[k], a2 = x2[k];
    const T* __restrict__ w_k = w + k * d;
    for (int64_t j = 0; j < d; ++j) {
      y1[j] += a1 * w_k[j];
      y2[j] += a2 * w_k[j];
    }
  }
}

// out = base + x^T g (a rank-1 update of a [d, d] matrix) and, in the same pass, y = x_q out.
template <typename T>
void add_outer_then_project(const T* __restrict__ base, const T* __restrict__ x, const T* __restrict__ g,
                            const T* __restrict__ x_q, int64_t d, T* __restrict__ out, T* __restrict__ y) {
  for (int64_t j = 0; j < d; ++j) y[j] = T(0);
  for (int64_t k = 0; k < d; ++k) {
    const T a = x[k], c = x_q[k];
    for (int64_t j = 0; j < d; ++j) {
      const T v = base[k * d + j] + a * g[j];
      out[k * d + j] = v;
      y[j] += c * v;
    }
  }
}

// out = w - s g, elementwise over n values.
template <typename T>
void step(const T* __restrict__ w, const T* __restrict__ g, T s, int64_t n, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] - s * g[i];
}

// Where the state of (batch row, head) starts in a [B, H, n, d] tensor whose [n, d] blocks are contiguous.
struct HeadStrides {
  int64_t row, head;
  int64_t offset(int64_t r, int64_t heads) const { return (r / heads) * row + (r % heads) * head; }
};

template <typename T>
void decode_rows(int64_t rows, int64_t heads, int64_t d, int64_t mini_batch_size, double eps, const T* xq,
                 const T* xk, const T* xv, const T* lr, const T* token_scale, const T* ln_w, const T* ln_b,
                 const T* w, const T* b, const T* g_w, const T* g_b, const HeadStrides* strides,
                 const int64_t* seen, T* out, T* new_w, T* new_b, T* new_g_w, T* new_g_b, bool write_weights) {
  // A head reads W0 and G_W and writes G_W (3 d^2 values, from memory when decoding a large model, whose weights
  // have evicted the state from the caches): with d = 64 that is worth a second thread from 4 heads on.
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / (d * d)), [&](int64_t begin, int64_t end) {
    std::vector<T> z(d), grad(d), zq(d), zq_g(d);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = r / heads, head = r % heads;
      const int64_t position = seen[row] % mini_batch_size;
      const T s = token_scale[position];
      const bool completes = position == mini_batch_size - 1;
      const T *x_q = xq + r * d, *x_k = xk + r * d, *x_v = xv + r * d;
      const T *lw = ln_w + head * d, *lb = ln_b + head * d;
      const T *w_r = w + strides[0].offset(r, heads), *b_r = b + strides[1].offset(r, heads),
              *gw_r = g_w + strides[2].offset(r, heads), *gb_r = g_b + strides[3].offset(r, heads);
      T *gw_new = new_g_w + r * d * d, *gb_new = new_g_b + r * d;

      // Gradient of 0.5 ||LN(z) w + b - (x_v - x_k)||^2 at z = x_k W0 + b0, through the LayerNorm (x_q W0 + b0,
      // needed below, comes from the same pass over W0).
      two_rows_times_matrix(x_k, x_q, w_r, b_r, d, z.data(), zq.data());
      double mean, rstd;
      mean_rstd(z.data(), d, eps, mean, rstd);
      double sum_g = 0.0, sum_gz = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const T z_hat = static_cast<T>((z[j] - mean) * rstd);
        z[j] = z_hat;
        grad[j] = lw[j] * lb[j] + lw[j] * (x_k[j] - x_v[j]) + lw[j] * lw[j] * z_hat;  // d loss / d z_hat
        sum_g += grad[j];
        sum_gz += grad[j] * z_hat;
      }
      const T lr_r = lr[r];
      for (int64_t j = 0; j < d; ++j) {
        const T grad_z = static_cast<T>(rstd * (grad[j] - sum_g / d - z[j] * (sum_gz / d)));
        grad[j] = lr_r * grad_z;  // lr * grad_z
      }

      // Pending sums G (zero at a mini-batch start, by the state's invariant), and x_q G_W.
      add_outer_then_project(gw_r, x_k, grad.data(), x_q, d, gw_new, zq_g.data());
      for (int64_t j = 0; j < d; ++j) gb_new[j] = gb_r[j] + grad[j];

      if (completes) {  // W_t = W0 - s G becomes the next W0
        T *w_new = new_w + r * d * d, *b_new = new_b + r * d;
        step(w_r, gw_new, s, d * d, w_new);
        step(b_r, gb_new, s, d, b_new);
        row_times_matrix(x_q, w_new, b_new, d, zq.data());
        std::fill(gw_new, gw_new + d * d, T(0));
        std::fill(gb_new, gb_new + d, T(0));
      } else {
        if (write_weights) {  // another row of the batch completes: this row keeps W0
          std::copy(w_r, w_r + d * d, new_w + r * d * d);
          std::copy(b_r, b_r + d, new_b + r * d);
        }
        for (int64_t j = 0; j < d; ++j) zq[j] -= s * (zq_g[j] + gb_new[j]);  // x_q W0 + b0 - s (x_q G_W + G_b)
      }

      // Output rule (Sec. 2.7): x_q + LN(f(x_q)).
      mean_rstd(zq.data(), d, eps, mean, rstd);
      T* o = out + r * d;
      for (int64_t j = 0; j < d; ++j) o[j] = x_q[j] + static_cast<T>((zq[j] - mean) * rstd) * lw[j] + lb[j];
    }
  });
}

// Raise a ValueError naming the op when `ok` is false; the message parts are formatted only then (checks run on
// every token).
template <typename... Parts>
inline void check(bool ok, const Parts&... message) {
  TORCH_CHECK_VALUE(ok, "modeling_ttt_cpu.", message...);
}

inline void check_decode(bool ok, const char* message) { check(ok, "ttt_linear_decode: ", message); }

std::vector<at::Tensor> ttt_linear_decode(const at::Tensor& xq, const at::Tensor& xk, const at::Tensor& xv,
                                          const at::Tensor& inner_lr, const at::Tensor& token_scale,
                                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& w,
                                          const at::Tensor& b, const at::Tensor& g_w, const at::Tensor& g_b,
                                          const at::Tensor& seen, double eps) {
  check_decode(xq.dim() == 4 && xq.size(2) == 1, "xq must be [B, H, 1, d] (one token per row)");
  const int64_t batch = xq.size(0), heads = xq.size(1), d = xq.size(3), rows = batch * heads;
  const int64_t mini_batch_size = token_scale.numel();
  check_decode(xk.sizes() == xq.sizes() && xv.sizes() == xq.sizes(), "xq, xk, xv must share a shape");
  check_decode(inner_lr.numel() == rows, "inner_lr must be [B, H, 1]");
  check_decode(ln_weight.numel() == heads * d && ln_bias.numel() == heads * d, "ln_weight/ln_bias must be [H, d]");
  const std::vector<int64_t> matrix_shape = {batch, heads, d, d}, bias_shape = {batch, heads, 1, d};
  check_decode(w.sizes() == matrix_shape && g_w.sizes() == matrix_shape, "W and G_W must be [B, H, d, d]");
  check_decode(b.sizes() == bias_shape && g_b.sizes() == bias_shape, "b and G_b must be [B, H, 1, d]");
  check_decode(seen.numel() == batch && seen.scalar_type() == at::kLong, "seen must be int64 [B]");
  check_decode(mini_batch_size > 0, "token_scale must not be empty");
  const auto dtype = xq.scalar_type();
  for (const at::Tensor* t : {&xk, &xv, &inner_lr, &token_scale, &ln_weight, &ln_bias, &w, &b, &g_w, &g_b}) {
    check_decode(t->scalar_type() == dtype, "all floating inputs must share one dtype");
    check_decode(t->device().is_cpu(), "all inputs must be on the CPU");
  }

  std::vector<at::Tensor> in;
  for (const at::Tensor* t : {&xq, &xk, &xv, &inner_lr, &token_scale, &ln_weight, &ln_bias})
    in.push_back(t->contiguous());
  // The state is read in place when each head's block is contiguous: after a prefill, W/b and G_W/G_b are views
  // into one [B, H, d+1, d] buffer of the dual form, which a copy per token would cost more than the step itself.
  HeadStrides strides[4];
  for (const at::Tensor* t : {&w, &b, &g_w, &g_b}) {
    const bool blocks_contiguous = t->stride(3) == 1 && (t->size(2) == 1 || t->stride(2) == d);
    in.push_back(blocks_contiguous ? *t : t->contiguous());
    strides[in.size() - 8] = {in.back().stride(0), in.back().stride(1)};
  }
  in.push_back(seen.contiguous());
  auto seen_data = in[11].data_ptr<int64_t>();
  bool any_completes = false;
  for (int64_t i = 0; i < batch; ++i) {
    check_decode(seen_data[i] >= 0, "seen must not be negative");
    any_completes = any_completes || (seen_data[i] % mini_batch_size == mini_batch_size - 1);
  }

  at::Tensor out = at::empty(xq.sizes(), xq.options());
  at::Tensor new_g_w = at::empty(g_w.sizes(), g_w.options()), new_g_b = at::empty(g_b.sizes(), g_b.options());
  // Weights change only where a mini-batch ends; otherwise the caller keeps the old W0 (nothing writes it) and
  // only out, G_W, G_b are returned.
  at::Tensor new_w, new_b;
  if (any_completes) {
    new_w = at::empty(w.sizes(), w.options());
    new_b = at::empty(b.sizes(), b.options());
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "ttt_linear_decode", [&] {
    decode_rows<scalar_t>(rows, heads, d, mini_batch_size, eps, in[0].data_ptr<scalar_t>(),
                          in[1].data_ptr<scalar_t>(), in[2].data_ptr<scalar_t>(), in[3].data_ptr<scalar_t>(),
                          in[4].data_ptr<scalar_t>(), in[5].data_ptr<scalar_t>(), in[6].data_ptr<scalar_t>(),
                          in[7].data_ptr<scalar_t>(), in[8].data_ptr<scalar_t>(), in[9].data_ptr<scalar_t>(),
                          in[10].data_ptr<scalar_t>(), strides, seen_data, out.data_ptr<scalar_t>(),
                          any_completes ? new_w.data_ptr<scalar_t>() : nullptr,
                          any_completes ? new_b.data_ptr<scalar_t>() : nullptr, new_g_w.data_ptr<scalar_t>(),
                          new_g_b.data_ptr<scalar_t>(), any_completes);
  });
  if (!any_completes) return {out, new_g_w, new_g_b};
  return {out, new_g_w, new_g_b, new_w, new_b};
}

// RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * weight (what F.rms_norm computes), rows in parallel.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t d = x.size(-1);
  check(weight.numel() == d && weight.scalar_type() == x.scalar_type(), "rms_norm: weight must be [d] of x's dtype");
  const at::Tensor in = x.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = d == 0 ? 0 : in.numel() / d;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm", [&] {
    const scalar_t *src = in.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x_r = src + r * d;
        double sum = 0.0;
        for (int64_t j = 0; j < d; ++j) sum += static_cast<double>(x_r[j]) * x_r[j];
        const scalar_t inv = static_cast<scalar_t>(1.0 / std::sqrt(sum / d + eps));
        for (int64_t j = 0; j < d; ++j) dst[r * d + j] = x_r[j] * inv * wp[j];
      }
    });
  });
  return out;
}

// Depthwise conv kernels as [C, K] blocks: rows of a stacked [n, C, K] tensor, or Conv1d weights [C, 1, K] as stored.
struct ConvKernels {
  std::vector<at::Tensor> weights, biases;  // n of each: [C, K]-shaped contiguous weights, [C] biases
};

// One causal depthwise-conv step of n kernels over the same input (see causal_depthwise_conv in layers.py), per row:
// y_i = bias_i + sum_t window[t] * kernel_i[t], the window being the state's K-1 rows, then x. Output i of row r is
// at ys[i] + r * y_stride; the new state is the window's last K-1 rows.
template <typename T>
void conv_rows(int64_t batch, int64_t channels, int64_t width, const T* x, const T* state,
               const std::vector<const T*>& kernels, const std::vector<const T*>& biases, const std::vector<T*>& ys,
               int64_t y_stride, T* new_state) {
  for (int64_t i = 0; i < batch; ++i) {
    const T* s_i = state + i * (width - 1) * channels;
    const T* x_i = x + i * channels;
    for (size_t n = 0; n < kernels.size(); ++n) {  // tap by tap over all channels (vectorizes over channels)
      T* __restrict__ y_i = ys[n] + i * y_stride;
      const T* __restrict__ k = kernels[n];
      std::copy(biases[n], biases[n] + channels, y_i);
      for (int64_t t = 0; t < width - 1; ++t)
        for (int64_t c = 0; c < channels; ++c) y_i[c] += s_i[t * channels + c] * k[c * width + t];
      for (int64_t c = 0; c < channels; ++c) y_i[c] += x_i[c] * k[c * width + width - 1];
    }
    T* n_i = new_state + i * (width - 1) * channels;
    if (width > 2) std::copy(s_i + channels, s_i + (width - 1) * channels, n_i);
    if (width > 1) std::copy(x_i, x_i + channels, n_i + (width - 2) * channels);
  }
}

// conv_rows on tensors: x [B, 1, C], state [B, K-1, C] (absent: zeros, a fresh sequence) into `ys` (n outputs, rows
// `y_stride` apart, of x's dtype). Returns the new state.
at::Tensor conv_into(const at::Tensor& x, const c10::optional<at::Tensor>& state, const ConvKernels& convs,
                     const std::vector<at::Tensor>& ys, int64_t y_stride, const char* name) {
  const int64_t batch = x.size(0), channels = x.size(2);
  check(!convs.weights.empty() && convs.weights.size() == convs.biases.size(), name, ": no conv kernels");
  const int64_t width = convs.weights[0].size(-1);
  for (size_t n = 0; n < convs.weights.size(); ++n) {
    const at::Tensor &w = convs.weights[n], &b = convs.biases[n];
    check(w.numel() == channels * width && w.size(0) == channels && w.size(-1) == width && b.numel() == channels,
          name, ": conv kernels must be [C, K] (or [C, 1, K]) and biases [C]");
    check(w.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(),
          name, ": conv kernels must have the input's dtype");
  }
  at::Tensor st = state.has_value() ? state->contiguous() : at::zeros({batch, width - 1, channels}, x.options());
  check(st.dim() == 3 && st.size(0) == batch && st.size(1) == width - 1 && st.size(2) == channels,
        name, ": conv state must be [B, K-1, C]");
  check(st.scalar_type() == x.scalar_type(), name, ": conv state must have the input's dtype");
  const at::Tensor xs = x.contiguous();
  std::vector<at::Tensor> weights, biases;
  for (size_t n = 0; n < convs.weights.size(); ++n) {
    weights.push_back(convs.weights[n].contiguous());
    biases.push_back(convs.biases[n].contiguous());
  }
  at::Tensor new_state = at::empty({batch, width - 1, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_step", [&] {
    std::vector<const scalar_t*> kernel_ptrs, bias_ptrs;
    std::vector<scalar_t*> y_ptrs;
    for (size_t n = 0; n < weights.size(); ++n) {
      kernel_ptrs.push_back(weights[n].data_ptr<scalar_t>());
      bias_ptrs.push_back(biases[n].data_ptr<scalar_t>());
      y_ptrs.push_back(ys[n].data_ptr<scalar_t>());
    }
    conv_rows<scalar_t>(batch, channels, width, xs.data_ptr<scalar_t>(), st.data_ptr<scalar_t>(), kernel_ptrs,
                        bias_ptrs, y_ptrs, y_stride, new_state.data_ptr<scalar_t>());
  });
  return new_state;
}

// The whole decoding step of a TTT-Linear layer between its projections (see TTTLayerBase.forward in layers.py):
// [Q/K causal convs (Mamba backbone)] -> RoPE at each row's position in its mini-batch -> inner learning rates and
// token scales -> the TTT-Linear step above -> post LayerNorm -> [gelu gate]. One token per row.
//   q, k: [B, 1, C] projections (k empty when `convs`, conv_q and conv_k, derive Q and K from q; conv_state
//   [B, K-1, C], absent for a fresh sequence);
//   v, g: [B, 1, C] (g empty without gate); lr_logits: [B, 1, H]; rope: [M, d/2, 2] (cos, sin);
//   token_idx, learnable_token_idx: [M]; ln_weight/ln_bias: [H, d]; post_weight/post_bias: [C].
// Empty tensors stand for absent ones. Returns [out (before o_proj) [B, 1, C], new conv state (empty without
// convs), G_W, G_b] and, when some row ends its mini-batch, [W0, b0].
std::vector<at::Tensor> layer_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& lr_logits,
    const c10::optional<at::Tensor>& conv_state, const ConvKernels& convs, const at::Tensor& rope,
    const at::Tensor& token_idx, const at::Tensor& learnable_token_idx, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& post_weight, const at::Tensor& post_bias, const at::Tensor& w,
    const at::Tensor& b, const at::Tensor& g_w, const at::Tensor& g_b, const at::Tensor& seen, double lr_scale,
    double eps, double post_eps) {
  auto fail = [](bool ok, const char* message) { check(ok, "ttt_linear_decode_layer: ", message); };
  fail(q.dim() == 3 && q.size(1) == 1, "q must be [B, 1, C] (one token per row)");
  fail(ln_weight.dim() == 2, "ln_weight must be [H, d]");
  const int64_t batch = q.size(0), channels = q.size(2), heads = ln_weight.size(0), d = ln_weight.size(1);
  const int64_t mini_batch_size = token_idx.numel();
  const bool has_conv = !convs.weights.empty(), has_gate = g.numel() > 0;  // empty tensors: absent
  fail(heads * d == channels && d % 2 == 0, "ln_weight must be [H, d] with H * d = C and d even");
  fail(v.sizes() == q.sizes() && (!has_gate || g.sizes() == q.sizes()), "v (and g) must be [B, 1, C] like q");
  fail(has_conv || k.sizes() == q.sizes(), "k must be [B, 1, C] without conv kernels");
  fail(lr_logits.numel() == batch * heads, "lr_logits must be [B, 1, H]");
  fail(rope.dim() == 3 && rope.size(0) == mini_batch_size && rope.size(1) == d / 2 && rope.size(2) == 2,
       "rope must be [M, d/2, 2]");
  fail(learnable_token_idx.numel() == mini_batch_size && mini_batch_size > 0, "token_idx must be [M], M > 0");
  fail(post_weight.numel() == channels && post_bias.numel() == channels, "post_weight/post_bias must be [C]");
  fail(seen.numel() == batch && seen.scalar_type() == at::kLong, "seen must be int64 [B]");
  const auto dtype = q.scalar_type();
  for (const at::Tensor* t : {&v, &lr_logits, &rope, &token_idx, &learnable_token_idx, &ln_weight, &ln_bias,
                              &post_weight, &post_bias, &w, &b, &g_w, &g_b})
    fail(t->scalar_type() == dtype && t->device().is_cpu(), "all floating inputs must share one dtype, on the CPU");

  // Q and K [B, C] (after the convs), then RoPE in place on these fresh buffers.
  at::Tensor xq, xk, new_conv_state;
  if (has_conv) {
    fail(convs.weights.size() == 2, "two conv kernels (conv_q, conv_k)");
    xq = at::empty({batch, channels}, q.options());
    xk = at::empty({batch, channels}, q.options());
    new_conv_state = conv_into(q, conv_state, convs, {xq, xk}, channels, "ttt_linear_decode_layer");
  } else {
    xq = q.contiguous().clone();
    xk = k.contiguous().clone();
    new_conv_state = at::empty({0}, q.options());
  }
  const at::Tensor seen_c = seen.contiguous();
  const int64_t* seen_data = seen_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i) fail(seen_data[i] >= 0, "seen must not be negative");
  at::Tensor lr = at::empty({batch, heads, 1}, q.options()), scale = at::empty({mini_batch_size}, q.options());
  const at::Tensor logits_c = lr_logits.contiguous(), rope_c = rope.contiguous(), idx_c = token_idx.contiguous(),
                   learnable_c = learnable_token_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "ttt_linear_decode_layer", [&] {
    using T = scalar_t;
    T *pq = xq.data_ptr<T>(), *pk = xk.data_ptr<T>();
    const T *rot = rope_c.data_ptr<T>(), *logits = logits_c.data_ptr<T>();
    for (int64_t i = 0; i < batch; ++i) {  // RoPE on adjacent pairs (2j, 2j+1) of each head
      const T* r = rot + (seen_data[i] % mini_batch_size) * d;
      for (T* x : {pq + i * channels, pk + i * channels})
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t j = 0; j < d / 2; ++j) {
            T* pair = x + h * d + 2 * j;
            const T c = r[2 * j], s = r[2 * j + 1], even = pair[0], odd = pair[1];
            pair[0] = even * c - odd * s;
            pair[1] = odd * c + even * s;
          }
    }
    T* plr = lr.data_ptr<T>();
    for (int64_t r = 0; r < batch * heads; ++r)  // eta_base / d * sigmoid(theta_lr x + b)
      plr[r] = static_cast<T>(lr_scale / (1.0 + std::exp(-static_cast<double>(logits[r]))));
    T* ps = scale.data_ptr<T>();
    const T *ti = idx_c.data_ptr<T>(), *lti = learnable_c.data_ptr<T>();
    for (int64_t m = 0; m < mini_batch_size; ++m) ps[m] = std::max(ti[m] + lti[m], T(0));  // clamp_min(., 0)
  });

  // The inner step (its own checks, allocations and the weights returned only where a mini-batch ends).
  const std::vector<int64_t> per_head = {batch, heads, 1, d};
  std::vector<at::Tensor> result = ttt_linear_decode(xq.view(per_head), xk.view(per_head),
                                                     v.contiguous().view(per_head), lr, scale, ln_weight, ln_bias, w,
                                                     b, g_w, g_b, seen, eps);

  // post_norm (LayerNorm over C), then the gate gelu_tanh(g) * (torch's vectorized GELU, what the module calls:
  // scalar std::tanh per channel cost more than the norm); result[0] becomes the layer's output.
  at::Tensor out = at::empty(q.sizes(), q.options());
  const at::Tensor inner_out = result[0], pw_c = post_weight.contiguous(), pb_c = post_bias.contiguous(),
                   g_c = has_gate ? at::gelu(g.contiguous(), "tanh") : g;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ttt_linear_decode_layer_post", [&] {
    using T = scalar_t;
    const T *io = inner_out.data_ptr<T>(), *pw = pw_c.data_ptr<T>(), *pb = pb_c.data_ptr<T>();
    const T* pg = has_gate ? g_c.data_ptr<T>() : nullptr;
    T* po = out.data_ptr<T>();
    for (int64_t i = 0; i < batch; ++i) {
      double mean, rstd;
      mean_rstd(io + i * channels, channels, post_eps, mean, rstd);
      for (int64_t c = 0; c < channels; ++c) {
        const T y = static_cast<T>((io[i * channels + c] - mean) * rstd) * pw[c] + pb[c];
        po[i * channels + c] = has_gate ? pg[i * channels + c] * y : y;
      }
    }
  });
  result[0] = out;
  result.insert(result.begin() + 1, new_conv_state);
  return result;
}

// -- The block's projections -------------------------------------------------------------------------------------
// Decoding reads every weight matrix from memory once per token: for a few rows a projection is a matrix-vector
// product bound by memory bandwidth. at::linear (MKL) splits each product statically between the threads and
// returns through the dispatcher after each one; a thread that the (shared) machine slows then holds up the other at
// every product's end (measured: ~8% of a 125m decode step). Here the products of a block that read the same input
// run as one parallel loop over chunks of output features that the threads take as they finish (guided schedule:
// large runs of chunks first, single chunks at the end, so few atomic grabs and a short wait for the last one).
// More rows than kMaxGemvRows reuse each weight often enough for a GEMM: those go to at::linear / at::addmm.
constexpr int64_t kMaxGemvRows = 8;
constexpr int64_t kGemvChunkBytes = 32768;  // weights per chunk (the smallest run a thread takes)

using ttt_cpu::Lanes;  // one 64-byte SIMD vector (lanes.h)

// One product: out[b, n] = x[b] . weight[n] (+ bias[n]) (+ residual[b, n]); weight [features, in] row-major, out and
// residual [B, features].
template <typename T>
struct LinearTask {
  const T* weight;
  const T* bias;
  const T* residual;
  T* out;
  int64_t features;
};

// Features [begin, end) of `task` for every row of x [B, in]: four weight rows at a time (read from memory once,
// then from L1 for the other batch rows), dot products in vector lanes, then the lanes and the tail summed.
template <typename T>
void linear_features(const T* __restrict__ x, int64_t batch, int64_t in, const LinearTask<T>& task, int64_t begin,
                     int64_t end) {
  using V = typename Lanes<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t vec_end = in - in % L;
  for (int64_t n = begin; n < end; n += 4) {
    const int64_t m = std::min<int64_t>(4, end - n);
    const T* rows[4];
    for (int64_t i = 0; i < 4; ++i) rows[i] = task.weight + (n + std::min(i, m - 1)) * in;  // (repeats unused)
    for (int64_t b = 0; b < batch; ++b) {
      const T* __restrict__ xb = x + b * in;
      V acc[4] = {};
      for (int64_t k = 0; k < vec_end; k += L) {
        V xv;
        std::memcpy(&xv, xb + k, sizeof(V));
        for (int64_t i = 0; i < 4; ++i) {
          V wv;
          std::memcpy(&wv, rows[i] + k, sizeof(V));
          acc[i] += wv * xv;
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        T sum = 0;
        for (int64_t j = 0; j < L; ++j) sum += acc[i][j];
        for (int64_t k = vec_end; k < in; ++k) sum += rows[i][k] * xb[k];
        if (task.bias) sum += task.bias[n + i];
        if (task.residual) sum += task.residual[b * task.features + n + i];
        task.out[b * task.features + n + i] = sum;
      }
    }
  }
}

template <typename T>
void run_linear_tasks(const T* x, int64_t batch, int64_t in, const std::vector<LinearTask<T>>& tasks) {
  const int64_t features = std::max<int64_t>(4, kGemvChunkBytes / (in * static_cast<int64_t>(sizeof(T))) / 4 * 4);
  std::vector<int64_t> first_chunk = {0};  // chunk c belongs to the task t with first_chunk[t] <= c < first_chunk[t+1]
  for (const LinearTask<T>& task : tasks)
    first_chunk.push_back(first_chunk.back() + (task.features + features - 1) / features);
  const int64_t chunks = first_chunk.back();
  const int threads =
      static_cast<int>(at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), chunks));
#pragma omp parallel for schedule(guided, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    size_t t = 0;
    while (first_chunk[t + 1] <= c) ++t;
    const int64_t begin = (c - first_chunk[t]) * features;
    linear_features(x, batch, in, tasks[t], begin, std::min(begin + features, tasks[t].features));
  }
}

// A projection of the block: weight [out, in] (nn.Linear's), optional bias [out] and residual [B, out] (undefined
// tensors when absent).
struct Linear {
  at::Tensor weight, bias, residual;
};

// x [B, in] -> for each projection, [B, out] = x W^T (+ bias) (+ residual): one parallel loop for all of them when
// there are few rows (see above), else at::linear / at::addmm each.
std::vector<at::Tensor> linear_many(const at::Tensor& x_in, const std::vector<Linear>& linears) {
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), in = x.size(1);
  bool own = batch <= kMaxGemvRows && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
  for (const Linear& l : linears) {
    check(l.weight.dim() == 2 && l.weight.size(1) == in && l.weight.scalar_type() == x.scalar_type(),
          "ttt_linear_decode_block: a projection weight must be [out, ", in, "] of the input's dtype");
    own = own && l.weight.is_contiguous() && (!l.bias.defined() || l.bias.is_contiguous()) &&
          (!l.residual.defined() || l.residual.is_contiguous());
  }
  std::vector<at::Tensor> outputs;
  if (!own) {
    for (const Linear& l : linears) {
      const c10::optional<at::Tensor> bias = l.bias.defined() ? c10::optional<at::Tensor>(l.bias) : c10::nullopt;
      outputs.push_back(l.residual.defined() ? at::addmm(l.residual, x, l.weight.t()) : at::linear(x, l.weight, bias));
    }
    return outputs;
  }
  for (const Linear& l : linears) outputs.push_back(at::empty({batch, l.weight.size(0)}, x.options()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_many", [&] {
    std::vector<LinearTask<scalar_t>> tasks;
    for (size_t i = 0; i < linears.size(); ++i) {
      const Linear& l = linears[i];
      tasks.push_back({l.weight.data_ptr<scalar_t>(), l.bias.defined() ? l.bias.data_ptr<scalar_t>() : nullptr,
                       l.residual.defined() ? l.residual.data_ptr<scalar_t>() : nullptr,
                       outputs[i].data_ptr<scalar_t>(), l.weight.size(0)});
    }
    run_linear_tasks(x.data_ptr<scalar_t>(), batch, in, tasks);
  });
  return outputs;
}

// A whole TTT block (TTTBlock.forward, TTT-Linear, SwiGLU with SiLU) for one token per row, projections included
// (linear_many): [h + conv(rms(h))] -> h + o_proj(layer step) -> h + MLP.
// `params` holds the block's parameters and buffers in the order of BlockParam, as the modules store them (the views
// are taken here, so the caller passes tensors without launching any op); empty tensors stand for absent parts (no
// pre-conv; a k projection instead of Q/K convs; no gate). Absent conv states are zeros (a fresh sequence). Returns
// [h, pre-conv state, Q/K conv state, G_W, G_b] and, when some row ends its mini-batch, [W0, b0].
enum BlockParam {
  kPreNormWeight, kPreConvWeight /* [C, 1, K] */, kPreConvBias, kSeqNormWeight,
  kQ, kK, kV, kG, kO, kLrWeight /* [H, 1, C] */, kLrBias /* [H, 1] */,
  kConvQWeight /* [C, 1, K] */, kConvQBias, kConvKWeight, kConvKBias,
  kRope, kTokenIdx, kLearnableTokenIdx, kTTTNormWeight, kTTTNormBias, kPostNormWeight, kPostNormBias,
  kFfnNormWeight, kGate, kUp, kDown, kNumBlockParams
};

// The names of BlockParam in order: Python (ops/cpu/plan.py, BLOCK_PARAMETERS) checks its layout against them.
std::vector<std::string> block_parameter_names() {
  return {"pre_norm_weight", "pre_conv_weight", "pre_conv_bias", "seq_norm_weight", "q", "k", "v", "g", "o",
          "lr_weight", "lr_bias", "conv_q_weight", "conv_q_bias", "conv_k_weight", "conv_k_bias", "rope",
          "token_idx", "learnable_token_idx", "ttt_norm_weight", "ttt_norm_bias", "post_norm_weight",
          "post_norm_bias", "ffn_norm_weight", "gate", "up", "down"};
}

std::vector<at::Tensor> ttt_linear_decode_block(const at::Tensor& h_in, at::TensorList params,
                                                const c10::optional<at::Tensor>& pre_conv_state,
                                                const c10::optional<at::Tensor>& qk_conv_state,
                                                const at::Tensor& w, const at::Tensor& b, const at::Tensor& g_w,
                                                const at::Tensor& g_b, const at::Tensor& seen, double lr_scale,
                                                double eps, double post_eps, double rms_eps) {
  auto fail = [](bool ok, const char* message) { check(ok, "ttt_linear_decode_block: ", message); };
  fail(h_in.dim() == 3 && h_in.size(1) == 1, "h must be [B, 1, C] (one token per row)");
  check(params.size() == kNumBlockParams, "ttt_linear_decode_block: params must hold ", kNumBlockParams, " tensors");
  const int64_t batch = h_in.size(0), channels = h_in.size(2);
  const at::Tensor empty = at::empty({0}, h_in.options());
  at::Tensor h = h_in.contiguous(), pre_state = empty;
  if (params[kPreConvWeight].numel() > 0) {  // h + conv(rms(h)), the conv written straight into the sum's buffer
    at::Tensor y = at::empty({batch, 1, channels}, h.options());
    pre_state = conv_into(rms_norm(h, params[kPreNormWeight], rms_eps), pre_conv_state,
                          {{params[kPreConvWeight]}, {params[kPreConvBias]}}, {y}, channels, "ttt_linear_decode_block");
    h = y.add_(h);
  }
  ConvKernels qk_convs;
  if (params[kConvQWeight].numel() > 0)
    qk_convs = {{params[kConvQWeight], params[kConvKWeight]}, {params[kConvQBias], params[kConvKBias]}};
  const int64_t heads = params[kLrWeight].size(0);
  // Q, [K], V, [gate], inner-lr logits: one pass over their weights (see linear_many); residual adds inside the
  // o_proj and down_proj products.
  const at::Tensor x = rms_norm(h, params[kSeqNormWeight], rms_eps).view({batch, channels});
  const bool has_k = qk_convs.weights.empty(), has_gate = params[kG].numel() > 0;
  std::vector<Linear> qkvg = {{params[kQ]}, {params[kV]}};
  if (has_k) qkvg.push_back({params[kK]});
  if (has_gate) qkvg.push_back({params[kG]});
  qkvg.push_back({params[kLrWeight].view({heads, channels}), params[kLrBias].view({heads})});
  std::vector<at::Tensor> p = linear_many(x, qkvg);
  auto token = [&](const at::Tensor& t) { return t.view({batch, 1, t.size(1)}); };
  std::vector<at::Tensor> layer = layer_step(
      token(p[0]), has_k ? token(p[2]) : empty, token(p[1]), has_gate ? token(p[2 + has_k]) : empty,
      token(p.back()), qk_conv_state, qk_convs, params[kRope], params[kTokenIdx], params[kLearnableTokenIdx],
      params[kTTTNormWeight], params[kTTTNormBias], params[kPostNormWeight], params[kPostNormBias], w, b, g_w, g_b,
      seen, lr_scale, eps, post_eps);
  h = linear_many(layer[0].view({batch, channels}), {{params[kO], {}, h.view({batch, channels})}})[0];
  std::vector<at::Tensor> gate_up =
      linear_many(rms_norm(h, params[kFfnNormWeight], rms_eps), {{params[kGate]}, {params[kUp]}});
  at::silu_(gate_up[0]).mul_(gate_up[1]);  // SwiGLU: silu(gate) * up, in place
  h = linear_many(gate_up[0], {{params[kDown], {}, h}})[0].view({batch, 1, channels});
  std::vector<at::Tensor> result = {h, pre_state, layer[1], layer[2], layer[3]};
  for (size_t i = 4; i < layer.size(); ++i) result.push_back(layer[i]);
  return result;
}

// The one-token step of a stack of TTT-Linear blocks (TTTModel's decoding step as one call, so that no Python runs
// between blocks): ttt_linear_decode_block for each block in turn. Per block: kNumBlockParams consecutive `params`,
// two `conv_states` (pre-conv, Q/K; absent for a fresh sequence or a backbone without them) and five
// `inner_states` (W, b, G_W, G_b, seen); `constants` are (lr_scale, eps, post_eps, rms_eps), shared by the blocks.
// Returns [h] then, per block, [pre-conv state, Q/K conv state, W0, b0, G_W, G_b, seen + 1] (W0 and b0 are the
// given tensors when no row ended its mini-batch; conv states are empty where the block has none).
std::vector<at::Tensor> ttt_linear_decode_blocks(const at::Tensor& h_in, at::TensorList params,
                                                 const c10::List<c10::optional<at::Tensor>>& conv_states,
                                                 at::TensorList inner_states, at::ArrayRef<double> constants) {
  auto fail = [](bool ok, const char* message) { check(ok, "ttt_linear_decode_blocks: ", message); };
  const int64_t blocks = static_cast<int64_t>(inner_states.size()) / 5;
  fail(static_cast<int64_t>(inner_states.size()) == 5 * blocks && blocks > 0,
       "inner_states must hold (W, b, G_W, G_b, seen) per block");
  check(static_cast<int64_t>(params.size()) == kNumBlockParams * blocks, "ttt_linear_decode_blocks: params must hold ",
        kNumBlockParams, " tensors per block");
  fail(static_cast<int64_t>(conv_states.size()) == 2 * blocks, "conv_states must hold 2 entries per block");
  fail(constants.size() == 4, "constants must be (lr_scale, eps, post_eps, rms_eps)");
  std::vector<at::Tensor> result = {h_in};
  at::Tensor h = h_in;
  for (int64_t i = 0; i < blocks; ++i) {
    const at::Tensor* state = inner_states.data() + 5 * i;
    std::vector<at::Tensor> out = ttt_linear_decode_block(
        h, params.slice(kNumBlockParams * i, kNumBlockParams), conv_states.get(2 * i), conv_states.get(2 * i + 1),
        state[0], state[1], state[2], state[3], state[4], constants[0], constants[1], constants[2], constants[3]);
    h = out[0];
    const bool new_weights = out.size() > 5;
    for (const at::Tensor& t : {out[1], out[2], new_weights ? out[5] : state[0], new_weights ? out[6] : state[1],
                                out[3], out[4]})
      result.push_back(t);
    result.push_back(state[4] + 1);
  }
  result[0] = h;
  return result;
}

}  // namespace

TORCH_LIBRARY(modeling_ttt_cpu, m) {
  m.def("block_parameter_names() -> str[]", &block_parameter_names);
  m.def(
      "ttt_linear_decode_blocks(Tensor h, Tensor[] params, Tensor?[] conv_states, Tensor[] inner_states, "
      "float[] constants) -> Tensor[]",
      &ttt_linear_decode_blocks);
  m.def(
      "ttt_linear_decode(Tensor xq, Tensor xk, Tensor xv, Tensor inner_lr, Tensor token_scale, Tensor ln_weight, "
      "Tensor ln_bias, Tensor W, Tensor b, Tensor G_W, Tensor G_b, Tensor seen, float eps) -> Tensor[]",
      &ttt_linear_decode);
}
