"""The TTT inner loop written to be read beside the paper (Sun et al. 2024, arXiv 2407.04620): the spec.

Every backend (`torch_chunk.py`, the C++ decoding kernel, the Triton kernels) must give what this file gives; it has
no performance tricks, only explicit loops over rows, mini-batches and tokens (tests/test_ops_naive.py).

For one row and head, the inner model `f(x; W)` is TTT-Linear's `x W + b` or TTT-MLP's `gelu(x W1 + b1) W2 + b2`
(Sec. 2.7). Token `t` defines the self-supervised loss of Eq. 4, with the training view `x_k`, the label view `x_v`
and the test view `x_q` of Sec. 2.3 and the inner LayerNorm of Sec. 2.7:

    ℓ_t(W) = ½ ‖LN(f(x_k,t; W)) − (x_v,t − x_k,t)‖²        (the official code drops the 2 of ‖·‖²; so do we)

Mini-batch TTT (Sec. 2.5) takes every gradient of a mini-batch of `M` tokens at `W₀`, the weights at its start.
Token `i` of the mini-batch (learning rate `lr_i`, token scale `s_i` of its position, Sec. 2.7) uses

    W_i = W₀ − s_i · (G + Σ_{j ≤ i} lr_j ∇ℓ_j(W₀))          (Eq. 6/7; G = 0 at a mini-batch start)

and outputs `x_q,i + LN(f(x_q,i; W_i))` (residual and LayerNorm, Sec. 2.7). At the end of the mini-batch
`W₀ ← W_{M−1}` and `G ← 0`. `G` is the pending sum of a mini-batch a row is in the middle of (`InnerState`).

Two forms compute this: `form="primal"` materialises `W_i` token by token; `form="dual"` (Sec. 2.6) takes one
mini-batch at a time and never forms `W_i`, using masked `M×M` products instead. Both take a row's real tokens
only: right padding (`num_tokens`) is cut off before anything is computed, so it cannot change the state or leak
NaN/inf, and its outputs are zeros. Precision as in `state.py`: float32 arithmetic and state for 16-bit inputs.
"""

from __future__ import annotations

import math

import torch

from .state import LAYER_NORM_EPS, InnerLoopParams, InnerState, in_inner_dtype

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------------------------------------------------------
# The inner model, its LayerNorm, and the analytic gradient of the inner loss
# ---------------------------------------------------------------------------------------------------------------


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (as the official TTT-MLP)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d gelu(x) / dx, by the product and chain rules on the formula above."""
    tanh = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - tanh**2) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x**2)


def layer_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LN(z) = ẑ·w + b with ẑ = (z − mean(z)) / sqrt(var(z) + ε), over the last axis."""
    mean = z.mean(dim=-1, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + LAYER_NORM_EPS) * weight + bias


def layer_norm_l2_grad(z, target, weight, bias) -> torch.Tensor:
    """∂ℓ/∂z of ℓ = ½‖LN(z) − target‖² (per token, last axis): the l2 loss's backward, then the LayerNorm's."""
    d = z.shape[-1]
    mean = z.mean(dim=-1, keepdim=True)
    std = torch.sqrt(((z - mean) ** 2).mean(dim=-1, keepdim=True) + LAYER_NORM_EPS)
    z_hat = (z - mean) / std
    grad_z_hat = (z_hat * weight + bias - target) * weight  # ∂ℓ/∂ẑ
    # ẑ depends on z through the mean and the std: ∂ℓ/∂z = (g − mean(g) − ẑ·mean(g·ẑ)) / std, g = ∂ℓ/∂ẑ
    return (grad_z_hat - grad_z_hat.sum(-1, keepdim=True) / d
            - z_hat * (grad_z_hat * z_hat).sum(-1, keepdim=True) / d) / std


def inner_model(weights, x: torch.Tensor) -> torch.Tensor:
    """f(x; W): TTT-Linear `x W + b`, TTT-MLP `gelu(x W1 + b1) W2 + b2` (Sec. 2.7)."""
    if len(weights) == 2:
        w, b = weights
        return x @ w + b
    w1, b1, w2, b2 = weights
    return gelu(x @ w1 + b1) @ w2 + b2


def loss_grads_per_token(weights, xk, xv, ln_weight, ln_bias):
    """For tokens `xk, xv` ([H, L, d]) at the weights `weights`: each affine map `(W, b)` of `f` with its input `X`
    and the gradient `g = ∂ℓ_j/∂(X W + b)` of every token's loss (Eq. 4), as a list of `(X, g)` per map. Token j's
    weight gradient is then `∇_W ℓ_j = X_jᵀ g_j` and `∇_b ℓ_j = g_j`."""
    target = xv - xk  # reconstruct the label view from the training view (Sec. 2.3)
    if len(weights) == 2:
        w, b = weights
        return [(xk, layer_norm_l2_grad(xk @ w + b, target, ln_weight, ln_bias))]
    w1, b1, w2, b2 = weights
    z1 = xk @ w1 + b1
    hidden = gelu(z1)
    grad_z2 = layer_norm_l2_grad(hidden @ w2 + b2, target, ln_weight, ln_bias)
    grad_z1 = (grad_z2 @ w2.mT) * gelu_derivative(z1)  # back through W2, then through the GELU
    return [(xk, grad_z1), (hidden, grad_z2)]


def weighted_grad_sum(maps, inner_lr: torch.Tensor) -> list[torch.Tensor]:
    """Σ_j lr_j ∇ℓ_j(W₀) over the tokens of `maps` (from `loss_grads_per_token`), as `[∇W1, ∇b1, ...]`."""
    sums = []
    for x_train, g in maps:
        lr_g = inner_lr.unsqueeze(-1) * g  # [H, L, out]
        sums += [x_train.mT @ lr_g, lr_g.sum(dim=-2, keepdim=True)]
    return sums


# ---------------------------------------------------------------------------------------------------------------
# The two forms, for one row (all heads at once): tensors [H, n, ·] of the row's n real tokens
# ---------------------------------------------------------------------------------------------------------------


def primal_form(xq, xk, xv, inner_lr, token_scale, ln_weight, ln_bias, weights, grads, seen: int):
    """Eq. 6/7 read literally, one token at a time: `W_t` is formed for every token. Returns the outputs and the
    new `(W₀, G)`."""
    mini_batch_size = token_scale.shape[0]
    outputs = []
    for t in range(xq.shape[1]):
        position = (seen + t) % mini_batch_size
        token = slice(t, t + 1)
        maps = loss_grads_per_token(weights, xk[:, token], xv[:, token], ln_weight, ln_bias)  # ∇ℓ_t at W₀
        grads = [g + step for g, step in zip(grads, weighted_grad_sum(maps, inner_lr[:, token]))]
        current = [w - token_scale[position] * g for w, g in zip(weights, grads)]  # W_t
        outputs.append(xq[:, token] + layer_norm(inner_model(current, xq[:, token]), ln_weight, ln_bias))
        if position == mini_batch_size - 1:  # mini-batch end: W₀ ← W_t, G ← 0
            weights, grads = current, [torch.zeros_like(g) for g in grads]
    return torch.cat(outputs, dim=1) if outputs else xq, weights, grads


def dual_form(xq, xk, xv, inner_lr, token_scale, ln_weight, ln_bias, weights, grads, seen: int):
    """Sec. 2.6, one mini-batch (or the part of it in this chunk) at a time. For an affine map `(W₀, b₀)` with
    training inputs `X_j` and loss gradients `g_j` at `W₀`, token i's `x̄_i W_i + b_i` expands by Eq. 6/7 into

        x̄_i W₀ + b₀ − s_i (x̄_i G_W + G_b) − Σ_{j≤i} s_i lr_j (x̄_i · X_j + 1) g_j

    whose last term is a causally masked `L×L` matrix times the gradients. TTT-MLP applies this to its two maps in
    turn; the second map's test input `x̄` is `gelu` of the first map's dual-form output."""
    mini_batch_size = token_scale.shape[0]
    outputs, t = [], 0
    while t < xq.shape[1]:
        start = (seen + t) % mini_batch_size  # position of the first token; rows may start mid-mini-batch
        length = min(mini_batch_size - start, xq.shape[1] - t)  # up to the mini-batch end or the last token
        chunk = slice(t, t + length)
        lr = inner_lr[:, chunk]  # [H, L]
        scale = token_scale[start : start + length].view(length, 1)  # s_i of each token's position
        eta = torch.tril(scale * lr.unsqueeze(-2))  # [H, L, L]: η_ij = s_i lr_j for j ≤ i, else 0
        maps = loss_grads_per_token(weights, xk[:, chunk], xv[:, chunk], ln_weight, ln_bias)  # all at W₀ (Sec. 2.5)
        x_bar = xq[:, chunk]
        for k, (x_train, g) in enumerate(maps):
            if k > 0:
                x_bar = gelu(x_bar)  # TTT-MLP's hidden layer, evaluated at the current weights W_i
            w, b, grad_w, grad_b = weights[2 * k], weights[2 * k + 1], grads[2 * k], grads[2 * k + 1]
            x_bar = x_bar @ w + b - scale * (x_bar @ grad_w + grad_b) - (eta * (x_bar @ x_train.mT + 1.0)) @ g
        outputs.append(xq[:, chunk] + layer_norm(x_bar, ln_weight, ln_bias))
        grads = [g + step for g, step in zip(grads, weighted_grad_sum(maps, lr))]
        if start + length == mini_batch_size:  # mini-batch end: W₀ ← W_last = W₀ − s_last·G, G ← 0
            weights = [w - token_scale[-1] * g for w, g in zip(weights, grads)]
            grads = [torch.zeros_like(g) for g in grads]
        t += length
    return torch.cat(outputs, dim=1) if outputs else xq, weights, grads


# ---------------------------------------------------------------------------------------------------------------
# Public ops: the signature of torch_chunk.ttt_linear / ttt_mlp
# ---------------------------------------------------------------------------------------------------------------


def _ttt(num_weights, form, xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens):
    if form not in ("dual", "primal"):
        raise ValueError(f"form must be 'dual' or 'primal', got {form!r}.")
    if len(state.weights) != num_weights or len(state.grads) != num_weights:
        raise ValueError(f"the inner state must hold {num_weights} weights and {num_weights} gradient sums.")
    run = dual_form if form == "dual" else primal_form
    out_dtype = xq.dtype
    # Precision (state.py): compute and keep the state in float32 for 16-bit inputs, without autocast.
    xq, xk, xv, inner_lr, params, state = in_inner_dtype(xq, xk, xv, inner_lr, params, state)
    batch, heads, seq_len, head_dim = xq.shape
    counts = [seq_len] * batch if num_tokens is None else [int(n) for n in num_tokens.tolist()]
    ln_w, ln_b = params.ln_weight.view(heads, 1, head_dim), params.ln_bias.view(heads, 1, head_dim)
    outputs, new_weights, new_grads = [], [], []
    with torch.autocast(xq.device.type, enabled=False):
        for row in range(batch):  # rows are independent: each has its own inner models and position
            real = slice(0, counts[row])  # the row's real tokens; its padding never enters a computation
            out, weights, grads = run(
                xq[row, :, real], xk[row, :, real], xv[row, :, real], inner_lr[row, :, real], params.token_scale,
                ln_w, ln_b, [w[row] for w in state.weights], [g[row] for g in state.grads], int(state.seen[row]))
            outputs.append(torch.cat([out, out.new_zeros(heads, seq_len - counts[row], head_dim)], dim=1))
            new_weights.append(weights)
            new_grads.append(grads)
    out = torch.stack(outputs).to(out_dtype)
    seen = state.seen + torch.tensor(counts, dtype=state.seen.dtype, device=state.seen.device)
    stack = lambda per_row: tuple(torch.stack(ts) for ts in zip(*per_row))  # noqa: E731  [B, H, ...] again
    return out, InnerState(stack(new_weights), stack(new_grads), seen)


def ttt_linear(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens=None, *,
               form: str = "dual") -> tuple[torch.Tensor, InnerState]:
    """TTT-Linear over a chunk from `state` on: arguments and results as in `torch_chunk.ttt_linear` (outputs
    `[B, H, T, d]` in xq's dtype, zeros at padding; the new state). `form`: "dual" (Sec. 2.6) or "primal"
    (Eq. 6/7 token by token). `params.checkpoint_group` only trades memory in the other backends; it is not read
    here."""
    return _ttt(2, form, xq, xk, xv, inner_lr, params, state, num_tokens)


def ttt_mlp(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens=None, *,
            form: str = "dual") -> tuple[torch.Tensor, InnerState]:
    """TTT-MLP over a chunk from `state` on: as [`ttt_linear`], with the 4-tensor state `(W1, b1, W2, b2)`."""
    return _ttt(4, form, xq, xk, xv, inner_lr, params, state, num_tokens)


__all__ = ["ttt_linear", "ttt_mlp", "primal_form", "dual_form", "loss_grads_per_token", "layer_norm",
           "layer_norm_l2_grad", "gelu", "gelu_derivative"]
