"""The aligned frame: the padding layout every chunk backend shares, and the checks of the op arguments.

Rows of a batch may sit at different positions inside their mini-batch (different `seen`), and may hold fewer
real tokens than the chunk (right padding, `num_tokens`). Both are handled by laying every row out in an
"aligned frame" whose mini-batches start at multiples of `M`: row `b` is shifted right by `seen_b mod M`;
the unused slots carry zero inputs and zero learning rate, so they change nothing.

`make_frame` describes the layout of a chunk, `to_frame` / `from_frame` move tensors into and out of it (plain
differentiable gathers; unused slots are zeros, never products of padding); `check_inputs` checks the shapes of one
op call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .state import InnerLoopParams, InnerState


@dataclass
class Frame:
    """How a chunk `[B, H, T, ·]` maps into the aligned frame `[B, H, K·M, ·]`."""

    identity: bool  # the chunk already is the frame (no shift, no padding inside the first K·M slots)
    length: int  # K·M
    gather_index: torch.Tensor | None  # [B, K·M] chunk index of each frame slot
    valid: torch.Tensor | None  # [B, K·M] slot holds a real token
    shift: torch.Tensor  # [B] seen mod M
    end: torch.Tensor  # [B] shift + num_tokens: frame slots used by each row


def make_frame(seen: torch.Tensor, num_tokens: torch.Tensor | None, seq_len: int, mini_batch_size: int) -> Frame:
    shift = seen % mini_batch_size
    count = num_tokens if num_tokens is not None else torch.full_like(seen, seq_len)
    end = shift + count
    max_end = int(end.max()) if end.numel() else 0
    length = max(1, math.ceil(max_end / mini_batch_size)) * mini_batch_size
    # The common case (fresh or boundary-aligned state, no padding) needs no gather at all.
    if not bool(shift.any()) and num_tokens is None:
        return Frame(True, length, None, None, shift, end)
    slots = torch.arange(length, device=seen.device)
    index = slots.unsqueeze(0) - shift.unsqueeze(1)
    valid = (index >= 0) & (index < count.unsqueeze(1))
    return Frame(False, length, index.clamp(0, max(seq_len - 1, 0)), valid, shift, end)


def to_frame(x: torch.Tensor, frame: Frame) -> torch.Tensor:
    """[B, H, T, *] -> [B, H, K·M, *] with zeros in unused slots."""
    seq_len = x.shape[2]
    if frame.identity:
        if seq_len == frame.length:
            return x
        pad = [0, 0] * (x.dim() - 3) + [0, frame.length - seq_len]
        return F.pad(x, pad)
    index = frame.gather_index.view(x.shape[0], 1, frame.length, *([1] * (x.dim() - 3)))
    out = torch.gather(x, 2, index.expand(-1, x.shape[1], -1, *x.shape[3:]))
    mask = frame.valid.view(x.shape[0], 1, frame.length, *([1] * (x.dim() - 3)))
    return out.masked_fill(~mask, 0.0)


def from_frame(y: torch.Tensor, frame: Frame, seq_len: int) -> torch.Tensor:
    """[B, H, K·M, d] -> [B, H, T, d]; positions past a row's `num_tokens` come out as zeros."""
    if frame.identity:
        return y[:, :, :seq_len]
    positions = torch.arange(seq_len, device=y.device)
    index = (positions.unsqueeze(0) + frame.shift.unsqueeze(1)).clamp(max=frame.length - 1)
    out = torch.gather(y, 2, index.view(y.shape[0], 1, seq_len, 1).expand(-1, y.shape[1], -1, y.shape[3]))
    real = (positions.unsqueeze(0) + frame.shift.unsqueeze(1)) < frame.end.unsqueeze(1)
    return out.masked_fill(~real.view(y.shape[0], 1, seq_len, 1), 0.0)


def check_inputs(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens, num_weights):
    batch, heads, seq_len, head_dim = xq.shape
    if xk.shape != xq.shape or xv.shape != xq.shape:
        raise ValueError(f"xq, xk, xv must share a shape [B, H, T, d]; got {xq.shape}, {xk.shape}, {xv.shape}.")
    if inner_lr.shape != (batch, heads, seq_len):
        raise ValueError(f"inner_lr must be [B, H, T] = {(batch, heads, seq_len)}, got {tuple(inner_lr.shape)}.")
    if params.token_scale.dim() != 1:
        raise ValueError(f"params.token_scale must be [mini_batch_size], got {tuple(params.token_scale.shape)}.")
    if params.ln_weight.shape != (heads, head_dim) or params.ln_bias.shape != (heads, head_dim):
        raise ValueError(f"params.ln_weight/ln_bias must be [H, d] = {(heads, head_dim)}.")
    if len(state.weights) != num_weights or len(state.grads) != num_weights:
        raise ValueError(f"the inner state must hold {num_weights} weights and {num_weights} gradient sums.")
    if state.seen.shape != (batch,):
        raise ValueError(f"state.seen must be [B] = [{batch}], got {tuple(state.seen.shape)}.")
    for w in (*state.weights, *state.grads):
        if w.shape[:2] != (batch, heads):
            raise ValueError(f"inner state tensors must start with [B, H] = {(batch, heads)}, got {tuple(w.shape)}.")
    if num_tokens is not None and num_tokens.shape != (batch,):
        raise ValueError(f"num_tokens must be [B] = [{batch}], got {tuple(num_tokens.shape)}.")


__all__ = ["Frame", "make_frame", "to_frame", "from_frame", "check_inputs"]
