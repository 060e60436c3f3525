"""The inner state every backend reads and writes, the per-layer parameters of the inner loop that every op takes
with it (`InnerLoopParams`), and the precision rule they share.

Mini-batch TTT (Sun et al. 2024, Sec. 2.5) takes every gradient of a mini-batch at the weights `W₀` of its start,
so the state after any prefix of a mini-batch is `W₀` (and biases), the pending learning-rate-weighted gradient sum
`G` of the unfinished mini-batch, and `seen`, the tokens each row has consumed: with it a sequence can be fed whole,
in pieces or a token at a time with identical results.

Precision. The inner loop computes, and keeps its state (`W₀`, `b₀`, `G`), in `inner_dtype(x.dtype)`: float32
for 16-bit inputs (bf16, fp16), else the inputs' own dtype (float32, float64). Everything that enters it — the
views, learning rates, token scales, the inner LayerNorm's parameters and the state, including the layer's learned
initial weights — is cast to that dtype (autograd flows through the casts), autocast is switched off inside, and
the outputs are returned in the dtype of `xq`. Why: the state is a model trained by one small step per mini-batch
over the whole sequence; in bf16 (8 mantissa bits) a step below 2⁻⁹ of a weight is rounded away and thousands of
them drift. The official JAX layer behaves the same way: its inner weights, token scales and learning-rate gates
are created in `param_dtype` (float32 in every official run) and JAX's type promotion makes every product with
them float32 whatever the activation `dtype`, with the layer's output in the activation dtype. (Its LayerNorms
round their outputs to the activation dtype inside the loop; here they stay float32, a difference of bf16
rounding.) The cache therefore stores the state in float32 for a 16-bit model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

LAYER_NORM_EPS = 1e-6  # the inner LayerNorm's epsilon (flax's default, which the official models use)


@dataclass
class InnerState:
    """State of one TTT layer's inner models, for every row and head.

    weights: `(W1, b1)` for TTT-Linear or `(W1, b1, W2, b2)` for TTT-MLP; `W` is `[B, H, in, out]`,
        `b` is `[B, H, 1, out]`. These are the weights at the start of each row's current mini-batch.
    grads: the learning-rate-weighted gradient sums `G` of the unfinished mini-batch, same shapes
        (zero at a mini-batch boundary).
    seen: `[B]` int64, tokens consumed per row; the next token sits at position `seen mod M` of its mini-batch.
    """

    weights: tuple[torch.Tensor, ...]
    grads: tuple[torch.Tensor, ...]
    seen: torch.Tensor

    @classmethod
    def initial(cls, weights: tuple[torch.Tensor, ...], batch_size: int) -> "InnerState":
        """Fresh state from the layer's learned initial weights `[H, in, out]` (kept differentiable)."""
        expanded = tuple(w.unsqueeze(0).expand(batch_size, *w.shape) for w in weights)
        grads = tuple(torch.zeros_like(w) for w in expanded)
        seen = torch.zeros(batch_size, dtype=torch.long, device=weights[0].device)
        return cls(expanded, grads, seen)


@dataclass(frozen=True)
class InnerLoopParams:
    """The parameters of one TTT layer's inner loop that are the same for every token of a call: what an op takes
    besides the token views, their learning rates and the state (built once per forward by
    `TTTLayerBase.inner_loop_params`).

    token_scale: `[M]` scale of each position of a mini-batch, `max(1/(i+1) + learnable_i, 0)` (Sec. 2.7); `M` is
        the mini-batch size.
    ln_weight, ln_bias: `[H, d]` the per-head LayerNorm of the inner loss and of the inner model's output.
    checkpoint_group: in backward, recompute this many mini-batches at a time (0: store every mini-batch's
        weights). Trades memory for time only; it changes no value.

    Its tensors are cast like the op's other inputs ("Precision" above, `in_inner_dtype`).
    """

    token_scale: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    checkpoint_group: int = 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(token_scale, ln_weight, ln_bias)`."""
        return self.token_scale, self.ln_weight, self.ln_bias


def inner_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the inner loop's arithmetic and state for inputs of `dtype` (see "Precision" above)."""
    return torch.promote_types(dtype, torch.float32)


def state_in_dtype(state: InnerState, dtype: torch.dtype) -> InnerState:
    """`state` with its weights and gradient sums in `dtype` (the same object when they already are)."""
    if all(w.dtype == dtype for w in (*state.weights, *state.grads)):
        return state
    return InnerState(tuple(w.to(dtype) for w in state.weights), tuple(g.to(dtype) for g in state.grads), state.seen)


def params_in_dtype(params: InnerLoopParams, dtype: torch.dtype) -> InnerLoopParams:
    """`params` with its tensors in `dtype` (the same object when they already are)."""
    if all(t.dtype == dtype for t in params.tensors()):
        return params
    token_scale, ln_weight, ln_bias = (t if t.dtype == dtype else t.to(dtype) for t in params.tensors())
    return replace(params, token_scale=token_scale, ln_weight=ln_weight, ln_bias=ln_bias)


def in_inner_dtype(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState):
    """The op arguments cast to `inner_dtype(xq.dtype)` (no copies when they already are)."""
    dtype = inner_dtype(xq.dtype)
    views = [t if t.dtype == dtype else t.to(dtype) for t in (xq, xk, xv, inner_lr)]
    return (*views, params_in_dtype(params, dtype), state_in_dtype(state, dtype))


__all__ = ["InnerState", "InnerLoopParams", "LAYER_NORM_EPS", "inner_dtype", "in_inner_dtype", "params_in_dtype",
           "state_in_dtype"]
