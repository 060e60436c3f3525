"""Fused chunk kernels of TTT-Linear (dual form, Sec. 2.6), forward and backward.

One program per (batch row, head) walks the whole aligned frame mini-batch by mini-batch, keeping the inner
weights `W [D, D]`, `b [D]` in registers (fp32) from the first mini-batch to the last. See `interface.py` for how
a chunk is laid out into the frame and for the meaning of `end` (frame slots a row uses).

Per mini-batch k (tokens of the mini-batch as rows of `[M, D]` tiles), with W, b at the mini-batch start:

    Z    = X_k W + b                                 inner model on the training view
    ∇Z   = LN-l2 gradient of Z against X_v − X_k      (reference `layer_norm_l2_grad`)
    η    = tril(s_i · lr_j)                           (Eq. 7)
    Z̄    = X_q W + b − (η ∘ (X_q X_kᵀ + 1)) ∇Z  [− s_i (X_q G_W + G_b) for the first mini-batch with a pending G]
    out  = X_q + LN(Z̄)·w + b_ln
    G    = (lr ∘ X_k)ᵀ ∇Z [+ G_pending],  g_b = lrᵀ ∇Z [+ g_pending]
    complete (k < end // M):  W ← W − s_{M−1} G,  b ← b − s_{M−1} g_b
    otherwise (the row's last mini-batch): G, g_b are the pending sums of the final state.

Mini-batches after a row's last one hold no real tokens, so the program stops there (outputs stay zero).
"""

import triton
import triton.language as tl

from ._common import layer_norm_affine, layer_norm_affine_backward, layer_norm_l2_grad, layer_norm_l2_grad_backward


@triton.jit
def _load_tokens(ptr, base, offs_m, offs_d, mask, D: tl.constexpr):
    return tl.load(ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _linear_grad_sums(xk, xv, lr, w, b, ln_w, ln_b, d_mask, D: tl.constexpr, EPS: tl.constexpr,
                      PRECISION: tl.constexpr):
    """∇Z at (W, b) and the mini-batch's lr-weighted gradient sums."""
    z = tl.dot(xk, w, input_precision=PRECISION) + b[None, :]
    grad_z = layer_norm_l2_grad(z, xv - xk, ln_w, ln_b, d_mask, D, EPS)
    grad_w = tl.dot(tl.trans(lr[:, None] * xk), grad_z, input_precision=PRECISION)
    grad_b = tl.sum(lr[:, None] * grad_z, axis=0)
    return grad_z, grad_w, grad_b


@triton.jit
def ttt_linear_fwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr,  # [B, H, L, D] ×3, [B, H, L] (frame layout, contiguous)
    scale_ptr, ln_w_ptr, ln_b_ptr,  # [M], [H, D], [H, D]
    w_ptr, b_ptr, pending_w_ptr, pending_b_ptr,  # initial state [B, H, D, D], [B, H, D] (+ pending G)
    end_ptr,  # [B] int32: frame slots used by each row (shift + real tokens)
    out_ptr, w_out_ptr, b_out_ptr, grad_w_out_ptr, grad_b_out_ptr,  # outputs (out and G pre-zeroed)
    ckpt_w_ptr, ckpt_b_ptr,  # [B·H, ceil(K / CKPT_EVERY), D, D], [.., D]: W, b at every CKPT_EVERY-th mini-batch
    H, L, NUM_MB, CKPT_EVERY,
    D: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_PENDING: tl.constexpr, SAVE_CKPT: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b·H + h (64-bit: offsets of the saved states get large)
    batch = pid // H
    head = pid % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D
    tile_mask = m_mask[:, None] & d_mask[None, :]
    square_mask = d_mask[:, None] & d_mask[None, :]
    square = offs_d[:, None] * D + offs_d[None, :]

    ln_w = tl.load(ln_w_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + head * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
    last_scale = tl.load(scale_ptr + M - 1).to(tl.float32)
    causal = offs_m[:, None] >= offs_m[None, :]

    w = tl.load(w_ptr + pid * D * D + square, mask=square_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    end = tl.load(end_ptr + batch)
    last_complete = end // M  # mini-batches [0, last_complete) are complete for this row
    num_steps = tl.minimum(NUM_MB, last_complete + 1)

    grad_w = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    grad_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(0, num_steps):
        if SAVE_CKPT:
            if k % CKPT_EVERY == 0:
                slot = pid * tl.cdiv(NUM_MB, CKPT_EVERY) + k // CKPT_EVERY
                tl.store(ckpt_w_ptr + slot * D * D + square, w, mask=square_mask)
                tl.store(ckpt_b_ptr + slot * D + offs_d, b, mask=d_mask)
        token_base = (pid * L + k * M) * D
        xq = _load_tokens(xq_ptr, token_base, offs_m, offs_d, tile_mask, D)
        xk = _load_tokens(xk_ptr, token_base, offs_m, offs_d, tile_mask, D)
        xv = _load_tokens(xv_ptr, token_base, offs_m, offs_d, tile_mask, D)
        lr = tl.load(lr_ptr + pid * L + k * M + offs_m, mask=m_mask, other=0.0).to(tl.float32)

        grad_z, grad_w, grad_b = _linear_grad_sums(xk, xv, lr, w, b, ln_w, ln_b, d_mask, D, EPS, PRECISION)
        eta = tl.where(causal, scale[:, None] * lr[None, :], 0.0)
        attn = eta * (tl.dot(xq, tl.trans(xk), input_precision=PRECISION) + 1.0)
        z_bar = (tl.dot(xq, w, input_precision=PRECISION) + b[None, :]
                 - tl.dot(attn, grad_z, input_precision=PRECISION))
        if HAS_PENDING:
            if k == 0:  # tokens continuing a mini-batch also see the gradients already summed in G
                pending_w = tl.load(pending_w_ptr + pid * D * D + square, mask=square_mask, other=0.0)
                pending_b = tl.load(pending_b_ptr + pid * D + offs_d, mask=d_mask, other=0.0)
                pending_w = pending_w.to(tl.float32)
                pending_b = pending_b.to(tl.float32)
                pending_out = tl.dot(xq, pending_w, input_precision=PRECISION) + pending_b[None, :]
                z_bar -= scale[:, None] * pending_out
                grad_w += pending_w
                grad_b += pending_b
        out = xq + layer_norm_affine(z_bar, ln_w, ln_b, d_mask, D, EPS)
        tl.store(out_ptr + token_base + offs_m[:, None] * D + offs_d[None, :], out, mask=tile_mask)
        step = tl.where(k < last_complete, last_scale, 0.0)  # W₀ ← W₀ − s_last·G at a completed mini-batch
        w -= step * grad_w
        b -= step * grad_b

    tl.store(w_out_ptr + pid * D * D + square, w, mask=square_mask)
    tl.store(b_out_ptr + pid * D + offs_d, b, mask=d_mask)
    if last_complete < NUM_MB:  # the row ends inside mini-batch `last_complete`: its sums stay pending
        tl.store(grad_w_out_ptr + pid * D * D + square, grad_w, mask=square_mask)
        tl.store(grad_b_out_ptr + pid * D + offs_d, grad_b, mask=d_mask)


@triton.jit
def ttt_linear_bwd_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, scale_ptr, ln_w_ptr, ln_b_ptr,
    pending_w_ptr, pending_b_ptr, end_ptr,
    ckpt_w_ptr, ckpt_b_ptr,  # saved by the forward
    scratch_w_ptr, scratch_b_ptr,  # [B·H, CKPT_EVERY, D, D], [.., D]: weights recomputed inside a segment
    d_out_ptr, d_w_out_ptr, d_b_out_ptr, d_grad_w_out_ptr, d_grad_b_out_ptr,  # incoming gradients
    d_xq_ptr, d_xk_ptr, d_xv_ptr, d_lr_ptr,  # [B, H, L, D] ×3, [B, H, L] (pre-zeroed)
    d_scale_ptr, d_ln_w_ptr, d_ln_b_ptr,  # per program partial sums [B·H, BLOCK_M], [B·H, BLOCK_D] ×2
    d_w_ptr, d_b_ptr, d_pending_w_ptr, d_pending_b_ptr,  # gradients of the initial state
    H, L, NUM_MB, CKPT_EVERY,
    D: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_PENDING: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // H
    head = pid % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D
    tile_mask = m_mask[:, None] & d_mask[None, :]
    square_mask = d_mask[:, None] & d_mask[None, :]
    square = offs_d[:, None] * D + offs_d[None, :]

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
    d_w = tl.load(d_w_out_ptr + pid * D * D + square, mask=square_mask, other=0.0).to(tl.float32)
    d_b = tl.load(d_b_out_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    d_grad_w_final = tl.load(d_grad_w_out_ptr + pid * D * D + square, mask=square_mask, other=0.0).to(tl.float32)
    d_grad_b_final = tl.load(d_grad_b_out_ptr + pid * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    d_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_ln_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_ln_b = tl.zeros((BLOCK_D,), dtype=tl.float32)

    num_segments = tl.cdiv(num_steps, CKPT_EVERY)
    for segment_rev in range(0, num_segments):
        segment = num_segments - 1 - segment_rev
        first = segment * CKPT_EVERY
        stop = tl.minimum(first + CKPT_EVERY, num_steps)
        ckpt = pid * num_ckpt + segment
        if CKPT_EVERY > 1:
            # Recompute the weights at the start of every mini-batch of the segment from its checkpoint.
            w = tl.load(ckpt_w_ptr + ckpt * D * D + square, mask=square_mask, other=0.0)
            b = tl.load(ckpt_b_ptr + ckpt * D + offs_d, mask=d_mask, other=0.0)
            for k in range(first, stop):
                slot = pid * CKPT_EVERY + (k - first)
                tl.store(scratch_w_ptr + slot * D * D + square, w, mask=square_mask)
                tl.store(scratch_b_ptr + slot * D + offs_d, b, mask=d_mask)
                if k < stop - 1:  # such a mini-batch is complete (only a row's last one can be partial)
                    token_base = (pid * L + k * M) * D
                    xk = _load_tokens(xk_ptr, token_base, offs_m, offs_d, tile_mask, D)
                    xv = _load_tokens(xv_ptr, token_base, offs_m, offs_d, tile_mask, D)
                    lr = tl.load(lr_ptr + pid * L + k * M + offs_m, mask=m_mask, other=0.0).to(tl.float32)
                    _, grad_w, grad_b = _linear_grad_sums(xk, xv, lr, w, b, ln_w, ln_b, d_mask, D, EPS, PRECISION)
                    if HAS_PENDING:
                        if k == 0:
                            grad_w += tl.load(pending_w_ptr + pid * D * D + square, mask=square_mask,
                                              other=0.0).to(tl.float32)
                            grad_b += tl.load(pending_b_ptr + pid * D + offs_d, mask=d_mask,
                                              other=0.0).to(tl.float32)
                    w -= last_scale * grad_w
                    b -= last_scale * grad_b
            tl.debug_barrier()  # the scratch written above is read back by other threads of this program

        for k_rev in range(0, stop - first):
            k = stop - 1 - k_rev
            if CKPT_EVERY > 1:
                slot = pid * CKPT_EVERY + (k - first)
                w = tl.load(scratch_w_ptr + slot * D * D + square, mask=square_mask, other=0.0)
                b = tl.load(scratch_b_ptr + slot * D + offs_d, mask=d_mask, other=0.0)
            else:
                w = tl.load(ckpt_w_ptr + (pid * num_ckpt + k) * D * D + square, mask=square_mask, other=0.0)
                b = tl.load(ckpt_b_ptr + (pid * num_ckpt + k) * D + offs_d, mask=d_mask, other=0.0)
            token_base = (pid * L + k * M) * D
            xq = _load_tokens(xq_ptr, token_base, offs_m, offs_d, tile_mask, D)
            xk = _load_tokens(xk_ptr, token_base, offs_m, offs_d, tile_mask, D)
            xv = _load_tokens(xv_ptr, token_base, offs_m, offs_d, tile_mask, D)
            d_out = _load_tokens(d_out_ptr, token_base, offs_m, offs_d, tile_mask, D)
            lr = tl.load(lr_ptr + pid * L + k * M + offs_m, mask=m_mask, other=0.0).to(tl.float32)
            target = xv - xk

            # --- recompute the forward of this mini-batch ---
            z = tl.dot(xk, w, input_precision=PRECISION) + b[None, :]
            grad_z = layer_norm_l2_grad(z, target, ln_w, ln_b, d_mask, D, EPS)
            eta = tl.where(causal, scale[:, None] * lr[None, :], 0.0)
            qk = tl.dot(xq, tl.trans(xk), input_precision=PRECISION) + 1.0
            attn = eta * qk
            z_bar = (tl.dot(xq, w, input_precision=PRECISION) + b[None, :]
                     - tl.dot(attn, grad_z, input_precision=PRECISION))
            grad_w = tl.dot(tl.trans(lr[:, None] * xk), grad_z, input_precision=PRECISION)
            grad_b = tl.sum(lr[:, None] * grad_z, axis=0)
            pending_out = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # X_q G_W + g_b at k = 0
            if HAS_PENDING:
                if k == 0:
                    pending_w = tl.load(pending_w_ptr + pid * D * D + square, mask=square_mask, other=0.0)
                    pending_b = tl.load(pending_b_ptr + pid * D + offs_d, mask=d_mask, other=0.0)
                    pending_w = pending_w.to(tl.float32)
                    pending_b = pending_b.to(tl.float32)
                    pending_out = tl.dot(xq, pending_w, input_precision=PRECISION) + pending_b[None, :]
                    z_bar -= scale[:, None] * pending_out
                    grad_w += pending_w
                    grad_b += pending_b

            # --- the update at the mini-batch end ---
            complete = k < last_complete
            if complete:  # W_{k+1} = W_k − s_last·G: G gets −s_last·(adjoint of W_{k+1}), s_last gets −⟨G, ·⟩
                d_grad_w = -last_scale * d_w
                d_grad_b = -last_scale * d_b
                d_scale -= is_last_position * (tl.sum(tl.sum(grad_w * d_w, axis=1), axis=0)
                                               + tl.sum(grad_b * d_b, axis=0))
            else:  # the row's last mini-batch: G is the final pending sum
                d_grad_w = d_grad_w_final
                d_grad_b = d_grad_b_final

            # --- gradient sums G = (lr∘X_k)ᵀ ∇Z, g_b = lrᵀ ∇Z ---
            u = tl.dot(xk, d_grad_w, input_precision=PRECISION) + d_grad_b[None, :]
            d_grad_z = lr[:, None] * u
            d_lr = tl.sum(grad_z * u, axis=1)
            d_xk = lr[:, None] * tl.dot(grad_z, tl.trans(d_grad_w), input_precision=PRECISION)

            # --- output: out = X_q + LN(Z̄) ---
            d_z_bar, d_ln_w_out, d_ln_b_out = layer_norm_affine_backward(d_out, z_bar, ln_w, d_mask, D, EPS)
            d_ln_w += d_ln_w_out
            d_ln_b += d_ln_b_out
            d_xq = d_out + tl.dot(d_z_bar, tl.trans(w), input_precision=PRECISION)
            d_w += tl.dot(tl.trans(xq), d_z_bar, input_precision=PRECISION)
            d_b += tl.sum(d_z_bar, axis=0)
            d_attn = -tl.dot(d_z_bar, tl.trans(grad_z), input_precision=PRECISION)
            d_grad_z -= tl.dot(tl.trans(attn), d_z_bar, input_precision=PRECISION)
            if HAS_PENDING:
                if k == 0:
                    pending_w = tl.load(pending_w_ptr + pid * D * D + square, mask=square_mask, other=0.0)
                    pending_w = pending_w.to(tl.float32)
                    scaled_d_z_bar = scale[:, None] * d_z_bar
                    d_scale -= tl.sum(pending_out * d_z_bar, axis=1)
                    d_xq -= tl.dot(scaled_d_z_bar, tl.trans(pending_w), input_precision=PRECISION)
                    d_pending_w = d_grad_w - tl.dot(tl.trans(xq), scaled_d_z_bar, input_precision=PRECISION)
                    d_pending_b = d_grad_b - tl.sum(scaled_d_z_bar, axis=0)
                    tl.store(d_pending_w_ptr + pid * D * D + square, d_pending_w, mask=square_mask)
                    tl.store(d_pending_b_ptr + pid * D + offs_d, d_pending_b, mask=d_mask)

            # --- attn = η ∘ (X_q X_kᵀ + 1), η_ij = s_i·lr_j (j ≤ i) ---
            d_eta = tl.where(causal, d_attn * qk, 0.0)
            d_qk = d_attn * eta
            d_xq += tl.dot(d_qk, xk, input_precision=PRECISION)
            d_xk += tl.dot(tl.trans(d_qk), xq, input_precision=PRECISION)
            d_scale += tl.sum(d_eta * lr[None, :], axis=1)
            d_lr += tl.sum(d_eta * scale[:, None], axis=0)

            # --- ∇Z = LN-l2 gradient of Z = X_k W + b against X_v − X_k ---
            d_z, d_target, d_ln_w_inner, d_ln_b_inner = layer_norm_l2_grad_backward(
                d_grad_z, z, target, ln_w, ln_b, d_mask, D, EPS)
            d_ln_w += d_ln_w_inner
            d_ln_b += d_ln_b_inner
            d_xk += tl.dot(d_z, tl.trans(w), input_precision=PRECISION) - d_target
            d_w += tl.dot(tl.trans(xk), d_z, input_precision=PRECISION)
            d_b += tl.sum(d_z, axis=0)

            tile = token_base + offs_m[:, None] * D + offs_d[None, :]
            tl.store(d_xq_ptr + tile, d_xq, mask=tile_mask)
            tl.store(d_xk_ptr + tile, d_xk, mask=tile_mask)
            tl.store(d_xv_ptr + tile, d_target, mask=tile_mask)
            tl.store(d_lr_ptr + pid * L + k * M + offs_m, d_lr, mask=m_mask)
        tl.debug_barrier()  # the next segment overwrites the scratch

    tl.store(d_w_ptr + pid * D * D + square, d_w, mask=square_mask)
    tl.store(d_b_ptr + pid * D + offs_d, d_b, mask=d_mask)
    tl.store(d_scale_ptr + pid * BLOCK_M + offs_m, d_scale)
    tl.store(d_ln_w_ptr + pid * BLOCK_D + offs_d, d_ln_w)
    tl.store(d_ln_b_ptr + pid * BLOCK_D + offs_d, d_ln_b)
