"""Decode kernels: one token per row, primal form (Eq. 6/7 literally), inference only.

One program per (batch row, head). With the row's position `p = seen mod M` inside its mini-batch:

    G ← [p > 0]·G + lr · ∇ℓ(W₀)          (G = 0 at a mini-batch start: the invariant of `InnerState`)
    W_p = W₀ − s_p · G                    (the token's own weights)
    out = x_q + LN(f(x_q; W_p))
    p = M − 1 (mini-batch end): W₀ ← W_p, G ← 0

Every product is a vector–matrix product, done as broadcast-multiply-and-reduce on the `[D, D]` (or `[D, F]`)
tile: `tl.dot` needs at least 16 rows, a single token has one. The step is bound by reading and writing the
state (W₀ and G), which is why the new state is written once, already in its final form.
"""

import triton
import triton.language as tl

from ._common import gelu_tanh, gelu_tanh_grad


@triton.jit
def _row_layer_norm_l2_grad(z, target, ln_w, ln_b, d_mask, D: tl.constexpr, EPS: tl.constexpr):
    """`layer_norm_l2_grad` for a single row `[BLOCK_D]`."""
    z = tl.where(d_mask, z, 0.0)
    centered = tl.where(d_mask, z - tl.sum(z, axis=0) / D, 0.0)
    inv_std = tl.rsqrt(tl.sum(centered * centered, axis=0) / D + EPS)
    z_hat = centered * inv_std
    grad_z_hat = ln_w * (ln_w * z_hat + ln_b - target)
    out = grad_z_hat - tl.sum(grad_z_hat, axis=0) / D - z_hat * (tl.sum(grad_z_hat * z_hat, axis=0) / D)
    return tl.where(d_mask, out * inv_std, 0.0)


@triton.jit
def _row_layer_norm(x, ln_w, ln_b, d_mask, D: tl.constexpr, EPS: tl.constexpr):
    x = tl.where(d_mask, x, 0.0)
    centered = tl.where(d_mask, x - tl.sum(x, axis=0) / D, 0.0)
    inv_std = tl.rsqrt(tl.sum(centered * centered, axis=0) / D + EPS)
    return tl.where(d_mask, centered * inv_std * ln_w + ln_b, 0.0)


@triton.jit
def ttt_linear_decode_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr,  # [B, H, 1, D] ×3, [B, H, 1]
    scale_ptr, ln_w_ptr, ln_b_ptr,  # [M], [H, D], [H, D]
    w_ptr, b_ptr, g_w_ptr, g_b_ptr,  # state [B, H, D, D], [B, H, D] and pending sums
    seen_ptr, count_ptr,  # [B] int64: tokens seen; [B] int32: 1, or 0 for a padded row (state unchanged)
    out_ptr, w_out_ptr, b_out_ptr, g_w_out_ptr, g_b_out_ptr,
    H,
    D: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // H
    head = pid % H
    offs = tl.arange(0, BLOCK_D)
    d_mask = offs < D
    square_mask = d_mask[:, None] & d_mask[None, :]
    square = offs[:, None] * D + offs[None, :]

    position = tl.load(seen_ptr + batch) % M
    real = tl.load(count_ptr + batch) > 0
    scale = tl.load(scale_ptr + position).to(tl.float32)
    ln_w = tl.load(ln_w_ptr + head * D + offs, mask=d_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + head * D + offs, mask=d_mask, other=0.0).to(tl.float32)
    xq = tl.load(xq_ptr + pid * D + offs, mask=d_mask, other=0.0).to(tl.float32)
    xk = tl.load(xk_ptr + pid * D + offs, mask=d_mask, other=0.0).to(tl.float32)
    xv = tl.load(xv_ptr + pid * D + offs, mask=d_mask, other=0.0).to(tl.float32)
    lr = tl.load(lr_ptr + pid).to(tl.float32)
    lr = tl.where(real, lr, 0.0)
    w = tl.load(w_ptr + pid * D * D + square, mask=square_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pid * D + offs, mask=d_mask, other=0.0).to(tl.float32)
    keep = (position > 0).to(tl.float32)  # G is only pending inside a mini-batch
    g_w = keep * tl.load(g_w_ptr + pid * D * D + square, mask=square_mask, other=0.0).to(tl.float32)
    g_b = keep * tl.load(g_b_ptr + pid * D + offs, mask=d_mask, other=0.0).to(tl.float32)

    z = tl.sum(xk[:, None] * w, axis=0) + b  # x_k W₀ + b₀
    grad_z = _row_layer_norm_l2_grad(z, xv - xk, ln_w, ln_b, d_mask, D, EPS)
    g_w += lr * xk[:, None] * grad_z[None, :]
    g_b += lr * grad_z
    w_token = w - scale * g_w
    b_token = b - scale * g_b
    z_q = tl.sum(xq[:, None] * w_token, axis=0) + b_token
    out = xq + _row_layer_norm(z_q, ln_w, ln_b, d_mask, D, EPS)
    tl.store(out_ptr + pid * D + offs, tl.where(real, out, 0.0), mask=d_mask)

    ends = real & (position == M - 1)  # the token closes its mini-batch
    if ends:
        tl.store(w_out_ptr + pid * D * D + square, w_token, mask=square_mask)
        tl.store(b_out_ptr + pid * D + offs, b_token, mask=d_mask)
        tl.store(g_w_out_ptr + pid * D * D + square, tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32), mask=square_mask)
        tl.store(g_b_out_ptr + pid * D + offs, tl.zeros((BLOCK_D,), dtype=tl.float32), mask=d_mask)
    else:
        tl.store(w_out_ptr + pid * D * D + square, w, mask=square_mask)
        tl.store(b_out_ptr + pid * D + offs, b, mask=d_mask)
        tl.store(g_w_out_ptr + pid * D * D + square, g_w, mask=square_mask)
        tl.store(g_b_out_ptr + pid * D + offs, g_b, mask=d_mask)


@triton.jit
def ttt_mlp_decode_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, scale_ptr, ln_w_ptr, ln_b_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # [B, H, D, F], [B, H, F], [B, H, F, D], [B, H, D]
    g_w1_ptr, g_b1_ptr, g_w2_ptr, g_b2_ptr,
    seen_ptr, count_ptr,
    out_ptr, w1_out_ptr, b1_out_ptr, w2_out_ptr, b2_out_ptr,
    g_w1_out_ptr, g_b1_out_ptr, g_w2_out_ptr, g_b2_out_ptr,
    H,
    D: tl.constexpr, F: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    EPS: tl.constexpr,
):
    """TTT-MLP step. The hidden width F is walked in slices of BLOCK_F columns of W1 / rows of W2 (the state is
    too large for registers at d = 64): a first pass computes z2 = gelu(x_k W1 + b1) W2 + b2 (∇z2 needs all of
    it), a second pass updates every slice (∇z1, G, the token's weights) and accumulates the output."""
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // H
    head = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_F)
    d_mask = offs_d < D

    position = tl.load(seen_ptr + batch) % M
    real = tl.load(count_ptr + batch) > 0
    scale = tl.load(scale_ptr + position).to(tl.float32)
    keep = (position > 0).to(tl.float32)  # G is only pending inside a mini-batch
    ends = real & (position == M - 1)  # the token closes its mini-batch
    ln_w = tl.load(ln_w_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    xq = tl.load(xq_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    xk = tl.load(xk_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    xv = tl.load(xv_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    lr = tl.where(real, tl.load(lr_ptr + pid).to(tl.float32), 0.0)
    b2 = tl.load(b2_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)

    # Pass 1: z2 = gelu(x_k W1 + b1) W2 + b2 at W₀.
    z2 = b2
    for start in range(0, F, BLOCK_F):
        offs_f = start + offs_c
        f_mask = offs_f < F
        w1 = tl.load(w1_ptr + pid * D * F + offs_d[:, None] * F + offs_f[None, :],
                     mask=d_mask[:, None] & f_mask[None, :], other=0.0).to(tl.float32)
        b1 = tl.load(b1_ptr + pid * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
        x2 = gelu_tanh(tl.sum(xk[:, None] * w1, axis=0) + b1)
        w2 = tl.load(w2_ptr + pid * F * D + offs_f[:, None] * D + offs_d[None, :],
                     mask=f_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        z2 += tl.sum(x2[:, None] * w2, axis=0)
    grad_z2 = _row_layer_norm_l2_grad(z2, xv - xk, ln_w, ln_b, d_mask, D, EPS)
    g_b2 = keep * tl.load(g_b2_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32) + lr * grad_z2
    b2_token = b2 - scale * g_b2

    # Pass 2: per slice, the gradient sums, the token's weights, the output and the new state.
    z_q = b2_token
    for start in range(0, F, BLOCK_F):
        offs_f = start + offs_c
        f_mask = offs_f < F
        tile1 = pid * D * F + offs_d[:, None] * F + offs_f[None, :]  # W1[:, slice]
        mask1 = d_mask[:, None] & f_mask[None, :]
        tile2 = pid * F * D + offs_f[:, None] * D + offs_d[None, :]  # W2[slice, :]
        mask2 = f_mask[:, None] & d_mask[None, :]
        w1 = tl.load(w1_ptr + tile1, mask=mask1, other=0.0).to(tl.float32)
        b1 = tl.load(b1_ptr + pid * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
        w2 = tl.load(w2_ptr + tile2, mask=mask2, other=0.0).to(tl.float32)
        z1 = tl.sum(xk[:, None] * w1, axis=0) + b1
        x2 = gelu_tanh(z1)
        grad_z1 = tl.sum(w2 * grad_z2[None, :], axis=1) * gelu_tanh_grad(z1)  # (∇z2 W2ᵀ) ∘ gelu′(z1)
        g_w1 = keep * tl.load(g_w1_ptr + tile1, mask=mask1, other=0.0).to(tl.float32)
        g_w1 += lr * xk[:, None] * grad_z1[None, :]
        g_b1 = keep * tl.load(g_b1_ptr + pid * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
        g_b1 += lr * grad_z1
        g_w2 = keep * tl.load(g_w2_ptr + tile2, mask=mask2, other=0.0).to(tl.float32)
        g_w2 += lr * x2[:, None] * grad_z2[None, :]
        w1_token = w1 - scale * g_w1
        b1_token = b1 - scale * g_b1
        w2_token = w2 - scale * g_w2
        hidden = gelu_tanh(tl.sum(xq[:, None] * w1_token, axis=0) + b1_token)
        z_q += tl.sum(hidden[:, None] * w2_token, axis=0)
        if ends:  # W₀ ← W_p, G ← 0
            tl.store(w1_out_ptr + tile1, w1_token, mask=mask1)
            tl.store(b1_out_ptr + pid * F + offs_f, b1_token, mask=f_mask)
            tl.store(w2_out_ptr + tile2, w2_token, mask=mask2)
            tl.store(g_w1_out_ptr + tile1, tl.zeros((BLOCK_D, BLOCK_F), dtype=tl.float32), mask=mask1)
            tl.store(g_b1_out_ptr + pid * F + offs_f, tl.zeros((BLOCK_F,), dtype=tl.float32), mask=f_mask)
            tl.store(g_w2_out_ptr + tile2, tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32), mask=mask2)
        else:
            tl.store(w1_out_ptr + tile1, w1, mask=mask1)
            tl.store(b1_out_ptr + pid * F + offs_f, b1, mask=f_mask)
            tl.store(w2_out_ptr + tile2, w2, mask=mask2)
            tl.store(g_w1_out_ptr + tile1, g_w1, mask=mask1)
            tl.store(g_b1_out_ptr + pid * F + offs_f, g_b1, mask=f_mask)
            tl.store(g_w2_out_ptr + tile2, g_w2, mask=mask2)
    out = xq + _row_layer_norm(z_q, ln_w, ln_b, d_mask, D, EPS)
    tl.store(out_ptr + pid * D + offs_d, tl.where(real, out, 0.0), mask=d_mask)
    if ends:
        tl.store(b2_out_ptr + pid * D + offs_d, b2_token, mask=d_mask)
        tl.store(g_b2_out_ptr + pid * D + offs_d, tl.zeros((BLOCK_D,), dtype=tl.float32), mask=d_mask)
    else:
        tl.store(b2_out_ptr + pid * D + offs_d, b2, mask=d_mask)
        tl.store(g_b2_out_ptr + pid * D + offs_d, g_b2, mask=d_mask)


# (kernel, constexprs) pairs that eval/compile checks build for sm_90 without launching.
COMPILE_CHECK = [
    (ttt_linear_decode_kernel, dict(D=64, M=16, BLOCK_D=64, EPS=1e-6)),
    (ttt_mlp_decode_kernel, dict(D=64, F=256, M=16, BLOCK_D=64, BLOCK_F=32, EPS=1e-6)),
]
