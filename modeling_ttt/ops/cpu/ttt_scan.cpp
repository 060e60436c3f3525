// C++ CPU kernels for training TTT-Linear: the forward and the backward of the mini-batch scan of
// modeling_ttt/ops/linear_scan.py (its module docstring has the equations and the notation used here), float32 and
// float64. Each (row, head) is one independent recurrence over the K mini-batches; a thread takes whole rows, and a
// row's working set (its [W; b], the adjoints, one mini-batch of inputs) stays in the core's caches, where the
// PyTorch version pays ~20 kernels and their temporaries per mini-batch. tests/test_ops_linear_scan.py holds both
// to autograd through the spec.
//
// Shapes (R = B*H rows, M the mini-batch, d the head size, D1 = d + 1 for the [x, 1] inputs of the packed [W; b]):
//   w0, g0 [R, D1, d]; xk1, xq1 [K, R, M, D1]; ln_target [K, R, M, d]; dual [K, R, M, M]; lr [K, R, M];
//   ln_w_sq [R, d]; pending_scale [M]; completes [K, R] (1: the row ends mini-batch k) or empty (all do).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lanes.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using ttt_cpu::Lanes;  // one 64-byte SIMD vector (lanes.h)

// A tile of kRows output rows × kVecs vectors: accumulators in registers, each row of w read once for kRows rows.
template <typename T, int64_t kVecs, int64_t kRows>
inline void tile_times(const T* __restrict__ x, int64_t xs, const T* __restrict__ w, int64_t ws, int64_t n_in,
                       T* __restrict__ y, int64_t ys, bool accumulate) {
  using V = typename Lanes<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V acc[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecs; ++v) {
      if (accumulate) std::memcpy(&acc[r][v], y + r * ys + v * L, sizeof(V));
      else acc[r][v] = V{};
    }
  for (int64_t a = 0; a < n_in; ++a) {
    V wv[kVecs];
    for (int64_t v = 0; v < kVecs; ++v) std::memcpy(&wv[v], w + a * ws + v * L, sizeof(V));
    for (int64_t r = 0; r < kRows; ++r) {
      const T xa = x[r * xs + a];
      for (int64_t v = 0; v < kVecs; ++v) acc[r][v] += xa * wv[v];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < kVecs; ++v) std::memcpy(y + r * ys + v * L, &acc[r][v], sizeof(V));
}

// kVecs vectors of columns for all rows: tiles of as many rows as keep 16 accumulators, then single rows.
template <typename T, int64_t kVecs>
inline void column_block_times(const T* x, int64_t xs, int64_t rows, const T* w, int64_t ws, int64_t n_in, T* y,
                               int64_t ys, bool accumulate) {
  constexpr int64_t kRows = kVecs >= 16 ? 1 : 16 / kVecs;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    tile_times<T, kVecs, kRows>(x + r * xs, xs, w, ws, n_in, y + r * ys, ys, accumulate);
  for (; r < rows; ++r) tile_times<T, kVecs, 1>(x + r * xs, xs, w, ws, n_in, y + r * ys, ys, accumulate);
}

// y (+)= x w: x [rows, n_in] (row stride xs), w [n_in, n_out] (row stride ws), y [rows, n_out] (row stride ys).
// Columns in blocks of 4 vectors, then single vectors, then a scalar tail (the [W; b] rows' 65th column).
template <typename T>
void matmul(const T* x, int64_t xs, int64_t rows, const T* w, int64_t ws, int64_t n_in, int64_t n_out, T* y,
            int64_t ys, bool accumulate) {
  constexpr int64_t L = sizeof(typename Lanes<T>::type) / sizeof(T);
  int64_t c = 0;
  for (; c + 4 * L <= n_out; c += 4 * L) column_block_times<T, 4>(x, xs, rows, w + c, ws, n_in, y + c, ys, accumulate);
  for (; c + L <= n_out; c += L) column_block_times<T, 1>(x, xs, rows, w + c, ws, n_in, y + c, ys, accumulate);
  for (; c < n_out; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      T sum = accumulate ? y[r * ys + c] : T(0);
      for (int64_t a = 0; a < n_in; ++a) sum += x[r * xs + a] * w[a * ws + c];
      y[r * ys + c] = sum;
    }
}

template <typename T>
inline T dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

// out = rstd * (v - mean(v) - z_hat * mean(v * z_hat)): the LayerNorm backward without weight, `P(v)`.
template <typename T>
inline void layer_norm_backward(const T* __restrict__ v, const T* __restrict__ z_hat, T rstd, int64_t d,
                                T* __restrict__ out) {
  T sum = 0, sum_z = 0;
  for (int64_t j = 0; j < d; ++j) {
    sum += v[j];
    sum_z += v[j] * z_hat[j];
  }
  const T mean = sum / d, mean_z = sum_z / d;
  for (int64_t j = 0; j < d; ++j) out[j] = rstd * (v[j] - mean - z_hat[j] * mean_z);
}

// dst [cols, rows] = src [rows, cols]ᵀ
template <typename T>
inline void transpose(const T* __restrict__ src, int64_t rows, int64_t cols, T* __restrict__ dst) {
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + a] = src[a * cols + j];
}

struct Sizes {
  int64_t steps, rows, mini_batch, dim, dim_in;
};

template <typename T, int kDim>
void scan_forward(const Sizes& n, const T* w0, const T* g0, const T* xk1, const T* xq1, const T* ln_target,
                  const T* dual, const T* lr, const T* ln_w_sq, const T* pending_scale, T s_last,
                  const T* completes, bool read_pending, double eps, T* z_bar, T* weights, T* grad_z, T* z_hat,
                  T* rstd, T* pending) {
  // kDim > 0: the head size known at compile time (constant trip counts for the vectorised inner loops)
  const int64_t M = n.mini_batch, d = kDim > 0 ? kDim : n.dim, D1 = d + 1, R = n.rows, wsize = D1 * d;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> g_hat(d), summed(wsize), neg_d(M * M), coef(D1 * M), scaled_q(M * D1);
    for (int64_t r = begin; r < end; ++r) {
      const T* w2 = ln_w_sq + r * d;
      std::memcpy(weights + r * wsize, w0 + r * wsize, sizeof(T) * wsize);
      T* g_pending = nullptr;  // G_k, when tracked
      if (pending != nullptr) {
        g_pending = pending + r * wsize;
        if (g0 != nullptr) std::memcpy(g_pending, g0 + r * wsize, sizeof(T) * wsize);
        else std::memset(g_pending, 0, sizeof(T) * wsize);
      }
      for (int64_t k = 0; k < n.steps; ++k) {
        const int64_t kr = k * R + r;
        const T* X = xk1 + kr * M * D1;
        const T* Q = xq1 + kr * M * D1;
        const T* C = ln_target + kr * M * d;
        const T* D = dual + kr * M * M;
        const T* L = lr + kr * M;
        const T* W = weights + kr * wsize;
        T* W_next = weights + ((k + 1) * R + r) * wsize;
        T* g = grad_z + kr * M * d;
        T* zh = z_hat + kr * M * d;
        T* rs = rstd + kr * M;
        T* out = z_bar + kr * M * d;
        // Z = X W, its LayerNorm statistics, and g = ∇_Z ℓ = P(c + w² ẑ)
        matmul(X, D1, M, W, d, D1, d, zh, d, false);
        for (int64_t i = 0; i < M; ++i) {
          T* z = zh + i * d;
          double sum = 0.0;
          for (int64_t j = 0; j < d; ++j) sum += z[j];
          const double mean = sum / d;
          double var = 0.0;
          for (int64_t j = 0; j < d; ++j) var += (z[j] - mean) * (z[j] - mean);
          const T inv_std = static_cast<T>(1.0 / std::sqrt(var / d + eps));
          rs[i] = inv_std;
          for (int64_t j = 0; j < d; ++j) {
            z[j] = static_cast<T>((z[j] - mean) * inv_std);
            g_hat[j] = C[i * d + j] + w2[j] * z[j];
          }
          layer_norm_backward(g_hat.data(), z, inv_std, d, g + i * d);
        }
        // Z̄ = Q W − D g  [− (s ∘ Q_0) G_0]
        matmul(Q, D1, M, W, d, D1, d, out, d, false);
        for (int64_t e = 0; e < M * M; ++e) neg_d[e] = -D[e];
        matmul(neg_d.data(), M, M, g, d, M, d, out, d, true);
        if (k == 0 && read_pending) {
          for (int64_t i = 0; i < M; ++i)
            for (int64_t a = 0; a < D1; ++a) scaled_q[i * D1 + a] = -pending_scale[i] * Q[i * D1 + a];
          matmul(scaled_q.data(), D1, M, g_pending, d, D1, d, out, d, true);
        }
        // W_{k+1} = W_k − s c S_k, G_{k+1} = (1 − c) S_k with S_k = G_k + Σ_i lr_i X_iᵀ g_i
        const bool complete = completes == nullptr || completes[kr] != T(0);
        // coef = A_k = (lr ∘ X_k)ᵀ, [D1, M], times −s_last when W takes the step directly
        const T scale = pending == nullptr ? -s_last : T(1);
        for (int64_t a = 0; a < D1; ++a)
          for (int64_t i = 0; i < M; ++i) coef[a * M + i] = scale * L[i] * X[i * D1 + a];
        if (pending == nullptr) {
          std::memcpy(W_next, W, sizeof(T) * wsize);
          matmul(coef.data(), M, D1, g, d, M, d, W_next, d, true);
          continue;
        }
        std::memcpy(summed.data(), g_pending, sizeof(T) * wsize);
        matmul(coef.data(), M, D1, g, d, M, d, summed.data(), d, true);
        T* g_next = pending + ((k + 1) * R + r) * wsize;
        if (complete) {
          for (int64_t e = 0; e < wsize; ++e) W_next[e] = W[e] - s_last * summed[e];
          std::memset(g_next, 0, sizeof(T) * wsize);
        } else {
          std::memcpy(W_next, W, sizeof(T) * wsize);
          std::memcpy(g_next, summed.data(), sizeof(T) * wsize);
        }
        g_pending = g_next;
      }
    }
  });
}

template <typename T, int kDim>
void scan_backward(const Sizes& n, const T* grad_z_bar, const T* grad_w_final, const T* grad_g_final,
                   const T* weights, const T* grad_z, const T* z_hat, const T* rstd, const T* pending, const T* xk1,
                   const T* xq1, const T* ln_target, const T* dual, const T* lr, const T* ln_w_sq,
                   const T* pending_scale, T s_last, const T* completes, bool read_pending, T* grad_w0, T* grad_g0,
                   T* grad_xk1, T* grad_xq1, T* grad_ln_target, T* grad_dual, T* grad_lr, T* grad_ln_w_sq,
                   T* grad_s_last, T* grad_pending_scale) {
  // kDim > 0: the head size known at compile time (constant trip counts for the vectorised inner loops)
  const int64_t M = n.mini_batch, d = kDim > 0 ? kDim : n.dim, D1 = d + 1, R = n.rows, wsize = D1 * d;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> adj_w(wsize), adj_g(wsize), adj_s(wsize);
    std::vector<T> y(M * d), v(M * d), w2u(d), hv(d), neg_dt(M * M);
    std::vector<T> lhs(M * 2 * d), rhs(2 * d * D1);  // [Z̃ | lr∘g] and [Wᵀ; S̃ᵀ] for X̃ in one product
    std::vector<T> lhs_w(D1 * 2 * M), rhs_w(2 * M * d);  // [Qᵀ | Xᵀ] and [Z̄̃; Z̃] for W̃ in one product
    T* adj_z = rhs_w.data() + M * d;  // Z̃_k, written where the W̃ product reads it
    for (int64_t r = begin; r < end; ++r) {
      const T* w2 = ln_w_sq + r * d;
      T* acc_w2 = grad_ln_w_sq + r * d;
      std::memset(acc_w2, 0, sizeof(T) * d);
      std::memcpy(adj_w.data(), grad_w_final + r * wsize, sizeof(T) * wsize);  // W̃
      if (grad_g_final != nullptr) std::memcpy(adj_g.data(), grad_g_final + r * wsize, sizeof(T) * wsize);  // G̃
      else std::memset(adj_g.data(), 0, sizeof(T) * wsize);
      double adj_last = 0.0;
      for (int64_t k = n.steps - 1; k >= 0; --k) {
        const int64_t kr = k * R + r;
        const T* X = xk1 + kr * M * D1;
        const T* Q = xq1 + kr * M * D1;
        const T* C = ln_target + kr * M * d;
        const T* D = dual + kr * M * M;
        const T* L = lr + kr * M;
        const T* W = weights + kr * wsize;
        const T* g = grad_z + kr * M * d;
        const T* zh = z_hat + kr * M * d;
        const T* rs = rstd + kr * M;
        const T* adj_out = grad_z_bar + kr * M * d;  // Z̄̃_k
        const bool complete = completes == nullptr || completes[kr] != T(0);
        // S̃_k = −s W̃_{k+1} (complete) or G̃_{k+1}; Y = X S̃_k; lr̃_i = ⟨g_i, Y_i⟩; ∂/∂s_last = −⟨W̃_{k+1}, S_k⟩
        if (complete) {
          matmul(X, D1, M, adj_w.data(), d, D1, d, y.data(), d, false);  // X W̃
          for (int64_t i = 0; i < M; ++i) {
            T* y_i = y.data() + i * d;
            adj_last -= static_cast<double>(L[i]) * dot(g + i * d, y_i, d);
            for (int64_t j = 0; j < d; ++j) y_i[j] *= -s_last;
          }
          if (pending != nullptr) adj_last -= dot(adj_w.data(), pending + kr * wsize, wsize);
          for (int64_t e = 0; e < wsize; ++e) adj_s[e] = -s_last * adj_w[e];
        } else {
          std::memcpy(adj_s.data(), adj_g.data(), sizeof(T) * wsize);
          matmul(X, D1, M, adj_s.data(), d, D1, d, y.data(), d, false);
        }
        if (pending != nullptr) std::memcpy(adj_g.data(), adj_s.data(), sizeof(T) * wsize);  // G̃_k = S̃_k
        for (int64_t i = 0; i < M; ++i) grad_lr[kr * M + i] = dot(g + i * d, y.data() + i * d, d);
        // g̃ = v = lr ∘ (X S̃) − Dᵀ Z̄̃
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < d; ++j) v[i * d + j] = L[i] * y[i * d + j];
        for (int64_t i = 0; i < M; ++i)
          for (int64_t t = 0; t < M; ++t) neg_dt[i * M + t] = -D[t * M + i];
        matmul(neg_dt.data(), M, M, adj_out, d, M, d, v.data(), d, true);
        // Z̃ = H g̃ (linear_scan.py), c̃ = u, w̃² += u ∘ ẑ
        for (int64_t i = 0; i < M; ++i) {
          const T* v_i = v.data() + i * d;
          const T* zh_i = zh + i * d;
          const T* g_i = g + i * d;
          const T* c_i = C + i * d;
          T q = 0;
          for (int64_t j = 0; j < d; ++j) q += (c_i[j] + w2[j] * zh_i[j]) * zh_i[j];
          const T gv = dot(g_i, v_i, d), zv = dot(zh_i, v_i, d);
          T* u_i = grad_ln_target + (kr * M + i) * d;
          layer_norm_backward(v_i, zh_i, rs[i], d, u_i);
          for (int64_t j = 0; j < d; ++j) w2u[j] = w2[j] * u_i[j];
          layer_norm_backward(w2u.data(), zh_i, rs[i], d, hv.data());
          const T scale = rs[i] / d;
          T* adj_z_i = adj_z + i * d;
          for (int64_t j = 0; j < d; ++j) {
            adj_z_i[j] = hv[j] - scale * (zh_i[j] * gv + g_i[j] * zv + u_i[j] * q);
            acc_w2[j] += u_i[j] * zh_i[j];
          }
        }
        // X̃ = [Z̃ | lr∘g] [Wᵀ; S̃ᵀ], Q̃ = Z̄̃ Wᵀ, D̃ = −Z̄̃ gᵀ
        transpose(W, D1, d, rhs.data());
        transpose(adj_s.data(), D1, d, rhs.data() + d * D1);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < d; ++j) {
            lhs[i * 2 * d + j] = adj_z[i * d + j];
            lhs[i * 2 * d + d + j] = L[i] * g[i * d + j];
          }
        matmul(lhs.data(), 2 * d, M, rhs.data(), D1, 2 * d, D1, grad_xk1 + kr * M * D1, D1, false);
        matmul(adj_out, d, M, rhs.data(), D1, d, D1, grad_xq1 + kr * M * D1, D1, false);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t t = 0; t < M; ++t) grad_dual[(kr * M + i) * M + t] = -dot(adj_out + i * d, g + t * d, d);
        // W̃_k = W̃_{k+1} + [Qᵀ | Xᵀ] [Z̄̃; Z̃]
        for (int64_t a = 0; a < D1; ++a)
          for (int64_t i = 0; i < M; ++i) {
            lhs_w[a * 2 * M + i] = Q[i * D1 + a];
            lhs_w[a * 2 * M + M + i] = X[i * D1 + a];
          }
        std::memcpy(rhs_w.data(), adj_out, sizeof(T) * M * d);
        matmul(lhs_w.data(), 2 * M, D1, rhs_w.data(), d, 2 * M, d, adj_w.data(), d, true);
      }
      // Z̄_0 −= (s ∘ Q_0) G_0
      if (read_pending) {
        const T* Q = xq1 + r * M * D1;
        const T* G0 = pending + r * wsize;
        const T* adj_out = grad_z_bar + r * M * d;
        for (int64_t i = 0; i < M; ++i) {
          T ps = 0;
          T* gq = grad_xq1 + (r * M + i) * D1;
          for (int64_t a = 0; a < D1; ++a) {
            const T og = dot(adj_out + i * d, G0 + a * d, d);  // (Z̄̃_0 G_0ᵀ)[i][a]
            ps -= Q[i * D1 + a] * og;
            gq[a] -= pending_scale[i] * og;
            const T coef = -pending_scale[i] * Q[i * D1 + a];
            T* adj_g_a = adj_g.data() + a * d;
            for (int64_t j = 0; j < d; ++j) adj_g_a[j] += coef * adj_out[i * d + j];
          }
          grad_pending_scale[r * M + i] = ps;
        }
      }
      std::memcpy(grad_w0 + r * wsize, adj_w.data(), sizeof(T) * wsize);
      std::memcpy(grad_g0 + r * wsize, adj_g.data(), sizeof(T) * wsize);
      grad_s_last[r] = static_cast<T>(adj_last);
    }
  });
}

void check(bool ok, const char* message) { TORCH_CHECK(ok, "ttt_linear_scan: ", message); }

Sizes sizes_of(const at::Tensor& xk1, const at::Tensor& ln_target) {
  check(xk1.dim() == 4 && ln_target.dim() == 4, "xk1 must be [K, R, M, d+1] and ln_target [K, R, M, d]");
  return Sizes{xk1.size(0), xk1.size(1), xk1.size(2), ln_target.size(3), xk1.size(3)};
}

void check_inputs(const Sizes& n, const std::vector<at::Tensor>& tensors) {
  const at::ScalarType dtype = tensors[0].scalar_type();
  check(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 tensors only");
  for (const at::Tensor& t : tensors) {
    check(t.device().is_cpu(), "CPU tensors only");
    check(t.scalar_type() == dtype, "all tensors must share one dtype");
    check(t.is_contiguous(), "contiguous tensors only");
  }
  check(n.dim_in == n.dim + 1, "xk1 must carry the constant-1 feature (d+1 columns)");
}

template <typename T>
const T* optional_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0 ? t->data_ptr<T>() : nullptr;
}

// -> [z_bar [K,R,M,d], weights [K+1,R,D1,d], grad_z [K,R,M,d], z_hat [K,R,M,d], rstd [K,R,M], pending [K+1,R,D1,d]
//     (empty when neither g0 nor completes is given: G stays 0)]
std::vector<at::Tensor> ttt_linear_scan_forward(const at::Tensor& w0, const c10::optional<at::Tensor>& g0,
                                                const at::Tensor& xk1, const at::Tensor& xq1,
                                                const at::Tensor& ln_target, const at::Tensor& dual,
                                                const at::Tensor& lr, const at::Tensor& ln_w_sq,
                                                const at::Tensor& pending_scale, double s_last,
                                                const c10::optional<at::Tensor>& completes, bool read_pending,
                                                double eps) {
  const Sizes n = sizes_of(xk1, ln_target);
  check_inputs(n, {w0, xk1, xq1, ln_target, dual, lr, ln_w_sq, pending_scale});
  const bool track_pending = (g0.has_value() && g0->defined()) || (completes.has_value() && completes->defined());
  check(!read_pending || (g0.has_value() && g0->defined()), "read_pending needs g0");
  for (const auto* t : {&g0, &completes})
    if (t->has_value() && (*t)->defined()) check_inputs(n, {w0, **t});
  auto options = xk1.options();
  at::Tensor z_bar = at::empty({n.steps, n.rows, n.mini_batch, n.dim}, options);
  at::Tensor weights = at::empty({n.steps + 1, n.rows, n.dim_in, n.dim}, options);
  at::Tensor grad_z = at::empty_like(z_bar), z_hat = at::empty_like(z_bar);
  at::Tensor rstd = at::empty({n.steps, n.rows, n.mini_batch}, options);
  at::Tensor pending = track_pending ? at::empty_like(weights) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(xk1.scalar_type(), "ttt_linear_scan_forward", [&] {
    auto run = n.dim == 64 ? scan_forward<scalar_t, 64> : scan_forward<scalar_t, 0>;
    run(n, w0.data_ptr<scalar_t>(), optional_data<scalar_t>(g0), xk1.data_ptr<scalar_t>(),
                           xq1.data_ptr<scalar_t>(), ln_target.data_ptr<scalar_t>(), dual.data_ptr<scalar_t>(),
                           lr.data_ptr<scalar_t>(), ln_w_sq.data_ptr<scalar_t>(), pending_scale.data_ptr<scalar_t>(),
                           static_cast<scalar_t>(s_last), optional_data<scalar_t>(completes), read_pending, eps,
                           z_bar.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(),
                           z_hat.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                           track_pending ? pending.data_ptr<scalar_t>() : nullptr);
  });
  return {z_bar, weights, grad_z, z_hat, rstd, pending};
}

// -> [grad_w0, grad_g0, grad_xk1, grad_xq1, grad_ln_target, grad_dual, grad_lr, grad_ln_w_sq [R, d],
//     grad_s_last [R], grad_pending_scale [R, M]] (per-row parts are summed by the caller)
std::vector<at::Tensor> ttt_linear_scan_backward(
    const at::Tensor& grad_z_bar, const at::Tensor& grad_w_final, const c10::optional<at::Tensor>& grad_g_final,
    const at::Tensor& weights, const at::Tensor& grad_z, const at::Tensor& z_hat, const at::Tensor& rstd,
    const at::Tensor& pending, const at::Tensor& xk1, const at::Tensor& xq1, const at::Tensor& ln_target,
    const at::Tensor& dual, const at::Tensor& lr, const at::Tensor& ln_w_sq, const at::Tensor& pending_scale,
    double s_last, const c10::optional<at::Tensor>& completes, bool read_pending) {
  const Sizes n = sizes_of(xk1, ln_target);
  check_inputs(n, {grad_z_bar, grad_w_final, weights, grad_z, z_hat, rstd, xk1, xq1, ln_target, dual, lr, ln_w_sq,
                   pending_scale});
  const bool track_pending = pending.numel() > 0;
  check(!read_pending || track_pending, "read_pending needs the saved pending sums");
  auto options = xk1.options();
  at::Tensor grad_w0 = at::empty({n.rows, n.dim_in, n.dim}, options), grad_g0 = at::empty_like(grad_w0);
  at::Tensor grad_xk1 = at::empty_like(xk1), grad_xq1 = at::empty_like(xq1);
  at::Tensor grad_ln_target = at::empty_like(ln_target), grad_dual = at::empty_like(dual);
  at::Tensor grad_lr = at::empty_like(lr), grad_ln_w_sq = at::empty({n.rows, n.dim}, options);
  at::Tensor grad_s_last = at::empty({n.rows}, options);
  at::Tensor grad_pending_scale = at::zeros({n.rows, n.mini_batch}, options);
  AT_DISPATCH_FLOATING_TYPES(xk1.scalar_type(), "ttt_linear_scan_backward", [&] {
    auto run = n.dim == 64 ? scan_backward<scalar_t, 64> : scan_backward<scalar_t, 0>;
    run(n, grad_z_bar.data_ptr<scalar_t>(), grad_w_final.data_ptr<scalar_t>(),
        track_pending ? optional_data<scalar_t>(grad_g_final) : nullptr, weights.data_ptr<scalar_t>(),
        grad_z.data_ptr<scalar_t>(), z_hat.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
        track_pending ? pending.data_ptr<scalar_t>() : nullptr, xk1.data_ptr<scalar_t>(), xq1.data_ptr<scalar_t>(),
        ln_target.data_ptr<scalar_t>(), dual.data_ptr<scalar_t>(), lr.data_ptr<scalar_t>(),
        ln_w_sq.data_ptr<scalar_t>(), pending_scale.data_ptr<scalar_t>(), static_cast<scalar_t>(s_last),
        optional_data<scalar_t>(completes), read_pending, grad_w0.data_ptr<scalar_t>(),
        grad_g0.data_ptr<scalar_t>(), grad_xk1.data_ptr<scalar_t>(), grad_xq1.data_ptr<scalar_t>(),
        grad_ln_target.data_ptr<scalar_t>(), grad_dual.data_ptr<scalar_t>(), grad_lr.data_ptr<scalar_t>(),
        grad_ln_w_sq.data_ptr<scalar_t>(), grad_s_last.data_ptr<scalar_t>(), grad_pending_scale.data_ptr<scalar_t>());
  });
  return {grad_w0, grad_g0, grad_xk1, grad_xq1, grad_ln_target, grad_dual, grad_lr, grad_ln_w_sq, grad_s_last,
          grad_pending_scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(modeling_ttt_cpu, m) {
  m.def(
      "ttt_linear_scan_forward(Tensor w0, Tensor? g0, Tensor xk1, Tensor xq1, Tensor ln_target, Tensor dual, "
      "Tensor lr, Tensor ln_w_sq, Tensor pending_scale, float s_last, Tensor? completes, bool read_pending, "
      "float eps) -> Tensor[]",
      &ttt_linear_scan_forward);
  m.def(
      "ttt_linear_scan_backward(Tensor grad_z_bar, Tensor grad_w_final, Tensor? grad_g_final, Tensor weights, "
      "Tensor grad_z, Tensor z_hat, Tensor rstd, Tensor pending, Tensor xk1, Tensor xq1, Tensor ln_target, "
      "Tensor dual, Tensor lr, Tensor ln_w_sq, Tensor pending_scale, float s_last, Tensor? completes, "
      "bool read_pending) -> Tensor[]",
      &ttt_linear_scan_backward);
}
