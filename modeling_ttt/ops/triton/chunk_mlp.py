"""Fused chunk kernels of TTT-MLP (dual form, Sec. 2.6), forward and backward.

Same structure as `chunk_linear.py` with the inner model `f(x) = gelu(x W1 + b1) W2 + b2`, `W1 [D, F]`,
`W2 [F, D]`, `F = 4·D`. Per mini-batch (W, b at the mini-batch start; reference `_mlp_step`):

    Z1 = X_k W1 + b1,  X2 = gelu(Z1),  Z2 = X2 W2 + b2
    ∇Z2 = LN-l2 gradient of Z2 against X_v − X_k,   ∇Z1 = (∇Z2 W2ᵀ) ∘ gelu′(Z1)
    Z̄1 = X_q W1 + b1 − (η ∘ (X_q X_kᵀ + 1)) ∇Z1 [− s (X_q G_W1 + g_b1)],   X̄2 = gelu(Z̄1)
    Z̄2 = X̄2 W2 + b2 − (η ∘ (X̄2 X2ᵀ + 1)) ∇Z2 [− s (X̄2 G_W2 + g_b2)],  out = X_q + LN(Z̄2)
    G_W1 = (lr∘X_k)ᵀ ∇Z1,  g_b1 = lrᵀ ∇Z1,  G_W2 = (lr∘X2)ᵀ ∇Z2,  g_b2 = lrᵀ ∇Z2

The forward keeps all four inner tensors in registers (fp32) across mini-batches. For d = 64 that is 2·64·256
floats, more than a comfortable register budget: ptxas spills part of it (a few KiB per thread block), which
costs speed, not correctness. The backward reads its `[d, 4d]` matmul operands from memory instead (see
`ttt_mlp_bwd_kernel`) to stay within an H100's shared memory. Head sizes above 64 are refused
(`interface.MAX_HEAD_DIM`).
"""

import triton
import triton.language as tl

from ._common import (gelu_tanh, gelu_tanh_grad, gelu_tanh_second_grad, layer_norm_affine,
                      layer_norm_affine_backward, layer_norm_l2_grad, layer_norm_l2_grad_backward)


@triton.jit
def _load_tokens(ptr, base, offs_m, offs_d, mask, D: tl.constexpr):
    return tl.load(ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, index, offs_d, offs_f, d_mask, f_mask,
                 D: tl.constexpr, F: tl.constexpr):
    """The `index`-th `(W1, b1, W2, b2)` of buffers laid out `[N, D, F]`, `[N, F]`, `[N, F, D]`, `[N, D]`."""
    w1 = tl.load(w1_ptr + index * D * F + offs_d[:, None] * F + offs_f[None, :],
                 mask=d_mask[:, None] & f_mask[None, :], other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + index * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + index * F * D + offs_f[:, None] * D + offs_d[None, :],
                 mask=f_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + index * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    return w1, b1, w2, b2


@triton.jit
def _store_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, index, w1, b1, w2, b2, offs_d, offs_f, d_mask, f_mask,
                  D: tl.constexpr, F: tl.constexpr):
    tl.store(w1_ptr + index * D * F + offs_d[:, None] * F + offs_f[None, :], w1,
             mask=d_mask[:, None] & f_mask[None, :])
    tl.store(b1_ptr + index * F + offs_f, b1, mask=f_mask)
    tl.store(w2_ptr + index * F * D + offs_f[:, None] * D + offs_d[None, :], w2,
             mask=f_mask[:, None] & d_mask[None, :])
    tl.store(b2_ptr + index * D + offs_d, b2, mask=d_mask)


@triton.jit
def _mlp_inner_grads(xk, target, w1, b1, w2, b2, ln_w, ln_b, d_mask, D: tl.constexpr, EPS: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Inner model on the training view and its gradients at (W1, b1, W2, b2)."""
    z1 = tl.dot(xk, w1, input_precision=PRECISION) + b1[None, :]
    x2 = gelu_tanh(z1)
    z2 = tl.dot(x2, w2, input_precision=PRECISION) + b2[None, :]
    grad_z2 = layer_norm_l2_grad(z2, target, ln_w, ln_b, d_mask, D, EPS)
    back = tl.dot(grad_z2, tl.trans(w2), input_precision=PRECISION)  # ∇Z2 W2ᵀ
    grad_z1 = back * gelu_tanh_grad(z1)
    return z1, x2, z2, grad_z2, back, grad_z1


@triton.jit
def _mlp_grad_sums(xk, x2, lr, grad_z1, grad_z2, PRECISION: tl.constexpr):
    g_w1 = tl.dot(tl.trans(lr[:, None] * xk), grad_z1, input_precision=PRECISION)
    g_b1 = tl.sum(lr[:, None] * grad_z1, axis=0)
    g_w2 = tl.dot(tl.trans(lr[:, None] * x2), grad_z2, input_precision=PRECISION)
    g_b2 = tl.sum(lr[:, None] * grad_z2, axis=0)
    return g_w1, g_b1, g_w2, g_b2


@triton.jit
def ttt_mlp_fwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, scale_ptr, ln_w_ptr, ln_b_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # initial state [B, H, D, F], [B, H, F], [B, H, F, D], [B, H, D]
    p_w1_ptr, p_b1_ptr, p_w2_ptr, p_b2_ptr,  # pending G of the first mini-batch (same shapes)
    end_ptr,
    out_ptr, w1_out_ptr, b1_out_ptr, w2_out_ptr, b2_out_ptr,
    g_w1_out_ptr, g_b1_out_ptr, g_w2_out_ptr, g_b2_out_ptr,  # pre-zeroed
    ck_w1_ptr, ck_b1_ptr, ck_w2_ptr, ck_b2_ptr,  # [B·H, ceil(K / CKPT_EVERY), ...]
    H, L, NUM_MB, CKPT_EVERY,
    D: tl.constexpr, F: tl.constexpr, M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_PENDING: tl.constexpr, SAVE_CKPT: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // H
    head = pid % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    m_mask = offs_m < M
    d_mask = offs_d < D
    f_mask = offs_f < F
    tile_mask = m_mask[:, None] & d_mask[None, :]

    ln_w = tl.load(ln_w_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    last_scale = tl.load(scale_ptr + M - 1).to(tl.float32)
    causal = offs_m[:, None] >= offs_m[None, :]

    w1, b1, w2, b2 = _load_params(w1_ptr, b1_ptr, w2_ptr, b2_ptr, pid, offs_d, offs_f, d_mask, f_mask, D, F)
    end = tl.load(end_ptr + batch)
    last_complete = end // M
    num_steps = tl.minimum(NUM_MB, last_complete + 1)
    num_ckpt = tl.cdiv(NUM_MB, CKPT_EVERY)

    g_w1 = tl.zeros((BLOCK_D, BLOCK_F), dtype=tl.float32)
    g_b1 = tl.zeros((BLOCK_F,), dtype=tl.float32)
    g_w2 = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    g_b2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(0, num_steps):
        if SAVE_CKPT:
            if k % CKPT_EVERY == 0:
                _store_params(ck_w1_ptr, ck_b1_ptr, ck_w2_ptr, ck_b2_ptr, pid * num_ckpt + k // CKPT_EVERY,
                              w1, b1, w2, b2, offs_d, offs_f, d_mask, f_mask, D, F)
        token_base = (pid * L + k * M) * D
        xq = _load_tokens(xq_ptr, token_base, offs_m, offs_d, tile_mask, D)
        xk = _load_tokens(xk_ptr, token_base, offs_m, offs_d, tile_mask, D)
        xv = _load_tokens(xv_ptr, token_base, offs_m, offs_d, tile_mask, D)
        lr = tl.load(lr_ptr + pid * L + k * M + offs_m, mask=m_mask, other=0.0).to(tl.float32)

        z1, x2, z2, grad_z2, back, grad_z1 = _mlp_inner_grads(xk, xv - xk, w1, b1, w2, b2, ln_w, ln_b, d_mask,
                                                              D, EPS, PRECISION)
        g_w1, g_b1, g_w2, g_b2 = _mlp_grad_sums(xk, x2, lr, grad_z1, grad_z2, PRECISION)
        eta = tl.where(causal, scale[:, None] * lr[None, :], 0.0)
        attn1 = eta * (tl.dot(xq, tl.trans(xk), input_precision=PRECISION) + 1.0)
        z1_bar = (tl.dot(xq, w1, input_precision=PRECISION) + b1[None, :]
                  - tl.dot(attn1, grad_z1, input_precision=PRECISION))
        if HAS_PENDING:
            if k == 0:
                p_w1, p_b1, p_w2, p_b2 = _load_params(p_w1_ptr, p_b1_ptr, p_w2_ptr, p_b2_ptr, pid, offs_d, offs_f,
                                                      d_mask, f_mask, D, F)
                z1_bar -= scale[:, None] * (tl.dot(xq, p_w1, input_precision=PRECISION) + p_b1[None, :])
                g_w1 += p_w1
                g_b1 += p_b1
                g_w2 += p_w2
                g_b2 += p_b2
        x2_bar = gelu_tanh(z1_bar)
        attn2 = eta * (tl.dot(x2_bar, tl.trans(x2), input_precision=PRECISION) + 1.0)
        z2_bar = (tl.dot(x2_bar, w2, input_precision=PRECISION) + b2[None, :]
                  - tl.dot(attn2, grad_z2, input_precision=PRECISION))
        if HAS_PENDING:
            if k == 0:
                p_w1, p_b1, p_w2, p_b2 = _load_params(p_w1_ptr, p_b1_ptr, p_w2_ptr, p_b2_ptr, pid, offs_d, offs_f,
                                                      d_mask, f_mask, D, F)
                z2_bar -= scale[:, None] * (tl.dot(x2_bar, p_w2, input_precision=PRECISION) + p_b2[None, :])
        out = xq + layer_norm_affine(z2_bar, ln_w, ln_b, d_mask, D, EPS)
        tl.store(out_ptr + token_base + offs_m[:, None] * D + offs_d[None, :], out, mask=tile_mask)
        step = tl.where(k < last_complete, last_scale, 0.0)
        w1 -= step * g_w1
        b1 -= step * g_b1
        w2 -= step * g_w2
        b2 -= step * g_b2

    _store_params(w1_out_ptr, b1_out_ptr, w2_out_ptr, b2_out_ptr, pid, w1, b1, w2, b2, offs_d, offs_f,
                  d_mask, f_mask, D, F)
    if last_complete < NUM_MB:
        _store_params(g_w1_out_ptr, g_b1_out_ptr, g_w2_out_ptr, g_b2_out_ptr, pid, g_w1, g_b1, g_w2, g_b2,
                      offs_d, offs_f, d_mask, f_mask, D, F)


@triton.jit
def _tile(ptr, base, rows, cols, row_stride, col_stride, mask):
    """A `[rows, cols]` fp32 tile of a matrix in memory, read with the given strides (so also transposed)."""
    return tl.load(ptr + base + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def ttt_mlp_bwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, scale_ptr, ln_w_ptr, ln_b_ptr,
    p_w1_ptr, p_b1_ptr, p_w2_ptr, p_b2_ptr, end_ptr,
    ck_w1_ptr, ck_b1_ptr, ck_w2_ptr, ck_b2_ptr,
    sc_w1_ptr, sc_b1_ptr, sc_w2_ptr, sc_b2_ptr,  # scratch [B·H, CKPT_EVERY, ...]
    d_out_ptr,
    dw1_out_ptr, db1_out_ptr, dw2_out_ptr, db2_out_ptr,  # gradients of the final weights
    dg_w1_out_ptr, dg_b1_out_ptr, dg_w2_out_ptr, dg_b2_out_ptr,  # gradients of the final pending sums
    d_xq_ptr, d_xk_ptr, d_xv_ptr, d_lr_ptr, d_scale_ptr, d_ln_w_ptr, d_ln_b_ptr,
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,  # gradients of the initial weights
    dp_w1_ptr, dp_b1_ptr, dp_w2_ptr, dp_b2_ptr,  # gradients of the initial pending sums
    adj_w1_ptr, adj_w2_ptr,  # [B·H, D, F], [B·H, F, D]: the carried weight adjoints, re-read as matmul operands
    H, L, NUM_MB, CKPT_EVERY,
    D: tl.constexpr, F: tl.constexpr, M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_PENDING: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward of `ttt_mlp_fwd_kernel`, mini-batches in reverse.

    Shared memory is the constraint here: a `[d, 4d]` fp32 matmul operand staged through shared memory is 64 KiB
    at d = 64, and keeping W1, W1ᵀ, W2, W2ᵀ and the two weight adjoints (both orientations) as register tiles
    made Triton stage all of them at once (> 227 KiB, more than an H100 block may use). So the weights are
    never held as register tiles here: every matmul reads its `[d, 4d]` operand straight from memory (the saved
    or recomputed weights, the gradients of the final state, or `adj_*`, where the carried adjoints are written
    at each step) in the orientation it needs, and only the adjoints being accumulated stay in registers.
    """
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // H
    head = pid % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    m_mask = offs_m < M
    d_mask = offs_d < D
    f_mask = offs_f < F
    tile_mask = m_mask[:, None] & d_mask[None, :]
    mask_df = d_mask[:, None] & f_mask[None, :]
    mask_fd = f_mask[:, None] & d_mask[None, :]

    ln_w = tl.load(ln_w_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    last_scale = tl.load(scale_ptr + M - 1).to(tl.float32)
    causal = offs_m[:, None] >= offs_m[None, :]
    is_last_position = (offs_m == M - 1).to(tl.float32)

    end = tl.load(end_ptr + batch)
    last_complete = end // M
    num_steps = tl.minimum(NUM_MB, last_complete + 1)
    num_ckpt = tl.cdiv(NUM_MB, CKPT_EVERY)

    # Adjoints of the carried weights, starting from the gradients of the final state.
    dw1 = _tile(dw1_out_ptr, pid * D * F, offs_d, offs_f, F, 1, mask_df)
    db1 = tl.load(db1_out_ptr + pid * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
    dw2 = _tile(dw2_out_ptr, pid * F * D, offs_f, offs_d, D, 1, mask_fd)
    db2 = tl.load(db2_out_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    dg_b1_final = tl.load(dg_b1_out_ptr + pid * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
    dg_b2_final = tl.load(dg_b2_out_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    d_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_ln_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_ln_b = tl.zeros((BLOCK_D,), dtype=tl.float32)

    num_segments = tl.cdiv(num_steps, CKPT_EVERY)
    for segment_rev in range(0, num_segments):
        segment = num_segments - 1 - segment_rev
        first = segment * CKPT_EVERY
        stop = tl.minimum(first + CKPT_EVERY, num_steps)
        if CKPT_EVERY > 1:
            # Recompute the weights at the start of every mini-batch of the segment from its checkpoint, slot by
            # slot of the scratch buffer: W_{k+1} = W_k − s_last·G_k (all but the segment's last are complete).
            src = (pid * num_ckpt + segment) * D * F
            dst = pid * CKPT_EVERY * D * F
            tl.store(sc_w1_ptr + dst + offs_d[:, None] * F + offs_f[None, :],
                     _tile(ck_w1_ptr, src, offs_d, offs_f, F, 1, mask_df), mask=mask_df)
            tl.store(sc_w2_ptr + dst + offs_f[:, None] * D + offs_d[None, :],
                     _tile(ck_w2_ptr, src, offs_f, offs_d, D, 1, mask_fd), mask=mask_fd)
            b1 = tl.load(ck_b1_ptr + (pid * num_ckpt + segment) * F + offs_f, mask=f_mask, other=0.0)
            b2 = tl.load(ck_b2_ptr + (pid * num_ckpt + segment) * D + offs_d, mask=d_mask, other=0.0)
            tl.store(sc_b1_ptr + pid * CKPT_EVERY * F + offs_f, b1, mask=f_mask)
            tl.store(sc_b2_ptr + pid * CKPT_EVERY * D + offs_d, b2, mask=d_mask)
            for k in range(first, stop - 1):
                tl.debug_barrier()  # slot k was just written by other threads of this program
                slot = pid * CKPT_EVERY + (k - first)
                base1 = slot * D * F
                token_base = (pid * L + k * M) * D
                xk = _load_tokens(xk_ptr, token_base, offs_m, offs_d, tile_mask, D)
                xv = _load_tokens(xv_ptr, token_base, offs_m, offs_d, tile_mask, D)
                lr = tl.load(lr_ptr + pid * L + k * M + offs_m, mask=m_mask, other=0.0).to(tl.float32)
                z1 = tl.dot(xk, _tile(sc_w1_ptr, base1, offs_d, offs_f, F, 1, mask_df),
                            input_precision=PRECISION) + b1[None, :]
                x2 = gelu_tanh(z1)
                z2 = tl.dot(x2, _tile(sc_w2_ptr, base1, offs_f, offs_d, D, 1, mask_fd),
                            input_precision=PRECISION) + b2[None, :]
                grad_z2 = layer_norm_l2_grad(z2, xv - xk, ln_w, ln_b, d_mask, D, EPS)
                grad_z1 = tl.dot(grad_z2, _tile(sc_w2_ptr, base1, offs_d, offs_f, 1, D, mask_df),
                                 input_precision=PRECISION) * gelu_tanh_grad(z1)
                g_w1, g_b1, g_w2, g_b2 = _mlp_grad_sums(xk, x2, lr, grad_z1, grad_z2, PRECISION)
                if HAS_PENDING:
                    if k == 0:
                        p_w1, p_b1, p_w2, p_b2 = _load_params(p_w1_ptr, p_b1_ptr, p_w2_ptr, p_b2_ptr, pid, offs_d,
                                                              offs_f, d_mask, f_mask, D, F)
                        g_w1 += p_w1
                        g_b1 += p_b1
                        g_w2 += p_w2
                        g_b2 += p_b2
                b1 -= last_scale * g_b1
                b2 -= last_scale * g_b2
                next_w1 = _tile(sc_w1_ptr, base1, offs_d, offs_f, F, 1, mask_df) - last_scale * g_w1
                next_w2 = _tile(sc_w2_ptr, base1, offs_f, offs_d, D, 1, mask_fd) - last_scale * g_w2
                tl.store(sc_w1_ptr + base1 + D * F + offs_d[:, None] * F + offs_f[None, :], next_w1, mask=mask_df)
                tl.store(sc_w2_ptr + base1 + F * D + offs_f[:, None] * D + offs_d[None, :], next_w2, mask=mask_fd)
                tl.store(sc_b1_ptr + (slot + 1) * F + offs_f, b1, mask=f_mask)
                tl.store(sc_b2_ptr + (slot + 1) * D + offs_d, b2, mask=d_mask)
            tl.debug_barrier()  # the scratch written above is read back by other threads of this program

        for k_rev in range(0, stop - first):
            k = stop - 1 - k_rev
            # where W_k, b_k are: the segment's scratch slot, or the forward's checkpoint of every mini-batch
            if CKPT_EVERY > 1:
                w1_src = sc_w1_ptr
                w2_src = sc_w2_ptr
                b1_src = sc_b1_ptr
                b2_src = sc_b2_ptr
                slot = pid * CKPT_EVERY + (k - first)
            else:
                w1_src = ck_w1_ptr
                w2_src = ck_w2_ptr
                b1_src = ck_b1_ptr
                b2_src = ck_b2_ptr
                slot = pid * num_ckpt + k
            base1 = slot * D * F
            b1 = tl.load(b1_src + slot * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
            b2 = tl.load(b2_src + slot * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            complete = k < last_complete
            # the adjoint of G: −s_last·(adjoint of W_{k+1}) at a completed mini-batch, else the final-G gradient
            tl.debug_barrier()  # the previous step's reads of adj_* are done
            tl.store(adj_w1_ptr + pid * D * F + offs_d[:, None] * F + offs_f[None, :], dw1, mask=mask_df)
            tl.store(adj_w2_ptr + pid * F * D + offs_f[:, None] * D + offs_d[None, :], dw2, mask=mask_fd)
            tl.debug_barrier()
            if complete:
                g_src1 = adj_w1_ptr
                g_src2 = adj_w2_ptr
                g_factor = -last_scale
                dg_b1 = -last_scale * db1
                dg_b2 = -last_scale * db2
            else:
                g_src1 = dg_w1_out_ptr
                g_src2 = dg_w2_out_ptr
                g_factor = 1.0
                dg_b1 = dg_b1_final
                dg_b2 = dg_b2_final

            token_base = (pid * L + k * M) * D
            xq = _load_tokens(xq_ptr, token_base, offs_m, offs_d, tile_mask, D)
            xk = _load_tokens(xk_ptr, token_base, offs_m, offs_d, tile_mask, D)
            xv = _load_tokens(xv_ptr, token_base, offs_m, offs_d, tile_mask, D)
            d_out = _load_tokens(d_out_ptr, token_base, offs_m, offs_d, tile_mask, D)
            lr = tl.load(lr_ptr + pid * L + k * M + offs_m, mask=m_mask, other=0.0).to(tl.float32)
            target = xv - xk

            # --- recompute the forward of this mini-batch ---
            z1 = tl.dot(xk, _tile(w1_src, base1, offs_d, offs_f, F, 1, mask_df), input_precision=PRECISION)
            z1 += b1[None, :]
            x2 = gelu_tanh(z1)
            z2 = tl.dot(x2, _tile(w2_src, base1, offs_f, offs_d, D, 1, mask_fd), input_precision=PRECISION)
            z2 += b2[None, :]
            grad_z2 = layer_norm_l2_grad(z2, target, ln_w, ln_b, d_mask, D, EPS)
            back = tl.dot(grad_z2, _tile(w2_src, base1, offs_d, offs_f, 1, D, mask_df), input_precision=PRECISION)
            gelu_grad_z1 = gelu_tanh_grad(z1)
            grad_z1 = back * gelu_grad_z1
            eta = tl.where(causal, scale[:, None] * lr[None, :], 0.0)
            qk1 = tl.dot(xq, tl.trans(xk), input_precision=PRECISION) + 1.0
            attn1 = eta * qk1
            z1_bar = (tl.dot(xq, _tile(w1_src, base1, offs_d, offs_f, F, 1, mask_df), input_precision=PRECISION)
                      + b1[None, :] - tl.dot(attn1, grad_z1, input_precision=PRECISION))
            pending_out1 = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)  # X_q G_W1 + g_b1 at k = 0
            if HAS_PENDING:
                if k == 0:
                    p_w1 = _tile(p_w1_ptr, pid * D * F, offs_d, offs_f, F, 1, mask_df)
                    p_b1 = tl.load(p_b1_ptr + pid * F + offs_f, mask=f_mask, other=0.0).to(tl.float32)
                    pending_out1 = tl.dot(xq, p_w1, input_precision=PRECISION) + p_b1[None, :]
                    z1_bar -= scale[:, None] * pending_out1
            x2_bar = gelu_tanh(z1_bar)
            qk2 = tl.dot(x2_bar, tl.trans(x2), input_precision=PRECISION) + 1.0
            attn2 = eta * qk2
            z2_bar = (tl.dot(x2_bar, _tile(w2_src, base1, offs_f, offs_d, D, 1, mask_fd), input_precision=PRECISION)
                      + b2[None, :] - tl.dot(attn2, grad_z2, input_precision=PRECISION))
            pending_out2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # X̄2 G_W2 + g_b2 at k = 0
            if HAS_PENDING:
                if k == 0:
                    p_w2 = _tile(p_w2_ptr, pid * F * D, offs_f, offs_d, D, 1, mask_fd)
                    p_b2 = tl.load(p_b2_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
                    pending_out2 = tl.dot(x2_bar, p_w2, input_precision=PRECISION) + p_b2[None, :]
                    z2_bar -= scale[:, None] * pending_out2

            # --- gradient sums G_W1 = (lr∘X_k)ᵀ ∇Z1, g_b1 = lrᵀ ∇Z1, G_W2 = (lr∘X2)ᵀ ∇Z2, g_b2 = lrᵀ ∇Z2 ---
            v1 = tl.dot(xk, _tile(g_src1, pid * D * F, offs_d, offs_f, F, 1, mask_df), input_precision=PRECISION)
            v2 = tl.dot(x2, _tile(g_src2, pid * F * D, offs_f, offs_d, D, 1, mask_fd), input_precision=PRECISION)
            u1 = g_factor * v1 + dg_b1[None, :]  # X_k (adjoint of G_W1) + adjoint of g_b1
            u2 = g_factor * v2 + dg_b2[None, :]
            d_grad_z1 = lr[:, None] * u1
            d_grad_z2 = lr[:, None] * u2
            d_lr = tl.sum(grad_z1 * u1, axis=1) + tl.sum(grad_z2 * u2, axis=1)
            d_xk = (lr * g_factor)[:, None] * tl.dot(
                grad_z1, _tile(g_src1, pid * D * F, offs_f, offs_d, 1, F, mask_fd), input_precision=PRECISION)
            d_x2 = (lr * g_factor)[:, None] * tl.dot(
                grad_z2, _tile(g_src2, pid * F * D, offs_d, offs_f, 1, D, mask_df), input_precision=PRECISION)
            if complete:  # s_last gets −⟨G, adjoint of W_{k+1}⟩, with ⟨(lr∘X)ᵀ∇Z, A⟩ = Σ lr∘∇Z∘(X A)
                inner = (tl.sum(tl.sum(lr[:, None] * grad_z1 * (v1 + db1[None, :]), axis=1), axis=0)
                         + tl.sum(tl.sum(lr[:, None] * grad_z2 * (v2 + db2[None, :]), axis=1), axis=0))
                if HAS_PENDING:
                    if k == 0:
                        inner += (tl.sum(tl.sum(_tile(p_w1_ptr, pid * D * F, offs_d, offs_f, F, 1, mask_df) * dw1,
                                                axis=1), axis=0)
                                  + tl.sum(tl.sum(_tile(p_w2_ptr, pid * F * D, offs_f, offs_d, D, 1, mask_fd) * dw2,
                                                  axis=1), axis=0)
                                  + tl.sum(tl.load(p_b1_ptr + pid * F + offs_f, mask=f_mask, other=0.0) * db1,
                                           axis=0)
                                  + tl.sum(tl.load(p_b2_ptr + pid * D + offs_d, mask=d_mask, other=0.0) * db2,
                                           axis=0))
                d_scale -= is_last_position * inner

            # --- output and the second layer of the dual form ---
            d_z2_bar, d_ln_w_out, d_ln_b_out = layer_norm_affine_backward(d_out, z2_bar, ln_w, d_mask, D, EPS)
            d_ln_w += d_ln_w_out
            d_ln_b += d_ln_b_out
            d_xq = d_out
            d_x2_bar = tl.dot(d_z2_bar, _tile(w2_src, base1, offs_d, offs_f, 1, D, mask_df), input_precision=PRECISION)
            dw2 += tl.dot(tl.trans(x2_bar), d_z2_bar, input_precision=PRECISION)
            db2 += tl.sum(d_z2_bar, axis=0)
            d_attn2 = -tl.dot(d_z2_bar, tl.trans(grad_z2), input_precision=PRECISION)
            d_grad_z2 -= tl.dot(tl.trans(attn2), d_z2_bar, input_precision=PRECISION)
            if HAS_PENDING:
                if k == 0:
                    scaled = scale[:, None] * d_z2_bar
                    d_scale -= tl.sum(pending_out2 * d_z2_bar, axis=1)
                    dp_w2 = (g_factor * _tile(g_src2, pid * F * D, offs_f, offs_d, D, 1, mask_fd)
                             - tl.dot(tl.trans(x2_bar), scaled, input_precision=PRECISION))
                    tl.store(dp_w2_ptr + pid * F * D + offs_f[:, None] * D + offs_d[None, :], dp_w2, mask=mask_fd)
                    tl.store(dp_b2_ptr + pid * D + offs_d, dg_b2 - tl.sum(scaled, axis=0), mask=d_mask)
                    d_x2_bar -= tl.dot(scaled, _tile(p_w2_ptr, pid * F * D, offs_d, offs_f, 1, D, mask_df),
                                       input_precision=PRECISION)
            d_eta = tl.where(causal, d_attn2 * qk2, 0.0)
            d_qk2 = d_attn2 * eta
            d_x2_bar += tl.dot(d_qk2, x2, input_precision=PRECISION)
            d_x2 += tl.dot(tl.trans(d_qk2), x2_bar, input_precision=PRECISION)

            # --- first layer of the dual form ---
            d_z1_bar = d_x2_bar * gelu_tanh_grad(z1_bar)
            d_xq += tl.dot(d_z1_bar, _tile(w1_src, base1, offs_f, offs_d, 1, F, mask_fd), input_precision=PRECISION)
            dw1 += tl.dot(tl.trans(xq), d_z1_bar, input_precision=PRECISION)
            db1 += tl.sum(d_z1_bar, axis=0)
            d_attn1 = -tl.dot(d_z1_bar, tl.trans(grad_z1), input_precision=PRECISION)
            d_grad_z1 -= tl.dot(tl.trans(attn1), d_z1_bar, input_precision=PRECISION)
            if HAS_PENDING:
                if k == 0:
                    scaled = scale[:, None] * d_z1_bar
                    d_scale -= tl.sum(pending_out1 * d_z1_bar, axis=1)
                    dp_w1 = (g_factor * _tile(g_src1, pid * D * F, offs_d, offs_f, F, 1, mask_df)
                             - tl.dot(tl.trans(xq), scaled, input_precision=PRECISION))
                    tl.store(dp_w1_ptr + pid * D * F + offs_d[:, None] * F + offs_f[None, :], dp_w1, mask=mask_df)
                    tl.store(dp_b1_ptr + pid * F + offs_f, dg_b1 - tl.sum(scaled, axis=0), mask=f_mask)
                    d_xq -= tl.dot(scaled, _tile(p_w1_ptr, pid * D * F, offs_f, offs_d, 1, F, mask_fd),
                                   input_precision=PRECISION)
            d_eta += tl.where(causal, d_attn1 * qk1, 0.0)
            d_qk1 = d_attn1 * eta
            d_xq += tl.dot(d_qk1, xk, input_precision=PRECISION)
            d_xk += tl.dot(tl.trans(d_qk1), xq, input_precision=PRECISION)
            d_scale += tl.sum(d_eta * lr[None, :], axis=1)
            d_lr += tl.sum(d_eta * scale[:, None], axis=0)

            # --- ∇Z1 = (∇Z2 W2ᵀ) ∘ gelu′(Z1) and ∇Z2 = LN-l2 gradient of Z2 ---
            d_back = d_grad_z1 * gelu_grad_z1
            d_z1 = d_grad_z1 * back * gelu_tanh_second_grad(z1)
            d_grad_z2 += tl.dot(d_back, _tile(w2_src, base1, offs_f, offs_d, D, 1, mask_fd), input_precision=PRECISION)
            dw2 += tl.dot(tl.trans(d_back), grad_z2, input_precision=PRECISION)
            d_z2, d_target, d_ln_w_inner, d_ln_b_inner = layer_norm_l2_grad_backward(
                d_grad_z2, z2, target, ln_w, ln_b, d_mask, D, EPS)
            d_ln_w += d_ln_w_inner
            d_ln_b += d_ln_b_inner
            d_x2 += tl.dot(d_z2, _tile(w2_src, base1, offs_d, offs_f, 1, D, mask_df), input_precision=PRECISION)
            dw2 += tl.dot(tl.trans(x2), d_z2, input_precision=PRECISION)
            db2 += tl.sum(d_z2, axis=0)
            d_z1 += d_x2 * gelu_grad_z1
            d_xk += tl.dot(d_z1, _tile(w1_src, base1, offs_f, offs_d, 1, F, mask_fd), input_precision=PRECISION)
            d_xk -= d_target
            dw1 += tl.dot(tl.trans(xk), d_z1, input_precision=PRECISION)
            db1 += tl.sum(d_z1, axis=0)

            tile = token_base + offs_m[:, None] * D + offs_d[None, :]
            tl.store(d_xq_ptr + tile, d_xq, mask=tile_mask)
            tl.store(d_xk_ptr + tile, d_xk, mask=tile_mask)
            tl.store(d_xv_ptr + tile, d_target, mask=tile_mask)
            tl.store(d_lr_ptr + pid * L + k * M + offs_m, d_lr, mask=m_mask)
        tl.debug_barrier()  # the next segment overwrites the scratch

    _store_params(dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, pid, dw1, db1, dw2, db2, offs_d, offs_f, d_mask, f_mask, D, F)
    tl.store(d_scale_ptr + pid * BLOCK_M + offs_m, d_scale)
    tl.store(d_ln_w_ptr + pid * BLOCK_D + offs_d, d_ln_w)
    tl.store(d_ln_b_ptr + pid * BLOCK_D + offs_d, d_ln_b)
