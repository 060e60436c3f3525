"""TTT-Linear's mini-batch scan under autograd as one `torch.autograd.Function` with a hand-written backward: the
training path of `torch_chunk.py` (the spec is `naive.py`; tests/test_ops_linear_scan.py holds this file and its C++
kernels to it).

Why: the scan is sequential in the inner weights, and autograd records every small product and LayerNorm of every
mini-batch as its own node; at training sizes (`[B·H, 16, 65]` products) that bookkeeping and the per-node
kernels, not the arithmetic, are most of its time. Here the backward is written out: its PyTorch loops run ~20
kernels per mini-batch on `[B·H, ...]` slices without autograd's bookkeeping, and the C++ kernels
(`ops/cpu/ttt_scan.cpp`, the `cpp` backend) run each row's whole recurrence in one call.

Notation (per row `B·H`, packed `[W; b]` with a constant-1 input feature, see `torch_chunk._pack`): mini-batch `k`
has training inputs `X_k = [x_k, 1]` (`M×(d+1)`), test inputs `Q_k = [x_q, 1]`, the dual matrix
`D_k = (s_i·lr_j)_{j≤i} ∘ Q_k X_kᵀ` and `A_k = (lr ∘ X_k)ᵀ`. With `W_k` the weights at its start and `G_k` the
pending gradient sum carried into it:

    Z_k  = X_k W_k                              (Eq. 4's inner model on the training view)
    g_k  = ∇_Z ℓ(Z_k)                           (the LayerNorm-l2 gradient, per token)
    Z̄_k  = Q_k W_k − D_k g_k  [− (s ∘ Q_0) G_0 at k = 0 when a row starts mid-mini-batch]   (dual form, Sec. 2.6)
    S_k  = G_k + A_k g_k
    W_{k+1} = W_k − s_last · c_k S_k,   G_{k+1} = (1 − c_k) S_k          (c_k: the row completes mini-batch k)

Backward, with adjoints `W̃`, `G̃` flowing from `k+1` to `k` (only they are sequential):

    S̃_k = −s_last c_k W̃_{k+1} + (1 − c_k) G̃_{k+1},    G̃_k = S̃_k
    g̃_k = A_kᵀ S̃_k − D_kᵀ Z̄̃_k
    Z̃_k = H_k g̃_k                               (H_k: the Hessian of ℓ at Z_k, symmetric, per token)
    W̃_k = W̃_{k+1} + Q_kᵀ Z̄̃_k + X_kᵀ Z̃_k

and `H g̃` in closed form: with `ẑ`, `1/σ` of the LayerNorm, `P(v) = (v − mean(v) − ẑ·mean(ẑ v))/σ` (ATen's
LayerNorm backward without weight; `P` is symmetric), `u = P(g̃)`, the inner loss's `∂ℓ/∂ẑ = c + w²ẑ`
(`c = w·(b − target)`) and `n = d`:

    H g̃ = P(w² u) − (ẑ·⟨g, g̃⟩ + g·⟨ẑ, g̃⟩ + u·⟨c + w²ẑ, ẑ⟩) / (n σ)

(the first term is the Gauss-Newton part through `ẑ`, the rest is `Σ_i ∂ℓ/∂ẑ_i ∇²ẑ_i g̃`). The parameters of the
loss get `c̃ = u` and `w̃² = Σ u ∘ ẑ`.
"""

from __future__ import annotations

import torch

from .state import LAYER_NORM_EPS


class LinearScan(torch.autograd.Function):
    """`linear_scan` as an autograd function (see the module docstring for the equations).

    Without the C++ kernels, everything per mini-batch is computed inside the loops on `[B·H, ...]` slices, which
    stay in cache, and the `[K, ...]` results are stacked once. (Batched products over all `K` mini-batches write
    fresh multi-MB buffers, and the page faults on them cost more than the products at these sizes.)"""

    @staticmethod
    def forward(ctx, w0, g0, xk1, xq1, ln_target, dual, lr, ln_w_sq, pending_scale, last_scale, completes,
                read_pending, use_kernels):
        s_last = float(last_scale)
        ctx.s_last, ctx.read_pending, ctx.has_g0, ctx.use_kernels = s_last, read_pending, g0 is not None, use_kernels
        if use_kernels:
            xk1, xq1, ln_target, dual, lr = (t.contiguous() for t in (xk1, xq1, ln_target, dual, lr))
            z_bar, weights, grad_z, z_hat, rstd, pending = torch.ops.modeling_ttt_cpu.ttt_linear_scan_forward(
                w0.contiguous(), None if g0 is None else g0.contiguous(), xk1, xq1, ln_target, dual, lr,
                ln_w_sq.reshape(ln_w_sq.shape[0], -1).contiguous(), pending_scale.reshape(-1).contiguous(), s_last,
                None if completes is None else completes.reshape(completes.shape[0], -1).contiguous(), read_pending,
                LAYER_NORM_EPS)
            ctx.save_for_backward(weights, grad_z, z_hat, rstd, pending, xk1, xq1, ln_target, dual, lr, ln_w_sq,
                                  pending_scale, completes)
            final_pending = pending[-1].clone() if pending.numel() else torch.zeros_like(w0)
            return z_bar, weights[-1].clone(), final_pending
        return _forward_loops(ctx, w0, g0, xk1, xq1, ln_target, dual, lr, ln_w_sq, pending_scale, s_last, completes,
                              read_pending)

    @staticmethod
    def backward(ctx, grad_z_bar, grad_w_final, grad_g_final):
        if not ctx.use_kernels:
            grads = _backward_loops(ctx, grad_z_bar, grad_w_final, grad_g_final)
            return (*grads, None, None, None)
        weights, grad_z, z_hat, rstd, pending, xk1, xq1, ln_target, dual, lr, ln_w_sq, pending_scale, completes = \
            ctx.saved_tensors
        (grad_w0, grad_g0, grad_xk1, grad_xq1, grad_ln_target, grad_dual, grad_lr, grad_ln_w_sq, grad_last,
         grad_pending_scale) = torch.ops.modeling_ttt_cpu.ttt_linear_scan_backward(
            grad_z_bar.contiguous(), grad_w_final.contiguous(), grad_g_final.contiguous(), weights, grad_z, z_hat,
            rstd, pending, xk1, xq1, ln_target, dual, lr, ln_w_sq.reshape(ln_w_sq.shape[0], -1).contiguous(),
            pending_scale.reshape(-1).contiguous(), ctx.s_last,
            None if completes is None else completes.reshape(completes.shape[0], -1).contiguous(), ctx.read_pending)
        return (grad_w0, grad_g0 if ctx.has_g0 else None, grad_xk1, grad_xq1, grad_ln_target, grad_dual, grad_lr,
                grad_ln_w_sq.view_as(ln_w_sq),
                grad_pending_scale.sum(0).view_as(pending_scale) if ctx.read_pending else None,
                grad_last.sum(), None, None, None)


def _forward_loops(ctx, w0, g0, xk1, xq1, ln_target, dual, lr, ln_w_sq, pending_scale, s_last, completes,
                   read_pending):
    num_steps = xk1.shape[0]
    shape = (xk1.shape[-1] - 1,)
    track_pending = g0 is not None or completes is not None
    weights, pending = [w0], [torch.zeros_like(w0) if g0 is None else g0]  # W_k, G_k for k = 0..K
    z_bars, saved = [], []
    for k in range(num_steps):
        w = weights[k]
        z = torch.bmm(xk1[k], w)  # Z_k
        z_hat, mean, rstd = torch.native_layer_norm(z, shape, None, None, LAYER_NORM_EPS)
        grad_z_hat = torch.addcmul(ln_target[k], ln_w_sq, z_hat)  # ∂ℓ/∂ẑ = c + w²ẑ
        g = torch.ops.aten.native_layer_norm_backward(grad_z_hat, z, shape, mean, rstd, None, None,
                                                      (True, False, False))[0]  # g_k
        saved.append((z, z_hat, mean, rstd, g, torch.linalg.vecdot(grad_z_hat, z_hat).unsqueeze(-1)))
        z_bar = torch.baddbmm(torch.bmm(xq1[k], w), dual[k], g, alpha=-1.0)  # Z̄_k (dual form)
        if k == 0 and read_pending:
            z_bar = torch.baddbmm(z_bar, pending_scale * xq1[0], pending[0], alpha=-1.0)
        z_bars.append(z_bar)
        a_t = (lr[k].unsqueeze(-1) * xk1[k]).transpose(1, 2)  # A_k = (lr ∘ X_k)ᵀ
        if not track_pending:
            weights.append(torch.baddbmm(w, a_t, g, alpha=-s_last))
            continue
        summed = torch.baddbmm(pending[k], a_t, g)  # S_k
        if completes is None:  # every row completes: W_{k+1} = W_k − s_last S_k, G_{k+1} = 0
            weights.append(w.add(summed, alpha=-s_last))
            pending.append(torch.zeros_like(summed))
            continue
        done = completes[k]
        weights.append(torch.addcmul(w, done, summed, value=-s_last))
        pending.append(summed * (1.0 - done))
    ctx.saved = saved
    ctx.save_for_backward(xk1, xq1, dual, lr, ln_w_sq, pending_scale, completes, *weights,
                          *(pending if track_pending else ()))
    ctx.num_steps = num_steps
    final_pending = pending[-1] if track_pending else torch.zeros_like(w0)
    return torch.stack(z_bars), weights[-1].clone(), final_pending.clone()


def _backward_loops(ctx, grad_z_bar, grad_w_final, grad_g_final):
    xk1, xq1, dual, lr, ln_w_sq, pending_scale, completes, *carried = ctx.saved_tensors
    num_steps, s_last, read_pending, saved = ctx.num_steps, ctx.s_last, ctx.read_pending, ctx.saved
    weights, pending = carried[: num_steps + 1], carried[num_steps + 1 :]
    track_pending = len(pending) > 0
    dim = grad_z_bar.shape[-1]
    shape = (dim,)

    grad_w, grad_g = grad_w_final.clone(), grad_g_final
    grad_xk1, grad_xq1, grad_dual, grad_lr, grad_ln_target = [], [], [], [], []
    grad_ln_w_sq = torch.zeros_like(grad_z_bar[0])
    grad_last = grad_z_bar.new_zeros(())
    for k in reversed(range(num_steps)):
        z, z_hat, mean, rstd, g, q = saved[k]
        w, grad_out, x = weights[k], grad_z_bar[k], xk1[k]
        a_t = (lr[k].unsqueeze(-1) * x).transpose(1, 2)
        # S̃_k, Ã_k = S̃_k g_kᵀ and g̃_k = A_kᵀ S̃_k − D_kᵀ Z̄̃_k
        if not track_pending:  # S̃_k = −s_last W̃_{k+1}, the scale folded into the products
            grad_a = torch.bmm(grad_w, g.transpose(1, 2))  # W̃_{k+1} g_kᵀ
            grad_last -= (grad_a * a_t).sum()  # −⟨W̃_{k+1}, A_k g_k⟩
            grad_a.mul_(-s_last)
            v = torch.baddbmm(torch.bmm(dual[k].transpose(1, 2), grad_out), a_t.transpose(1, 2), grad_w,
                              beta=-1.0, alpha=-s_last)
        else:
            done = completes[k] if completes is not None else torch.ones_like(grad_w[:, :1, :1])
            grad_s = torch.addcmul(grad_g * (1.0 - done), done, grad_w, value=-s_last)
            grad_last -= (grad_w * done * torch.baddbmm(pending[k], a_t, g)).sum()  # −⟨c W̃, S_k⟩
            grad_a = torch.bmm(grad_s, g.transpose(1, 2))
            v = torch.baddbmm(torch.bmm(dual[k].transpose(1, 2), grad_out), a_t.transpose(1, 2), grad_s, beta=-1.0)
            grad_g = grad_s
        grad_a_t = grad_a.transpose(1, 2)  # [R, M, D1]
        grad_lr.append((grad_a_t * x).sum(-1))
        # Z̃_k = H_k g̃_k (module docstring)
        u = torch.ops.aten.native_layer_norm_backward(v, z, shape, mean, rstd, None, None, (True, False, False))[0]
        hv = torch.ops.aten.native_layer_norm_backward(ln_w_sq * u, z, shape, mean, rstd, None, None,
                                                       (True, False, False))[0]
        correction = z_hat * torch.linalg.vecdot(g, v).unsqueeze(-1)
        correction.addcmul_(g, torch.linalg.vecdot(z_hat, v).unsqueeze(-1)).addcmul_(u, q)
        grad_z = hv.addcmul_(correction, rstd, value=-1.0 / dim)
        grad_ln_target.append(u)
        grad_ln_w_sq.addcmul_(u, z_hat)
        grad_xk1.append(torch.baddbmm(lr[k].unsqueeze(-1) * grad_a_t, grad_z, w.transpose(1, 2)))
        grad_xq1.append(torch.bmm(grad_out, w.transpose(1, 2)))
        grad_dual.append(torch.bmm(grad_out, g.transpose(1, 2)).neg_())
        # W̃_k = W̃_{k+1} + Q_kᵀ Z̄̃_k + X_kᵀ Z̃_k
        grad_w.baddbmm_(xq1[k].transpose(1, 2), grad_out).baddbmm_(x.transpose(1, 2), grad_z)

    grad_pending_scale = None
    if read_pending:  # Z̄_0 −= (s ∘ Q_0) G_0
        scaled_q = pending_scale * xq1[0]
        grad_g = grad_g - torch.bmm(scaled_q.transpose(1, 2), grad_z_bar[0])
        grad_scaled_q = torch.bmm(grad_z_bar[0], pending[0].transpose(1, 2)).neg_()
        grad_xq1[-1] = grad_xq1[-1] + pending_scale * grad_scaled_q
        grad_pending_scale = (grad_scaled_q * xq1[0]).sum(dim=(0, 2)).unsqueeze(-1)
    stack = lambda grads: torch.stack(grads[::-1])  # noqa: E731  (collected from the last mini-batch back)
    return (grad_w, grad_g if ctx.has_g0 else None, stack(grad_xk1), stack(grad_xq1), stack(grad_ln_target),
            stack(grad_dual), stack(grad_lr), grad_ln_w_sq.sum(dim=1, keepdim=True), grad_pending_scale, grad_last)


def linear_scan(w0, g0, xk1, xq1, ln_target, dual, lr, ln_w_sq, pending_scale, last_scale, completes, read_pending,
                use_kernels=False):
    """TTT-Linear's scan over `K` mini-batches (module docstring) with autograd.

    w0, g0: `[R, d+1, d]` the packed `[W; b]` and the pending sum `G` before the first mini-batch (`g0=None`: 0).
    xk1, xq1: `[K, R, M, d+1]` training and test views with the constant-1 feature; ln_target: `[K, R, M, d]`
    `w·(b − target)`; dual: `[K, R, M, M]` the dual matrices; lr: `[K, R, M]`; ln_w_sq: `[R, 1, d]`;
    pending_scale: `[M, 1]` the token scales (read with `G_0` when `read_pending`); last_scale: 0-d `s_last`;
    completes: `[K, R, 1, 1]` 0/1, or None when every row completes every mini-batch (then `G` stays 0).
    use_kernels: run both loops in the C++ kernels (`modeling_ttt.ops.cpu`; CPU, float32/float64).

    Returns `Z̄` `[K, R, M, d]`, `W_K` and `G_K`."""
    return LinearScan.apply(w0, g0, xk1, xq1, ln_target, dual, lr, ln_w_sq, pending_scale, last_scale, completes,
                            read_pending, use_kernels)
