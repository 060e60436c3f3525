"""A TTT model's one-token decoding step through every block as one C++ call (`ttt_linear_decode_blocks`).

Decoding on a CPU is bound by memory and by the number of PyTorch launches, not by arithmetic; this step runs all
blocks' projections, norms, convs and inner steps in one call, with no Python between blocks. It reimplements the
plain modules (`TTTBlock` with TTT-Linear, `RMSNorm`, `nn.Linear` without bias, SwiGLU with SiLU, the causal
convs), so it runs only when every block is exactly those modules, without hooks: a PEFT adapter, a quantized
linear, a forward hook or an instance-level `forward` (accelerate) leaves the step to the modules, whose inner
step still runs as the `ttt_linear_decode` kernel.

The kernel parameters are gathered once per model (`DecodePlan.build`, as the modules store them, so in-place
updates and `.to()` are seen) and kept while the plan is current (`DecodePlan.is_current`, every step): every
submodule, parameter, buffer, `forward` override and norm epsilon under the blocks is still the object it was, no
module under them has a hook, and the dtype is the one it was built for.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.activations import SiLUActivation

from .. import cpu as kernels
from ..state import LAYER_NORM_EPS, InnerState
from . import BLOCK_PARAMETERS

_DTYPES = (torch.float32, torch.float64)
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # TTTModel -> its current DecodePlan


def decode_step(model: nn.Module, hidden_states: torch.Tensor, cache) -> torch.Tensor | None:
    """Every block's one-token step (`[B, 1, C]` in and out) with the cache's state updated, or None when this step
    cannot run as the one call (autograd, autocast, a dtype the kernel does not take, a fresh cache, blocks that are
    not the plain modules); the caller then runs the blocks."""
    if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not cache.is_initialized
            or hidden_states.device.type != "cpu" or hidden_states.dtype not in _DTYPES
            or kernels.build_error() is not None):
        return None
    plan = _plans.get(model)
    if plan is None or not plan.is_current(hidden_states):
        plan = DecodePlan.build(model, hidden_states)
        if plan is None:
            _plans.pop(model, None)
            return None
        _plans[model] = plan
    return plan.step(hidden_states, cache)


def current_plan(model: nn.Module) -> DecodePlan | None:
    """The plan kept for `model` (tests and benchmarks use it to see whether the one-call step ran)."""
    return _plans.get(model)


def _plain(module: nn.Module, cls: type) -> bool:
    """`module` is exactly a `cls` (not a subclass such as an adapter), has no forward hooks and its `forward` is
    not replaced on the instance (as accelerate's hooks do)."""
    return (type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in vars(module))


def _plain_weight(linear: nn.Module) -> torch.Tensor | None:
    """The weight of a plain bias-free `nn.Linear`, else None."""
    if not _plain(linear, nn.Linear) or linear.bias is not None:
        return None
    return linear.weight


def _plain_conv(conv: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of a plain `nn.Conv1d` with a bias, else (None, None)."""
    if not _plain(conv, nn.Conv1d) or conv.bias is None:
        return None, None
    return conv.weight, conv.bias


def block_arguments(block: nn.Module, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """`block`'s kernel parameters (`BLOCK_PARAMETERS`, empty tensors for absent parts) when it is the plain TTT-Linear
    block the kernel reimplements, in `dtype`, else None."""
    from ...layers import RMSNorm, SwiGLUMLP, TTTConvBlock, TTTLinear  # (what the kernel reimplements)
    from ...modeling_ttt import TTTBlock

    layer, mlp = block.seq_modeling_block, block.mlp
    if not (_plain(block, TTTBlock) and _plain(layer, TTTLinear) and _plain(mlp, SwiGLUMLP)
            and _plain(block.seq_norm, RMSNorm) and _plain(block.ffn_norm, RMSNorm)
            and block.seq_norm.variance_epsilon == block.ffn_norm.variance_epsilon
            and _plain(mlp.act_fn, SiLUActivation) and _plain(layer.post_norm, nn.LayerNorm)):
        return None
    empty = torch.empty(0, dtype=dtype)
    arguments = dict.fromkeys(BLOCK_PARAMETERS, empty)
    if block.pre_conv:
        conv_block = block.conv
        if not (_plain(conv_block, TTTConvBlock) and _plain(conv_block.norm, RMSNorm)
                and conv_block.norm.variance_epsilon == block.seq_norm.variance_epsilon):
            return None
        arguments["pre_norm_weight"] = conv_block.norm.weight
        arguments["pre_conv_weight"], arguments["pre_conv_bias"] = _plain_conv(conv_block.conv)
    arguments["seq_norm_weight"] = block.seq_norm.weight
    arguments["q"], arguments["v"], arguments["o"] = (_plain_weight(layer.q_proj), _plain_weight(layer.v_proj),
                                                      _plain_weight(layer.o_proj))
    if not layer.share_qk:
        arguments["k"] = _plain_weight(layer.k_proj)
    else:
        arguments["conv_q_weight"], arguments["conv_q_bias"] = _plain_conv(layer.conv_q)
        arguments["conv_k_weight"], arguments["conv_k_bias"] = _plain_conv(layer.conv_k)
    if layer.use_gate:
        arguments["g"] = _plain_weight(layer.g_proj)
    arguments["lr_weight"], arguments["lr_bias"] = layer.learnable_ttt_lr_weight, layer.learnable_ttt_lr_bias
    arguments["rope"], arguments["token_idx"] = layer.rope_rotation, layer.token_idx
    arguments["learnable_token_idx"] = layer.learnable_token_idx
    arguments["ttt_norm_weight"], arguments["ttt_norm_bias"] = layer.ttt_norm_weight, layer.ttt_norm_bias
    arguments["post_norm_weight"], arguments["post_norm_bias"] = layer.post_norm.weight, layer.post_norm.bias
    arguments["ffn_norm_weight"] = block.ffn_norm.weight
    arguments["gate"], arguments["up"], arguments["down"] = (_plain_weight(mlp.gate_proj), _plain_weight(mlp.up_proj),
                                                             _plain_weight(mlp.down_proj))
    values = list(arguments.values())
    if any(value is None for value in values) or arguments["gate"].dtype != dtype:
        return None
    return values


def block_constants(block: nn.Module) -> tuple:
    """(pre_conv, share_qk, inner learning-rate scale η_base/d, inner LayerNorm eps, post-norm eps, RMSNorm eps)."""
    layer = block.seq_modeling_block
    return (block.pre_conv, layer.share_qk, layer.config.ttt_base_lr / layer.head_dim, LAYER_NORM_EPS,
            layer.post_norm.eps, block.seq_norm.variance_epsilon)


class DecodePlan:
    """The gathered kernel parameters of all blocks and what must stay the same for them to be current."""

    _ATTRIBUTES = ("forward", "pre_conv", "share_qk", "use_gate", "variance_epsilon", "eps")

    def __init__(self, params, constants, checks, modules, dtype):
        self.params, self.constants, self.checks, self.modules, self.dtype = params, constants, checks, modules, dtype

    @classmethod
    def build(cls, model: nn.Module, hidden_states: torch.Tensor) -> DecodePlan | None:
        dtype = hidden_states.dtype
        params = []
        for block in model.layers:
            arguments = block_arguments(block, dtype)
            if arguments is None:
                return None
            params += arguments
        constants = {block_constants(block) for block in model.layers}
        if len(constants) != 1:
            return None  # the kernel takes one set of constants and conv layout for all blocks
        checks = [(vars(model)["_modules"], "layers", model.layers)]
        modules = list(model.layers.modules())
        for module in modules:
            # (an attribute absent at build time is one the kernel does not read there; `forward` may be added)
            state = vars(module)
            checks += [(state, name, state.get(name)) for name in cls._ATTRIBUTES if name == "forward" or name in state]
            for members in (module._modules, module._parameters, module._buffers):
                checks += [(members, name, member) for name, member in members.items()]
        return cls(params, constants.pop(), checks, modules, dtype)

    def is_current(self, hidden_states: torch.Tensor) -> bool:
        if hidden_states.dtype != self.dtype or self.params[-1].dtype != self.dtype:
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        if any(module._forward_hooks or module._forward_pre_hooks for module in self.modules):
            return False
        return all(members.get(name) is member for members, name, member in self.checks)

    def step(self, hidden_states: torch.Tensor, cache) -> torch.Tensor:
        """Run `ttt_linear_decode_blocks` over all blocks and store each layer's new state in the cache."""
        pre_conv, share_qk, *constants = self.constants
        conv_states, inner_states = [], []
        for layer_state in cache.layers:
            state, convs = layer_state.inner_state, layer_state.conv_states
            conv_states += (convs.get("pre_conv"), convs.get("qk"))
            inner_states += (*state.weights, *state.grads, state.seen)
        outputs = torch.ops.modeling_ttt_cpu.ttt_linear_decode_blocks(hidden_states, self.params, conv_states,
                                                                       inner_states, constants)
        for i, layer_state in enumerate(cache.layers):
            pre_conv_state, qk_state, w, b, g_w, g_b, seen = outputs[1 + 7 * i : 8 + 7 * i]
            layer_state.inner_state = InnerState((w, b), (g_w, g_b), seen)
            if pre_conv:
                layer_state.conv_states["pre_conv"] = pre_conv_state
            if share_qk:
                layer_state.conv_states["qk"] = qk_state
        return outputs[0]


__all__ = ["DecodePlan", "block_arguments", "current_plan", "decode_step"]
