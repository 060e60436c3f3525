"""Python side of the Triton kernels: the same `ttt_linear` / `ttt_mlp` signature as `torch_chunk.py`.

Layout. The chunk is laid out in the "aligned frame" of `frame.py` (`make_frame` / `to_frame` / `from_frame`,
plain differentiable PyTorch gathers): row `b` is shifted right by `seen_b mod M` and padded, so the kernels only
ever see whole aligned mini-batches `[B, H, K·M, d]` whose unused slots carry zero inputs and zero learning rate.
What the kernels need besides the tensors is, per row, `end = shift + real tokens` (mini-batch `k` is complete
iff `(k + 1)·M ≤ end`) and, when some row starts mid-mini-batch, the pending gradient sums `G` of the first
mini-batch. The autograd graph is therefore `gather → kernel (autograd.Function) → gather`, and PyTorch's own
backward of the gathers sends the kernel's frame gradients back to the chunk.

Backward: save or recompute? The backward pass needs the inner weights at the start of every mini-batch, in
reverse order. Storing all of them costs `K·d²` floats per (row, head) — for TTT-Linear at d = 64, M = 16 that is
16 KiB per mini-batch, 2.7× the bf16 inputs themselves — while recomputing them costs one more forward. We follow
the reference's `checkpoint_group` knob: with 0 ("store all") the forward kernel saves `W, b` at every
mini-batch start and the backward kernel reads them back (no recomputation, the fastest backward); with `g > 0`
the forward saves only every `g`-th mini-batch start, and the backward, walking segments of `g` mini-batches from
the last to the first, recomputes the segment's weights from its checkpoint into a small per-program scratch
buffer (`g·d²` floats, L2-resident) and then runs the segment backward. That is one extra forward pass for a
`g`-fold smaller saved state, the same trade as the reference's `torch.utils.checkpoint` groups. Everything
inside a mini-batch (Z, ∇Z, the M×M dual matrices, LayerNorm statistics) is always recomputed: it is cheap
and would otherwise cost `M·d` to `M²` floats per token.

Precision: inputs may be fp32, bf16 or fp16; the kernels load them, compute and accumulate in fp32, and keep the
carried inner weights in fp32 registers across the whole sequence; the state comes in and goes out in float32 for
16-bit inputs, as the reference keeps it. fp32 inputs use 3×TF32 tensor-core matmuls (about fp32 accuracy; plain fp32 "ieee" matmuls run on the
CUDA cores and took ptxas minutes to compile for TTT-MLP), so results match the reference to ~1e-6 relative;
16-bit inputs use TF32 matmuls, whose rounding (10-bit mantissa) is finer than the inputs'.

Decoding: a call with one token per row (`T = 1`) and no gradient needed goes to the primal-form kernels of
`decode.py` (no frame, no saved state). With gradients, `T = 1` takes the chunk kernels like any chunk.
Second derivatives (backward of the backward) are not implemented (`once_differentiable`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..frame import check_inputs, from_frame, make_frame, to_frame
from ..state import LAYER_NORM_EPS, InnerLoopParams, InnerState, inner_dtype, state_in_dtype
from .chunk_linear import ttt_linear_bwd_kernel, ttt_linear_fwd_kernel
from .chunk_mlp import ttt_mlp_bwd_kernel, ttt_mlp_fwd_kernel
from .decode import ttt_linear_decode_kernel, ttt_mlp_decode_kernel


#: Largest head_dim the kernels take. One program holds a head's whole inner model in registers; beyond these
#: sizes Triton 3.9 needs more shared memory per block than an H100/H200 has (227 KiB) to stage the matmul
#: operands (compiled for sm_90 without a GPU, eval/compile_kernels.py: TTT-Linear backward at head_dim 128 (or
#: 96, padded to 128) 337 KB, TTT-MLP forward 557 KB; at 64 all kernels need ≤ 148 KB). Larger heads would need
#: the inner model tiled over several programs, or its operands read from memory as the TTT-MLP backward does.
MAX_HEAD_DIM = {"linear": 64, "mlp": 64}


def supports(layer_type: str, head_dim: int) -> bool:
    """Whether the Triton kernels handle this layer type and head size (`ttt_impl="auto"` asks this)."""
    return head_dim <= MAX_HEAD_DIM[layer_type]


def block_size(size: int) -> int:
    """Tile size for a dimension: a power of two, at least 16 (the smallest `tl.dot` operand on tensor cores)."""
    return max(16, triton.next_power_of_2(size))


def num_warps_for(*block_sizes: int) -> int:
    """8 warps once the register tiles are large (d = 64): ptxas (sm_90) then reports no spills for the
    TTT-Linear forward and ~3× fewer for the others than with 4 warps."""
    largest = max(a * b for a in block_sizes for b in block_sizes)
    return 8 if largest >= 64 * 64 else 4


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision: 3×TF32 (about fp32 accuracy, on tensor cores) for fp32 inputs, TF32 for 16-bit ones."""
    return "tf32x3" if dtype in (torch.float32, torch.float64) else "tf32"


def interpreter_mismatch() -> str | None:
    """Why Triton's interpreter cannot run here although `TRITON_INTERPRET` asks for it (None when it can, or
    when it is off). Triton reads the variable when `triton.language` is first imported, not at launch."""
    wanted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    from triton.runtime.interpreter import InterpretedFunction

    if wanted != isinstance(tl.zeros, InterpretedFunction):
        return (f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r} now but was not when `triton` was first "
                "imported; Triton only honours the variable if it is in the environment before that (set it before "
                "the Python process starts).")
    return None


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("The Triton TTT kernels got CPU tensors; they need a CUDA device "
                               "(or TRITON_INTERPRET=1 for the slow CPU interpreter, used by the tests).")
        reason = interpreter_mismatch()
        if reason is not None:
            raise RuntimeError(f"The Triton TTT kernels cannot run on the CPU interpreter: {reason}")
    for t in tensors:
        if t.device != device:
            raise RuntimeError(f"The Triton TTT kernels need every tensor on one device; got {t.device} and {device}.")


class _TTTChunk(torch.autograd.Function):
    """Frame tensors in, frame outputs and final state out (one autograd node for the whole chunk).

    Arguments: `layer_type, has_pending, ckpt_every, save, end` (not differentiated), then `xq, xk, xv, lr,
    token_scale, ln_weight, ln_bias`, then the `n` state weights and the `n` pending sums (n = 2 or 4).
    Returns `out` followed by the `n` new weights and the `n` new pending sums.
    """

    @staticmethod
    def forward(ctx, layer_type, has_pending, ckpt_every, save, end, xq, xk, xv, lr, token_scale, ln_weight, ln_bias,
                *state):
        batch, heads, length, dim = xq.shape
        mini_batch_size = token_scale.shape[0]
        num_mini_batches = length // mini_batch_size
        rows = batch * heads
        num_weights = len(state) // 2
        weights, pending = state[:num_weights], state[num_weights:]
        weights32 = tuple(w.to(torch.float32).contiguous() for w in weights)
        # Without a pending G the kernel never reads it: pass any fp32 tensors of the right kind.
        pending32 = tuple(g.to(torch.float32).contiguous() for g in pending) if has_pending else weights32
        out = torch.zeros_like(xq)
        new_weights = tuple(torch.empty_like(w) for w in weights32)
        new_pending = tuple(torch.zeros_like(w) for w in weights32)  # stays zero for rows ending on a boundary
        num_ckpt = triton.cdiv(num_mini_batches, ckpt_every)
        if save:
            ckpts = tuple(w.new_empty(rows, num_ckpt, *w.shape[2:]) for w in weights32)
        else:
            ckpts = weights32  # never written
        common = dict(M=mini_batch_size, BLOCK_M=block_size(mini_batch_size), D=dim, BLOCK_D=block_size(dim),
                      HAS_PENDING=has_pending, SAVE_CKPT=save, EPS=LAYER_NORM_EPS, PRECISION=dot_precision(xq.dtype),
                      num_warps=num_warps_for(block_size(dim), block_size(weights[0].shape[-1])))
        if layer_type == "linear":
            kernel = ttt_linear_fwd_kernel
        else:
            kernel = ttt_mlp_fwd_kernel
            common.update(F=weights[0].shape[-1], BLOCK_F=block_size(weights[0].shape[-1]))
        kernel[(rows,)](xq, xk, xv, lr, token_scale, ln_weight, ln_bias, *weights32, *pending32, end,
                        out, *new_weights, *new_pending, *ckpts, heads, length, num_mini_batches, ckpt_every,
                        **common)
        if save:
            ctx.save_for_backward(end, xq, xk, xv, lr, token_scale, ln_weight, ln_bias, *pending32, *ckpts)
            ctx.layer_type, ctx.has_pending, ctx.ckpt_every = layer_type, has_pending, ckpt_every
            ctx.num_weights = num_weights
            ctx.state_meta = tuple((w.shape, w.dtype) for w in weights) + tuple((g.shape, g.dtype) for g in pending)
        new_state = tuple(x.to(ref.dtype) for x, ref in zip((*new_weights, *new_pending), state))
        return (out, *new_state)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, *d_state):
        end, xq, xk, xv, lr, token_scale, ln_weight, ln_bias, *rest = ctx.saved_tensors
        num_weights = ctx.num_weights
        pending32, ckpts = rest[:num_weights], rest[num_weights:]
        batch, heads, length, dim = xq.shape
        mini_batch_size = token_scale.shape[0]
        rows = batch * heads
        block_d, block_m = block_size(dim), block_size(mini_batch_size)
        f32 = dict(dtype=torch.float32, device=xq.device)

        d_out = torch.zeros_like(xq) if d_out is None else d_out.contiguous()
        d_state = tuple(torch.zeros(shape, **f32) if grad is None else grad.float().contiguous()
                        for grad, (shape, _) in zip(d_state, ctx.state_meta))
        d_xq, d_xk, d_xv = torch.zeros_like(xq), torch.zeros_like(xk), torch.zeros_like(xv)
        d_lr = torch.zeros_like(lr)
        d_scale = torch.zeros(rows, block_m, **f32)
        d_ln_w, d_ln_b = torch.zeros(rows, block_d, **f32), torch.zeros(rows, block_d, **f32)
        d_weights = tuple(torch.empty(shape, **f32) for shape, _ in ctx.state_meta[:num_weights])
        d_pending = tuple(torch.zeros(shape, **f32) for shape, _ in ctx.state_meta[:num_weights])
        ckpt_every = ctx.ckpt_every
        if ckpt_every > 1:
            scratch = tuple(torch.empty(rows, ckpt_every, *c.shape[2:], **f32) for c in ckpts)
        else:
            scratch = ckpts  # unused
        common = dict(M=mini_batch_size, BLOCK_M=block_m, D=dim, BLOCK_D=block_d, HAS_PENDING=ctx.has_pending,
                      EPS=LAYER_NORM_EPS, PRECISION=dot_precision(xq.dtype),
                      num_warps=num_warps_for(block_d, block_size(ckpts[0].shape[-1])))
        if ctx.layer_type == "linear":
            kernel, extra = ttt_linear_bwd_kernel, ()
        else:
            kernel = ttt_mlp_bwd_kernel
            hidden = ckpts[0].shape[-1]
            common.update(F=hidden, BLOCK_F=block_size(hidden))
            extra = (torch.empty(rows, dim, hidden, **f32), torch.empty(rows, hidden, dim, **f32))  # adjoints
        kernel[(rows,)](xq, xk, xv, lr, token_scale, ln_weight, ln_bias, *pending32, end, *ckpts, *scratch,
                        d_out, *d_state, d_xq, d_xk, d_xv, d_lr, d_scale, d_ln_w, d_ln_b, *d_weights, *d_pending,
                        *extra, heads, length, length // mini_batch_size, ckpt_every, **common)
        d_scale = d_scale.sum(0)[:mini_batch_size].to(token_scale.dtype)
        d_ln_w = d_ln_w.view(batch, heads, block_d).sum(0)[:, :dim].to(ln_weight.dtype)
        d_ln_b = d_ln_b.view(batch, heads, block_d).sum(0)[:, :dim].to(ln_bias.dtype)
        dtypes = [dtype for _, dtype in ctx.state_meta]
        d_weights = tuple(g.to(dtype) for g, dtype in zip(d_weights, dtypes[:num_weights]))
        if ctx.has_pending:
            d_pending = tuple(g.to(dtype) for g, dtype in zip(d_pending, dtypes[num_weights:]))
        else:
            d_pending = (None,) * num_weights  # G is not read without a row starting mid-mini-batch
        return (None, None, None, None, None, d_xq, d_xk, d_xv, d_lr, d_scale, d_ln_w, d_ln_b,
                *d_weights, *d_pending)


def _chunk(layer_type, xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens):
    batch, heads, seq_len, dim = xq.shape
    token_scale, ln_weight, ln_bias = params.tensors()
    mini_batch_size = token_scale.shape[0]
    _check_device(xq, xk, xv, inner_lr, token_scale, ln_weight, ln_bias, *state.weights, *state.grads, state.seen)
    if not supports(layer_type, dim):
        raise NotImplementedError(
            f"The Triton TTT-{'Linear' if layer_type == 'linear' else 'MLP'} kernels support head_dim <= "
            f"{MAX_HEAD_DIM[layer_type]}, got {dim}; use ttt_impl='torch' (or 'auto', which picks it for this size).")
    # The state is kept in the reference's inner dtype (float32 for 16-bit inputs); the kernels load 16-bit inputs
    # as they are and compute in float32 (see "Precision" above and in state.py).
    state = state_in_dtype(state, inner_dtype(xq.dtype))
    tensors = (xq, xk, xv, inner_lr, token_scale, ln_weight, ln_bias, *state.weights, *state.grads)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if seq_len == 1 and not save:  # decoding: the primal-form kernel (no frame, no autograd)
        return _decode(layer_type, xq, xk, xv, inner_lr, params, state, num_tokens)
    frame = make_frame(state.seen, num_tokens, seq_len, mini_batch_size)
    has_pending = not frame.identity and bool(frame.shift.any())
    end = frame.end.to(torch.int32).contiguous()

    def framed(x):
        return to_frame(x, frame).contiguous()

    ckpt_every = params.checkpoint_group if params.checkpoint_group > 0 else 1
    weights = tuple(w.contiguous() for w in state.weights)
    grads = tuple(g.contiguous() for g in state.grads)
    out, *new_state = _TTTChunk.apply(
        layer_type, has_pending, ckpt_every, save, end, framed(xq), framed(xk), framed(xv), framed(inner_lr),
        token_scale.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), *weights, *grads)
    out = from_frame(out, frame, seq_len)
    num_weights = len(state.weights)
    count = num_tokens if num_tokens is not None else torch.full_like(state.seen, seq_len)
    return out, InnerState(tuple(new_state[:num_weights]), tuple(new_state[num_weights:]), state.seen + count)


def _decode(layer_type, xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens):
    """One token per row (`T = 1`), forward only: `decode.py`."""
    batch, heads, _, dim = xq.shape
    token_scale, ln_weight, ln_bias = params.tensors()
    mini_batch_size = token_scale.shape[0]
    count = num_tokens if num_tokens is not None else torch.ones_like(state.seen)
    weights = tuple(w.contiguous() for w in state.weights)
    grads = tuple(g.contiguous() for g in state.grads)
    out = torch.empty_like(xq)
    new_weights = tuple(torch.empty_like(w) for w in weights)
    new_grads = tuple(torch.empty_like(g) for g in grads)
    common = dict(D=dim, M=mini_batch_size, BLOCK_D=block_size(dim), EPS=LAYER_NORM_EPS,
                  num_warps=num_warps_for(block_size(dim)))
    if layer_type == "linear":
        kernel = ttt_linear_decode_kernel
    else:
        kernel = ttt_mlp_decode_kernel
        hidden = weights[0].shape[-1]
        common.update(F=hidden, BLOCK_F=min(block_size(hidden), 32))  # slices of the hidden width (see decode.py)
    kernel[(batch * heads,)](xq.contiguous(), xk.contiguous(), xv.contiguous(), inner_lr.contiguous(),
                             token_scale.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), *weights, *grads,
                             state.seen.contiguous(), count.to(torch.int32).contiguous(), out, *new_weights,
                             *new_grads, heads, **common)
    return out, InnerState(new_weights, new_grads, state.seen + count)


def ttt_linear(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens=None):
    """Triton TTT-Linear; arguments and results as in `modeling_ttt.ops.torch_chunk.ttt_linear`."""
    check_inputs(xq, xk, xv, inner_lr, params, state, num_tokens, 2)
    return _chunk("linear", xq, xk, xv, inner_lr, params, state, num_tokens)


def ttt_mlp(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState, num_tokens=None):
    """Triton TTT-MLP; arguments and results as in `modeling_ttt.ops.torch_chunk.ttt_mlp`."""
    check_inputs(xq, xk, xv, inner_lr, params, state, num_tokens, 4)
    return _chunk("mlp", xq, xk, xv, inner_lr, params, state, num_tokens)
