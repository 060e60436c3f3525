"""TTT layers as `nn.Module`s: projections, causal convs, RoPE, learning rates, gate and norms around the
inner-loop ops of `modeling_ttt.ops`.

Parameter names follow the official PyTorch port (test-time-training/ttt-lm-pytorch) so its checkpoints and the
documented JAX mapping apply unchanged.

A layer reads its recurrent state from a `layer_state` object (one layer of `TTTCache`) and writes the new
state back to it; with `layer_state=None` it starts from the learned initial state and keeps nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_ttt import TTTConfig
from .ops import InnerLoopParams, InnerState, get_ttt_ops
from .packing import DocumentLayout


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # x · rsqrt(mean(x²) + eps) in at least float32, then the weight in the input dtype (fused kernels)
        input_dtype = hidden_states.dtype
        shape = (hidden_states.shape[-1],)
        if input_dtype == self.weight.dtype and input_dtype in (torch.float32, torch.float64):
            return F.rms_norm(hidden_states, shape, self.weight, eps=self.variance_epsilon)
        normed = F.rms_norm(hidden_states.to(torch.promote_types(input_dtype, torch.float32)), shape,
                            eps=self.variance_epsilon)
        return self.weight * normed.to(input_dtype)


class SwiGLUMLP(nn.Module):
    def __init__(self, config: TTTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def causal_depthwise_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    biases: torch.Tensor,
    state: torch.Tensor | None,
    num_tokens: torch.Tensor | None,
    layout: DocumentLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` causal depthwise convs of the same input `x` `[B, T, C]` at once, continuing from `state` `[B, K-1, C]`
    (the last `K-1` inputs seen; zeros for a fresh sequence, which equals flax's CAUSAL padding).

    kernels: `[n, C, K]`; biases: `[n, C]` (the Mamba backbone's `conv_q` and `conv_k` read the same projection,
    so they share one state and one pass). Returns the outputs `[B, T, n, C]` and the new state: the last `K-1`
    *real* inputs of each row, so that right padding (`num_tokens`) never enters the state.

    With packed documents (`layout`), a tap that would reach back across a document start reads zero, as before a
    sequence's first token, and the new state keeps only the inputs of each row's last document.
    """
    batch, seq_len, channels = x.shape
    width = kernels.shape[-1]
    if state is None:
        state = x.new_zeros(batch, width - 1, channels)
    # Work in [B, T, C] (no transposes): y_t = bias + Σ_k w_k · x_{t-K+1+k}, K shifted multiply-adds.
    extended = torch.cat([state if state.dtype == x.dtype else state.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    taps = kernels.permute(2, 0, 1)  # [K, n, C]
    if seq_len == 1 and num_tokens is None:  # decoding: one window, one product and one sum
        y = torch.sum(extended.unsqueeze(2) * taps, dim=1, keepdim=True) + biases
        return y, extended[:, 1:]
    windows = extended.unsqueeze(2)  # [B, K-1+T, 1, C]

    def window(k: int) -> torch.Tensor:
        """The inputs tap `k` multiplies, `K-1-k` positions back."""
        inputs = windows[:, k : k + seq_len]
        lookback = width - 1 - k
        if layout is None or lookback == 0:
            return inputs
        return inputs * layout.lookback_within_document(lookback).view(batch, seq_len, 1, 1).to(inputs.dtype)

    y = torch.addcmul(biases, window(0), taps[0])
    for k in range(1, width):
        y = torch.addcmul(y, window(k), taps[k])
    if num_tokens is None:
        new_state = extended[:, seq_len:]
    else:
        index = num_tokens.view(batch, 1, 1) + torch.arange(width - 1, device=x.device).view(1, -1, 1)
        new_state = torch.gather(extended, 1, index.expand(batch, width - 1, channels))
    if layout is not None:
        new_state = new_state * layout.conv_state_valid(width - 1).unsqueeze(-1).to(new_state.dtype)
    return y, new_state


def _conv_parameters(*convs: nn.Conv1d) -> tuple[torch.Tensor, torch.Tensor]:
    """`(kernels [n, C, K], biases [n, C])` of depthwise `nn.Conv1d`s, for `causal_depthwise_conv`."""
    if len(convs) == 1:
        return convs[0].weight.transpose(0, 1), convs[0].bias.unsqueeze(0)
    return torch.stack([c.weight.squeeze(1) for c in convs]), torch.stack([c.bias for c in convs])


class TTTConvBlock(nn.Module):
    """The Mamba backbone's pre-conv: RMSNorm then a causal depthwise conv (its output joins the residual)."""

    def __init__(self, config: TTTConfig):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=config.conv_kernel,
                              groups=config.hidden_size, bias=True)

    def forward(self, hidden_states, layer_state=None, num_tokens=None, layout: DocumentLayout | None = None):
        state = layer_state.conv_states.get("pre_conv") if layer_state is not None else None
        out, new_state = causal_depthwise_conv(self.norm(hidden_states), *_conv_parameters(self.conv), state,
                                               num_tokens, layout)
        if layer_state is not None:
            layer_state.conv_states["pre_conv"] = new_state
        return out.squeeze(2)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs `(2j, 2j+1)`, as the JAX code does (no q/k permutation needed):
    `(x_2j, x_2j+1) ↦ (x_2j·c_j − x_2j+1·s_j, x_2j+1·c_j + x_2j·s_j)`.

    x: `[..., d]`; rotation: `[..., d/2, 2]` holding `(c_j, s_j) = (cos θ_j, sin θ_j)`, broadcast against `x`'s
    leading axes. In float32/float64 this is one complex product per pair, `(x_2j + i·x_2j+1)·e^{iθ_j}`; 16-bit
    inputs are rotated in float32 and rounded once (as the JAX code does)."""
    if x.dtype not in (torch.float32, torch.float64):
        return apply_rotary(x.float(), rotation.float()).to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    if rotation.dtype != x.dtype:
        rotation = rotation.to(x.dtype)
    complex_ok = pairs.stride(-1) == 1 and pairs.stride(-2) == 2 and pairs.storage_offset() % 2 == 0
    if x.dtype in (torch.float32, torch.float64) and complex_ok:
        return torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotation)).flatten(-2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = rotation[..., 0], rotation[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class TTTLayerBase(nn.Module):
    """Everything of a TTT layer except the inner model (Sec. 2 of the paper)."""

    inner_weight_names: tuple[str, ...] = ()
    layer_type: str = ""  # "linear" or "mlp": which inner-loop op the layer calls

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.mini_batch_size = config.mini_batch_size
        self.share_qk = config.share_qk
        self.use_gate = config.use_gate
        width = self.hidden_size

        self.q_proj = nn.Linear(width, width, bias=False)
        if not self.share_qk:
            self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        if self.share_qk:
            # One projection for Q and K, told apart by two causal convs (Mamba backbone).
            self.conv_q = nn.Conv1d(width, width, kernel_size=config.conv_kernel, groups=width, bias=True)
            self.conv_k = nn.Conv1d(width, width, kernel_size=config.conv_kernel, groups=width, bias=True)
        if self.use_gate:
            self.g_proj = nn.Linear(width, width, bias=False)

        # Per-head learnable inner learning rate η(x) = η_base · σ(θ_lr · x + b) / d (Sec. 2.7).
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(self.num_heads, 1, width))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(self.num_heads, 1))
        # Token scale 1/(i+1) of the i-th token of a mini-batch, plus a learnable offset.
        self.learnable_token_idx = nn.Parameter(torch.zeros(self.mini_batch_size))
        # LayerNorm inside the inner loss and on the inner model's output, per head.
        self.ttt_norm_weight = nn.Parameter(torch.ones(self.num_heads, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        self.post_norm = nn.LayerNorm(width, eps=1e-6)

        for name, value in self.compute_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self._qk_conv_memo = None  # see qk_conv_parameters

    def compute_buffers(self) -> dict[str, torch.Tensor]:
        """Non-persistent buffers (recomputed, never saved): the fixed token scale 1/(i+1) and the RoPE table.
        RoPE uses the position inside the mini-batch, so only M distinct angles exist."""
        head_dim, mini_batch_size = self.head_dim, self.mini_batch_size
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.arange(mini_batch_size, dtype=torch.float32).unsqueeze(1) * inv_freq  # [M, d/2]
        return {
            "token_idx": 1.0 / torch.arange(1, mini_batch_size + 1, dtype=torch.float32),
            "rope_rotation": torch.stack((angles.cos(), angles.sin()), dim=-1),  # [M, d/2, 2]
        }

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cuda()`...: the fixed tables stay at least float32 (a 16-bit model still uses the
        exact token scales and RoPE angles, as the JAX code's float32 constants are)."""
        super()._apply(fn, recurse)
        if any(buffer.dtype not in (torch.float32, torch.float64) for buffer in self._buffers.values()):
            for name, value in self.compute_buffers().items():
                self._buffers[name] = value.to(self._buffers[name].device)
        return self

    # -- pieces ------------------------------------------------------------------------------------------------

    def inner_weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.inner_weight_names)

    def token_scale(self) -> torch.Tensor:
        return torch.clamp_min(self.token_idx + self.learnable_token_idx, 0.0)

    def inner_lr(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, H, T]."""
        logits = F.linear(x, self.learnable_ttt_lr_weight.view(self.num_heads, self.hidden_size),
                          self.learnable_ttt_lr_bias.view(self.num_heads))
        return (self.config.ttt_base_lr / self.head_dim) * torch.sigmoid(logits).transpose(1, 2)

    def qk_conv_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """conv_q and conv_k stacked for `causal_depthwise_conv`. Without autograd the stack is kept until one of
        the four parameters changes (in place, replaced, or moved): when decoding, stacking them every token
        costs about as much as the conv itself."""
        if torch.is_grad_enabled():
            return _conv_parameters(self.conv_q, self.conv_k)
        params = (self.conv_q.weight, self.conv_q.bias, self.conv_k.weight, self.conv_k.bias)
        key = tuple((id(p), p.data_ptr(), p._version) for p in params)
        if self._qk_conv_memo is None or self._qk_conv_memo[0] != key:
            # the memo also holds the parameters, so that their ids cannot be reused by other tensors meanwhile
            self._qk_conv_memo = (key, _conv_parameters(self.conv_q, self.conv_k), params)
        return self._qk_conv_memo[1]

    def project_qk(self, x, layer_state, num_tokens, layout: DocumentLayout | None = None) -> torch.Tensor:
        """Q and K stacked, `[B, T, 2, C]` (one RoPE pass serves both)."""
        if not self.share_qk:
            return torch.stack((self.q_proj(x), self.k_proj(x)), dim=2)
        # One projection, told apart by conv_q and conv_k; both convs read it, so they share one state.
        conv_states = layer_state.conv_states if layer_state is not None else {}
        qk, conv_states["qk"] = causal_depthwise_conv(self.q_proj(x), *self.qk_conv_parameters(),
                                                      conv_states.get("qk"), num_tokens, layout)
        return qk

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, H, T, d]"""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def checkpoint_group(self) -> int:
        """Mini-batches per recomputation group in backward (training only)."""
        return self.config.scan_checkpoint_group_size if self.training else 0

    def inner_loop_params(self) -> InnerLoopParams:
        """What the inner-loop op takes besides the views, learning rates and state, built once per forward."""
        return InnerLoopParams(self.token_scale(), self.ttt_norm_weight, self.ttt_norm_bias, self.checkpoint_group())

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, layer_state=None, num_tokens: torch.Tensor | None = None,
                inner_loop=None, layout: DocumentLayout | None = None):
        """hidden_states: `[B, T, C]`, right-padded when `num_tokens` (`[B]`) is given. `inner_loop` is the op of
        the model's backend for this forward (`modeling_ttt.ops.get_backend`); by default the one `ttt_impl` gives.

        `layout`: the rows hold packed documents (`modeling_ttt.packing`), each a fresh sequence for the inner
        loop; `layer_state` then holds no state yet and receives that of each row's last document."""
        batch, seq_len, _ = hidden_states.shape
        if inner_loop is None:
            inner_loop = get_ttt_ops(self.config.ttt_impl, self.layer_type, hidden_states.device, self.head_dim)
        if layout is not None:
            state = None  # every document starts afresh (G = 0), below
        elif layer_state is not None and layer_state.inner_state is not None:
            state = layer_state.inner_state
        else:
            state = InnerState.initial(self.inner_weights(), batch)

        # RoPE at each token's position inside its mini-batch, which follows the row's own token counter (with
        # packed documents, the token's index inside its document: mini-batches restart with each document)
        if layout is not None:
            positions = layout.index_in_doc % self.mini_batch_size  # [B, T]
        elif seq_len == 1:
            positions = (state.seen % self.mini_batch_size).unsqueeze(1)  # [B, 1]
        else:
            positions = state.seen.unsqueeze(1) + torch.arange(seq_len, device=hidden_states.device)
            positions = positions % self.mini_batch_size  # [B, T]
        qk = self.project_qk(hidden_states, layer_state, num_tokens, layout)
        rotation = self.rope_rotation[positions].view(batch, seq_len, 1, 1, self.head_dim // 2, 2)
        qk = apply_rotary(qk.unflatten(-1, (self.num_heads, self.head_dim)), rotation)  # [B, T, 2, H, d]
        xq, xk = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)
        xv = self.split_heads(self.v_proj(hidden_states))

        inner_lr = self.inner_lr(hidden_states)
        if num_tokens is not None:
            real = torch.arange(seq_len, device=hidden_states.device).unsqueeze(0) < num_tokens.unsqueeze(1)
            inner_lr = inner_lr.masked_fill(~real.unsqueeze(1), 0.0)

        if layout is None:
            out, new_state = inner_loop(xq, xk, xv, inner_lr, self.inner_loop_params(), state, num_tokens)
        else:
            # One op call per group of documents of similar length [n, H, L, ·], right-padded, then back.
            params, weights, outputs, states = self.inner_loop_params(), self.inner_weights(), [], []
            for group in layout.groups:
                views = (group.unpack(t) for t in (xq, xk, xv, inner_lr))
                fresh = InnerState.initial(weights, group.documents.shape[0])
                group_out, group_state = inner_loop(*views, params, fresh, group.lengths)
                outputs.append(group_out)
                states.append(group_state)
            out, new_state = layout.pack(outputs), layout.last_document_state(states)
        if layer_state is not None:
            layer_state.inner_state = new_state

        out = self.post_norm(out.transpose(1, 2).reshape(batch, seq_len, self.hidden_size))
        if self.use_gate:
            out = F.gelu(self.g_proj(hidden_states), approximate="tanh") * out
        return self.o_proj(out)


class TTTLinear(TTTLayerBase):
    """TTT-Linear: the inner model is `x W1 + b1` per head."""

    inner_weight_names = ("W1", "b1")
    layer_type = "linear"

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.W1 = nn.Parameter(torch.empty(self.num_heads, self.head_dim, self.head_dim))
        self.b1 = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim))



class TTTMLP(TTTLayerBase):
    """TTT-MLP: the inner model is `gelu(x W1 + b1) W2 + b2` per head, hidden width `4 d`."""

    inner_weight_names = ("W1", "b1", "W2", "b2")
    layer_type = "mlp"

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        hidden = 4 * self.head_dim
        self.W1 = nn.Parameter(torch.empty(self.num_heads, self.head_dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(self.num_heads, 1, hidden))
        self.W2 = nn.Parameter(torch.empty(self.num_heads, hidden, self.head_dim))
        self.b2 = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim))


TTT_LAYER_CLASSES = {"linear": TTTLinear, "mlp": TTTMLP}

