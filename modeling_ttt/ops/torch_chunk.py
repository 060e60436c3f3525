"""The PyTorch backend of the TTT inner loop (`ttt_impl="torch"`, and what the CPU runs): the same results as the
spec in `naive.py` (tests/test_ops_naive.py), computed fast.

Notation as in `naive.py` and `state.py`. Inside a call, whole mini-batches use the dual form (Sec. 2.6): the
per-token weights are never materialised; the correction is a masked `M×M` product instead. Rows at different
positions and right padding are laid out in the aligned frame of `frame.py`. A chunk that ends inside every row's
current mini-batch (a short prompt) skips the frame: the same step is applied to its `T` slots directly, each with
the token scale of its own position (`_ttt_within_mini_batch`); one token per row (decoding) takes the primal form
directly (`_ttt_one_token`). Precision: `state.py`.

Speed notes (CPU, where this file is what runs): TTT-Linear's loop works on `[W; b]` with a constant-1 input
feature, so each mini-batch is seven kernels (two products with `W₀`, the LayerNorm-l2 gradient as ATen's LayerNorm
forward and backward, the dual correction, the weight update); everything independent of the inner weights is
computed for all mini-batches before the loop; without autograd the weight update happens in place. Under
autograd, TTT-Linear's loop over whole mini-batches is one autograd function with a hand-written backward
(`linear_scan.py`), whose loops the C++ backend (`modeling_ttt.ops.cpu`) runs as kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .frame import check_inputs, from_frame, make_frame, to_frame
from .linear_scan import linear_scan
from .state import LAYER_NORM_EPS, InnerLoopParams, InnerState, in_inner_dtype
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------------------------------------------
# Elementwise pieces
# --------------------------------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """LayerNorm over the last axis with a `weight`/`bias` that broadcast against `x` (per head, per row)."""
    return torch.addcmul(bias, F.layer_norm(x, (x.shape[-1],), eps=eps), weight)


def layer_norm_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = LAYER_NORM_EPS
) -> torch.Tensor:
    """∂ℓ/∂z for ℓ = ½·‖LN(z) − target‖² summed over the last axis, i.e. the LayerNorm backward fused with the
    l2 loss (the official code drops the factor 2 of ‖·‖²; so do we)."""
    dim = z.shape[-1]
    mean = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    inv_std = torch.rsqrt(var + eps)
    z_hat = (z - mean) * inv_std
    grad_z_hat = (weight * z_hat + bias - target) * weight
    return (
        dim * grad_z_hat
        - grad_z_hat.sum(dim=-1, keepdim=True)
        - z_hat * (grad_z_hat * z_hat).sum(dim=-1, keepdim=True)
    ) * (inv_std / dim)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """Derivative of the tanh-approximated GELU."""
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))
    tanh_inner = torch.tanh(inner)
    return 0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - tanh_inner.pow(2)) * _SQRT_2_OVER_PI * (
        1.0 + 3 * 0.044715 * x.pow(2)
    )


# --------------------------------------------------------------------------------------------------------------
# The chunk function
# --------------------------------------------------------------------------------------------------------------


def _ttt_chunk(
    layer_type: str,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    params: InnerLoopParams,
    state: InnerState,
    num_tokens: torch.Tensor | None,
    scan_kernels: bool = False,
) -> tuple[torch.Tensor, InnerState]:
    batch, heads, seq_len, head_dim = xq.shape
    rows = batch * heads  # the loop works on [B·H, ...] so every product is one batched matmul
    token_scale, ln_weight, ln_bias = params.tensors()
    mini_batch_size = token_scale.shape[0]
    if batch > 0 and seq_len == 1 and num_tokens is None:  # decoding
        return _ttt_one_token(layer_type, xq, xk, xv, inner_lr, params, state)
    if batch > 0 and seq_len <= mini_batch_size:
        # Host-side bookkeeping (one sync): where each row's chunk ends inside its current mini-batch.
        shift = state.seen % mini_batch_size
        shifts = shift.tolist()
        counts = num_tokens.tolist() if num_tokens is not None else [seq_len] * batch
        ends = [s + c for s, c in zip(shifts, counts)]
        if max(ends) <= mini_batch_size:
            # Every row's chunk ends inside (or at the end of) its current mini-batch: decoding, short prompts.
            return _ttt_within_mini_batch(layer_type, xq, xk, xv, inner_lr, params, state, num_tokens, shift, shifts,
                                          ends)
    frame = make_frame(state.seen, num_tokens, seq_len, mini_batch_size)
    num_mini_batches = frame.length // mini_batch_size

    def to_steps(x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, *] -> [K, B, H, M, *], a view where the frame allows (the step inputs below are built from
        it in one pass each, already in step-major order)."""
        return to_frame(x, frame).unflatten(2, (num_mini_batches, mini_batch_size)).movedim(2, 0)

    lr_s = to_steps(inner_lr)  # [K, B, H, M]; zero at unused slots
    pending_scale = token_scale.view(-1, 1)  # [M, 1]: slot i of every row sits at position i
    # Everything that does not depend on the inner weights is computed for all mini-batches at once.
    # Under autograd, TTT-Linear runs the scan of linear_scan.py, which takes the learning rates themselves
    scan = layer_type == "linear" and torch.is_grad_enabled()
    per_step, _ = _step_inputs(layer_type, to_steps(xq), to_steps(xk), to_steps(xv), lr_s, pending_scale,
                               ln_weight.unsqueeze(1), ln_bias.unsqueeze(1), with_lr_xk_t=not scan)
    per_step = tuple(None if x is None else x.flatten(1, 2) for x in per_step)  # [K, B·H, ...]: step k reads slice k
    ln_w, ln_b = _per_row(ln_weight, batch), _per_row(ln_bias, batch)
    ln_w_sq = ln_w * ln_w

    # Per mini-batch: does each row finish it (then W₀ takes the step and G resets)?
    completes = (torch.arange(1, num_mini_batches + 1, device=xq.device).unsqueeze(1) * mini_batch_size
                 <= frame.end.unsqueeze(0))  # [K, B]
    all_complete = completes.all(dim=1).tolist()
    none_complete = (~completes.any(dim=1)).tolist()
    row_completes = completes.repeat_interleave(heads, dim=1).view(num_mini_batches, rows, 1, 1)
    # Rows starting at a mini-batch boundary have G = 0 (the invariant of InnerState), so G is only read when
    # some row starts mid-mini-batch, and only by the first step.
    has_pending = not frame.identity and bool(frame.shift.any())
    neg_last_scale = -token_scale[-1]
    step = _linear_step if layer_type == "linear" else _mlp_step
    num_weights = 1 if layer_type == "linear" else 4  # TTT-Linear's loop works on [W; b] (see `_pack`)

    # Inference with TTT-Linear: the packed [W; b] is this call's own buffer (`_pack` concatenates), so whole
    # mini-batches update it in place and write their outputs into one preallocated tensor. This skips two large
    # allocations per step, which cost more than the arithmetic at these sizes.
    in_place = layer_type == "linear" and not torch.is_grad_enabled()
    neg_last = float(neg_last_scale) if in_place else None

    def run_steps(first: int, stop: int, grads_are_zero: bool, *carry_and_inputs: torch.Tensor):
        weights = carry_and_inputs[:num_weights]
        grads = None if grads_are_zero else carry_and_inputs[num_weights : 2 * num_weights]
        inputs = carry_and_inputs[2 * num_weights :]
        outputs = torch.empty(stop - first, rows, mini_batch_size, head_dim, dtype=xq.dtype, device=xq.device) \
            if in_place else []
        if scan:  # training: the scan as one autograd function (linear_scan.py)
            completes_here = None if all(all_complete[first:stop]) else row_completes[first:stop].to(xq.dtype)
            read_pending = first == 0 and has_pending
            xk_1, xq_1, ln_target, dual, _, lr = inputs
            z_bar, w_b, g_b = linear_scan(weights[0], grads[0] if grads is not None else None, xk_1, xq_1, ln_target,
                                          dual, lr, ln_w_sq, pending_scale, neg_last_scale.neg(), completes_here,
                                          read_pending, scan_kernels)
            return w_b, g_b, z_bar
        # One unbind per input instead of an index per step: under autograd, each `x[k]` would give back a
        # gradient as large as all of `x` (zeros but one slice) and the K of them would be summed, O(K²) work;
        # unbind's backward stacks the K slices once.
        per_step_inputs = tuple(zip(*(x.unbind(0) for x in inputs)))
        for k in range(first, stop):
            step_inputs = per_step_inputs[k - first]
            pending = grads if (k == 0 and has_pending) else None
            if in_place and grads is None and pending is None and all_complete[k]:
                # W₀ ← W₀ − s_last · Σ_j (lr_j [x_k,j, 1])ᵀ ∇_z ℓ_j, in place
                _, grad_z = _linear_dual(weights[0], step_inputs, ln_w_sq, out=outputs[k - first])
                weights[0].baddbmm_(step_inputs[4], grad_z, alpha=neg_last)
                continue
            z_bar, increments = step(weights, pending, step_inputs, pending_scale, ln_w_sq)
            if in_place:
                outputs[k - first] = z_bar
            else:
                outputs.append(z_bar)
            summed = increments if grads is None else tuple(g + d for g, d in zip(grads, increments))
            weights, grads = _end_of_chunk_update(weights, summed, all_complete[k], none_complete[k],
                                                  lambda: row_completes[k], neg_last_scale)
        if grads is None:
            grads = tuple(torch.zeros_like(w) for w in weights)
        return (*weights, *grads, outputs if in_place else torch.stack(outputs))

    carry = (*_pack(layer_type, state.weights, rows), *_pack(layer_type, state.grads, rows))
    grads_are_zero = not has_pending
    checkpoint_group = params.checkpoint_group
    group = checkpoint_group if (checkpoint_group > 0 and torch.is_grad_enabled()) else num_mini_batches
    z_bars = []
    for first in range(0, num_mini_batches, group):
        stop = min(first + group, num_mini_batches)
        inputs = tuple(None if x is None else x[first:stop] for x in per_step)
        if group < num_mini_batches:
            result = checkpoint(run_steps, first, stop, grads_are_zero, *carry, *inputs, use_reentrant=False)
        else:
            result = run_steps(first, stop, grads_are_zero, *carry, *inputs)
        carry, z_bar = result[:-1], result[-1]
        grads_are_zero = False
        z_bars.append(z_bar)
    z_bar = torch.cat(z_bars) if len(z_bars) > 1 else z_bars[0]  # [K, BH, M, d]

    # Output rule (Sec. 2.7): residual x_q + LN(f(x_q; W_i)), LayerNorm batched over the whole chunk.
    xq_s = per_step[1][..., :head_dim] if layer_type == "linear" else per_step[0]
    out = xq_s + layer_norm(z_bar, ln_w, ln_b)
    out = out.view(num_mini_batches, batch, heads, mini_batch_size, head_dim).movedim(0, 2)
    out = from_frame(out.reshape(batch, heads, frame.length, head_dim), frame, seq_len)

    new_weights = _unpack(layer_type, carry[:num_weights], batch, heads)
    new_grads = _unpack(layer_type, carry[num_weights:], batch, heads)
    count = num_tokens if num_tokens is not None else torch.full_like(state.seen, seq_len)
    return out, InnerState(new_weights, new_grads, state.seen + count)


def _ttt_one_token(
    layer_type: str,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    params: InnerLoopParams,
    state: InnerState,
) -> tuple[torch.Tensor, InnerState]:
    """`_ttt_chunk` for exactly one real token per row (decoding), in the primal form: Eq. 6/7 read literally for
    token `t` at position `p` of its mini-batch. Its gradient at `W₀` joins the pending sum, `G ← G + lr_t·∇ℓ_t(W₀)`;
    its weights are `W_t = W₀ − s_p·G`; when it ends its row's mini-batch (`p = M−1`), `W_t` becomes the next `W₀`
    and `G` resets. The same numbers as the dual form with far fewer kernels, which is what decoding pays for.
    Mid-mini-batch, `W_t` is never formed: `x·W_t + b_t = x·W₀ + b₀ − s_p·(x·G_W + G_b)` reads `W₀` and `G` once
    each instead of writing and re-reading a weight-sized tensor."""
    batch, heads, _, head_dim = xq.shape
    rows = batch * heads
    token_scale, ln_weight, ln_bias = params.tensors()
    mini_batch_size = token_scale.shape[0]
    position = state.seen % mini_batch_size  # [B]
    positions = position.tolist()  # host-side bookkeeping (one sync)
    if all(p == positions[0] for p in positions):
        scale = token_scale[positions[0]]  # s_p, shared by every row
    else:
        scale = token_scale[position].repeat_interleave(heads).view(rows, 1, 1)
    xq, xk, xv = (x.reshape(rows, 1, head_dim) for x in (xq, xk, xv))
    lr = inner_lr.reshape(rows, 1, 1)
    ln_w, ln_b = _per_row(ln_weight, batch), _per_row(ln_bias, batch)
    ln_target = _ln_target(xk, xv, ln_w, ln_b)
    weights = tuple(w.reshape(rows, *w.shape[2:]) for w in state.weights)
    grads = None if not any(positions) else tuple(g.reshape(rows, *g.shape[2:]) for g in state.grads)  # G = 0
    completes = [p == mini_batch_size - 1 for p in positions]

    def add_to_pending(i: int, x_t: torch.Tensor, lr_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G_W += x_tᵀ·(lr·∇_z), G_b += lr·∇_z for the weight pair (W, b) number `i`."""
        if grads is None:
            return x_t.transpose(1, 2) * lr_grad, lr_grad
        # a rank-1 update: one elementwise pass (a matmul with an inner size of 1 is slower)
        return torch.addcmul(grads[2 * i], x_t.transpose(1, 2), lr_grad), grads[2 * i + 1] + lr_grad

    def at_current(i: int, x: torch.Tensor) -> torch.Tensor:
        """`x·W_t + b_t` for the weight pair number `i`, from `W₀` and the updated `G`."""
        w, b, g_w, g_b = weights[2 * i], weights[2 * i + 1], new_grads[2 * i], new_grads[2 * i + 1]
        if any(completes):  # W_t is the next state anyway
            return torch.baddbmm(current[2 * i + 1], x, current[2 * i])
        out = torch.baddbmm(torch.baddbmm(b, x, w), x * scale, g_w, alpha=-1.0)
        return torch.addcmul(out, g_b, scale, value=-1.0)

    if layer_type == "linear":
        w1, b1 = weights
        grad_z = _l2_grad_through_ln(torch.baddbmm(b1, xk, w1), ln_target, ln_w * ln_w)
        new_grads = add_to_pending(0, xk, lr * grad_z)
    else:
        w1, b1, w2, b2 = weights
        z1 = torch.baddbmm(b1, xk, w1)
        x2 = gelu_tanh(z1)
        grad_z2 = _l2_grad_through_ln(torch.baddbmm(b2, x2, w2), ln_target, ln_w * ln_w)
        grad_z1 = torch.bmm(grad_z2, w2.transpose(1, 2)) * gelu_tanh_grad(z1)
        new_grads = (*add_to_pending(0, xk, lr * grad_z1), *add_to_pending(1, x2, lr * grad_z2))
    current = None
    if any(completes):
        current = tuple(torch.addcmul(w, g, scale, value=-1.0) for w, g in zip(weights, new_grads))  # W_t
    z_q = at_current(0, xq) if layer_type == "linear" else at_current(1, gelu_tanh(at_current(0, xq)))
    out = xq + layer_norm(z_q, ln_w, ln_b)  # output rule (Sec. 2.7)

    if all(completes):
        weights, grads = current, tuple(torch.zeros_like(g) for g in new_grads)
    elif not any(completes):
        grads = new_grads
    else:
        done = torch.tensor(completes, device=xq.device).repeat_interleave(heads).view(rows, 1, 1)
        weights = tuple(torch.where(done, c, w) for c, w in zip(current, weights))
        grads = tuple(torch.where(done, torch.zeros_like(g), g) for g in new_grads)
    new_weights = tuple(w.view(batch, heads, *w.shape[1:]) for w in weights)
    new_grads = tuple(g.view(batch, heads, *g.shape[1:]) for g in grads)
    return out.view(batch, heads, 1, head_dim), InnerState(new_weights, new_grads, state.seen + 1)


def _ttt_within_mini_batch(
    layer_type: str,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    params: InnerLoopParams,
    state: InnerState,
    num_tokens: torch.Tensor | None,
    shift: torch.Tensor,
    shifts: list[int],
    ends: list[int],
) -> tuple[torch.Tensor, InnerState]:
    """`_ttt_chunk` for a chunk that stays inside every row's current mini-batch (`shift_b + count_b ≤ M`): short
    prompts, chunked prefill, padded single tokens. The same rule (Eq. 6/7 with the pending sums `G`) and the same
    step functions, applied to the chunk's `T` slots directly instead of an aligned frame of `M` slots: token `i`
    of row `b` sits at position `shift_b + i` of its mini-batch, so it carries its own scale `s_{shift_b + i}`.

    `shift` is `seen mod M` (`[B]`); `shifts` and `ends` (`shift + tokens` per row) are the same on the host."""
    batch, heads, seq_len, head_dim = xq.shape
    rows = batch * heads
    token_scale, ln_weight, ln_bias = params.tensors()
    mini_batch_size = token_scale.shape[0]
    if seq_len == 1:
        positions = shift.unsqueeze(1)  # [B, 1]
    else:  # [B, T], clamped only at padding
        positions = (shift.unsqueeze(1) + torch.arange(seq_len, device=xq.device)).clamp(max=mini_batch_size - 1)
    scale = token_scale[positions].repeat_interleave(heads, dim=0).unsqueeze(-1)  # [BH, T, 1]: s_i per slot

    if num_tokens is not None:  # right padding: padded slots get zero inputs and zero learning rate
        real = (torch.arange(seq_len, device=xq.device) < num_tokens.unsqueeze(1)).view(batch, 1, seq_len)
        xq, xk, xv = (x.masked_fill(~real.unsqueeze(-1), 0.0) for x in (xq, xk, xv))
        inner_lr = inner_lr.masked_fill(~real, 0.0)
    xq_r, xk_r, xv_r = (x.reshape(rows, seq_len, head_dim) for x in (xq, xk, xv))
    ln_w, ln_b = _per_row(ln_weight, batch), _per_row(ln_bias, batch)
    inputs, ln_w_sq = _step_inputs(layer_type, xq_r, xk_r, xv_r, inner_lr.reshape(rows, seq_len), scale, ln_w, ln_b)
    step = _linear_step if layer_type == "linear" else _mlp_step

    weights = _pack(layer_type, state.weights, rows)
    # G is zero for rows at a mini-batch boundary (the invariant of InnerState): skip it when all rows are there.
    grads = _pack(layer_type, state.grads, rows) if any(shifts) else None
    z_bar, increments = step(weights, grads, inputs, scale, ln_w_sq)
    summed = increments if grads is None else tuple(g + d for g, d in zip(grads, increments))

    completes = [end == mini_batch_size for end in ends]  # rows whose mini-batch ends with this chunk
    weights, grads = _end_of_chunk_update(
        weights, summed, all(completes), not any(completes),
        lambda: torch.tensor(completes, device=xq.device).repeat_interleave(heads).view(rows, 1, 1),
        -token_scale[-1],
    )
    if grads is None:
        grads = tuple(torch.zeros_like(g) for g in summed)

    out = (xq_r + layer_norm(z_bar, ln_w, ln_b)).view(batch, heads, seq_len, head_dim)  # output rule (Sec. 2.7)
    if num_tokens is not None:
        out = out.masked_fill(~real.unsqueeze(-1), 0.0)
    new_weights = _unpack(layer_type, weights, batch, heads)
    new_grads = _unpack(layer_type, grads, batch, heads)
    seen = state.seen + (num_tokens if num_tokens is not None else seq_len)
    return out, InnerState(new_weights, new_grads, seen)


def _pack(layer_type: str, tensors: tuple[torch.Tensor, ...], rows: int) -> tuple[torch.Tensor, ...]:
    """State tensors `[B, H, ...]` in the loop's `[B·H, ...]` layout. TTT-Linear's `(W, b)` become one `[W; b]`
    (`[B·H, d+1, d]`: `b` is the weight of a constant-1 input feature), which halves the products per step."""
    flat = tuple(t.reshape(rows, *t.shape[2:]) for t in tensors)
    return (torch.cat(flat, dim=1),) if layer_type == "linear" else flat


def _unpack(layer_type: str, tensors: tuple[torch.Tensor, ...], batch: int, heads: int) -> tuple[torch.Tensor, ...]:
    """Inverse of `_pack`."""
    if layer_type == "linear":
        (w_b,) = tensors
        tensors = (w_b[:, :-1], w_b[:, -1:])
    return tuple(t.view(batch, heads, *t.shape[1:]) for t in tensors)


def _per_row(param: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-head `[H, d]` parameter laid out for the `[B·H, slots, d]` rows of the loop: `[B·H, 1, d]`."""
    heads, dim = param.shape
    if batch == 1:
        return param.view(heads, 1, dim)
    return param.repeat(batch, 1).view(batch * heads, 1, dim)


def _ln_target(xk, xv, ln_w, ln_b):
    """`w·(b − target)` with target `x_v − x_k` (Sec. 2.3): LN(z)·w + b − target, times w, is w²·ẑ + w·(b − target),
    and this second term is fixed per token, so it is computed once outside the loop."""
    return torch.addcmul(ln_w * ln_b, ln_w, xk - xv)


def _step_inputs(layer_type, xq, xk, xv, lr, scale, ln_w, ln_b, with_lr_xk_t=True):
    """Everything a step needs that does not depend on the inner weights, for `[..., B·H, slots, d]` inputs
    (`lr`: `[..., B·H, slots]`; `scale`: each slot's token scale `s_i`, broadcastable to `[..., slots, 1]`).
    Returns the step's input tuple and `w²` of the inner LayerNorm."""
    slots = xq.shape[-2]
    ln_target = _ln_target(xk, xv, ln_w, ln_b)
    # eta[i, j] = s_i · lr_j for j ≤ i: the weight of token j's gradient in token i's weights (Eq. 7)
    eta = scale * lr.unsqueeze(-2)  # [..., slots, slots]
    if slots > 1:
        causal = torch.ones(slots, slots, dtype=torch.bool, device=xq.device).tril()
        eta = eta.masked_fill(~causal, 0.0)
    if layer_type == "linear":
        # Dual form of TTT-Linear (Sec. 2.6): x_q,i (W₀ − Σ_j η_ij x_k,jᵀ g_j) + b₀ − Σ_j η_ij g_j
        #   = x_q,i W₀ + b₀ − Σ_j η_ij (x_q,i·x_k,j + 1) g_j
        # Inputs with a constant-1 feature for the [W; b] layout of `_pack`: [x, 1]·[W; b] = x W + b, and
        # [x_q, 1]·[x_k, 1] = x_q·x_k + 1, the dual form's factor.
        xk_1, xq_1 = F.pad(xk, (0, 1), value=1.0), F.pad(xq, (0, 1), value=1.0)
        dual = eta * (xq_1 @ xk_1.transpose(-1, -2))
        lr_xk_t = (lr.unsqueeze(-1) * xk_1).transpose(-1, -2) if with_lr_xk_t else None  # (lr_j · [x_k,j, 1])ᵀ
        return (xk_1, xq_1, ln_target, dual, lr_xk_t, lr), ln_w * ln_w
    lr_xk_t = (lr.unsqueeze(-1) * xk).transpose(-1, -2)  # (lr_j · x_k,j)ᵀ for the gradient sums
    return (xq, xk, ln_target, eta, lr_xk_t, lr.unsqueeze(-2), lr), ln_w * ln_w


def _end_of_chunk_update(weights, summed, all_done: bool, none_done: bool, done_mask, neg_last_scale):
    """Rows whose mini-batch ends take the step `W₀ ← W₀ − s_last · G` and reset `G`; the others keep `W₀` and
    carry `G = summed`. `done_mask()` builds the `[B·H, 1, 1]` row mask, only needed when rows differ.
    Returns the new weights and the new `G` (`None` when it is zero for every row)."""
    if all_done:
        return tuple(w.addcmul(g, neg_last_scale) for w, g in zip(weights, summed)), None
    if none_done:
        return weights, summed
    done = done_mask()
    weights = tuple(torch.where(done, w.addcmul(g, neg_last_scale), w) for w, g in zip(weights, summed))
    return weights, tuple(torch.where(done, torch.zeros_like(g), g) for g in summed)


def _l2_grad_through_ln(z: torch.Tensor, ln_target: torch.Tensor, ln_w_sq: torch.Tensor) -> torch.Tensor:
    """`layer_norm_l2_grad` with the token-only term `w·(b − target)` precomputed (hot loop version): ATen's fused
    LayerNorm forward gives `ẑ`, the gradient w.r.t. `ẑ` is `w²·ẑ + w·(b − target)`, and ATen's LayerNorm backward
    carries it to `z` (three kernels instead of a dozen). The backward's own derivative treats the saved mean and
    1/std as functions of `z`, so they are passed detached and autograd stays exact for training."""
    shape = (z.shape[-1],)
    z_hat, mean, rstd = torch.native_layer_norm(z, shape, None, None, LAYER_NORM_EPS)
    grad_z_hat = torch.addcmul(ln_target, ln_w_sq, z_hat)
    return torch.ops.aten.native_layer_norm_backward(
        grad_z_hat, z, shape, mean.detach(), rstd.detach(), None, None, (True, False, False)
    )[0]


def _linear_step(weights, pending, inputs, pending_scale, ln_w_sq):
    """One mini-batch of TTT-Linear, `f(x) = x W + b`, on the packed `[W; b]` (see `_pack`). Returns the pre-LN
    outputs and the gradient sum.

    `pending_scale` is each slot's token scale `s_i`, broadcastable to `[BH, slots, 1]`; it only multiplies the
    pending sums `G` (the dual matrix already holds `s_i · lr_j`)."""
    (w_b,) = weights
    z_bar, grad_z = _linear_dual(w_b, inputs, ln_w_sq)
    if pending is not None:  # tokens continuing a mini-batch also see the gradients already summed in G
        z_bar = torch.baddbmm(z_bar, pending_scale * inputs[1], pending[0], alpha=-1.0)
    return z_bar, (torch.bmm(inputs[4], grad_z),)


def _linear_dual(w_b, inputs, ln_w_sq, out=None):
    """The dual-form core of a TTT-Linear step on the packed `[W₀; b₀]`: the outputs `z̄` (written into `out` when
    given, inference only) and the gradients `∇_z ℓ_j` at `W₀`."""
    xk_1, xq_1, ln_target, dual = inputs[:4]
    grad_z = _l2_grad_through_ln(torch.bmm(xk_1, w_b), ln_target, ln_w_sq)  # ∇_z ℓ_j at W₀, [BH, M, d]
    return torch.baddbmm(torch.bmm(xq_1, w_b), dual, grad_z, alpha=-1.0, out=out), grad_z


def _mlp_step(weights, pending, inputs, pending_scale, ln_w_sq):
    """One mini-batch of TTT-MLP, `f(x) = gelu(x W1 + b1) W2 + b2` (`pending_scale` as in `_linear_step`)."""
    w1, b1, w2, b2 = weights
    xq, xk, ln_target, eta, lr_xk_t, lr_row, lr = inputs
    scale = pending_scale
    z1 = torch.baddbmm(b1, xk, w1)
    x2 = gelu_tanh(z1)
    grad_z2 = _l2_grad_through_ln(torch.baddbmm(b2, x2, w2), ln_target, ln_w_sq)
    grad_z1 = (grad_z2 @ w2.transpose(-1, -2)) * gelu_tanh_grad(z1)

    z1_bar = torch.baddbmm(torch.baddbmm(b1, xq, w1), eta * (xq @ xk.transpose(-1, -2) + 1.0), grad_z1, alpha=-1.0)
    if pending is not None:
        z1_bar = z1_bar - scale * torch.baddbmm(pending[1], xq, pending[0])
    x2_bar = gelu_tanh(z1_bar)
    z2_bar = torch.baddbmm(torch.baddbmm(b2, x2_bar, w2), eta * (x2_bar @ x2.transpose(-1, -2) + 1.0), grad_z2,
                           alpha=-1.0)
    if pending is not None:
        z2_bar = z2_bar - scale * torch.baddbmm(pending[3], x2_bar, pending[2])

    increments = (
        lr_xk_t @ grad_z1,
        lr_row @ grad_z1,
        (lr.unsqueeze(-1) * x2).transpose(-1, -2) @ grad_z2,
        lr_row @ grad_z2,
    )
    return z2_bar, increments


def _in_precision(layer_type, xq, xk, xv, inner_lr, params, state, num_tokens,
                  scan_kernels=False) -> tuple[torch.Tensor, InnerState]:
    """`_ttt_chunk` in `inner_dtype` without autocast, the outputs back in the dtype of `xq` ("Precision")."""
    device_type = xq.device.type
    cast = in_inner_dtype(xq, xk, xv, inner_lr, params, state)
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            out, state = _ttt_chunk(layer_type, *cast, num_tokens, scan_kernels)
    else:
        out, state = _ttt_chunk(layer_type, *cast, num_tokens, scan_kernels)
    return (out if out.dtype == xq.dtype else out.to(xq.dtype)), state


def ttt_linear(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    params: InnerLoopParams,
    state: InnerState,
    num_tokens: torch.Tensor | None = None,
    *,
    scan_kernels: bool = False,
) -> tuple[torch.Tensor, InnerState]:
    """TTT-Linear over a chunk, from `state` on.

    Args:
        xq, xk, xv: `[B, H, T, d]` test, training and label views (after RoPE for xq/xk).
        inner_lr: `[B, H, T]` per-token inner learning rate `η_base·σ(θ_lr·x)/d`; must be 0 at padding.
        params: the layer's token scale `[M]`, inner LayerNorm `[H, d]` and checkpoint group (`InnerLoopParams`).
        state: the inner state before the chunk.
        num_tokens: `[B]` real tokens per row (right padding); `None` means all `T`.
        scan_kernels: under autograd, run the scan over whole mini-batches (`linear_scan.py`) with the C++ kernels
            of `modeling_ttt.ops.cpu` (which decides: its `ttt_linear` passes it); else with PyTorch ops.

    Returns:
        `[B, H, T, d]` outputs `x_q + LN(f(x_q))` (zeros at padding) and the state after the chunk.
    """
    check_inputs(xq, xk, xv, inner_lr, params, state, num_tokens, 2)
    return _in_precision("linear", xq, xk, xv, inner_lr, params, state, num_tokens, scan_kernels)


def ttt_mlp(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    params: InnerLoopParams,
    state: InnerState,
    num_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, InnerState]:
    """TTT-MLP over a chunk, from `state` on; arguments as in [`ttt_linear`], with a 4-tensor state."""
    check_inputs(xq, xk, xv, inner_lr, params, state, num_tokens, 4)
    return _in_precision("mlp", xq, xk, xv, inner_lr, params, state, num_tokens)
