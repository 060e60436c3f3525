"""Parameter-level mapping between upstream JAX TTT checkpoints and the `modeling_ttt` state dict.

Every parameter maps one-to-one; the only differences are layout conventions:

* flax `Dense` stores kernels as `[in, out]`, `torch.nn.Linear` as `[out, in]`  → transpose;
* flax depthwise `Conv` stores `[width, 1, channels]`, `torch.nn.Conv1d` `[channels, 1, width]` → reverse the
  axes. Both compute a cross-correlation with left (causal) padding, so the kernel is *not* flipped in time;
* the per-head TTT learning-rate projection is `[heads, C, 1]` upstream and `[heads, 1, C]` here.

RoPE needs no permutation: `modeling_ttt` (like the official PyTorch port) permutes activations instead.
All three layout transforms are involutions, so the same transform maps back from PyTorch to JAX.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .msgpack_checkpoint import KeyPath, format_key

# How many keys an error message lists before summarising the rest.
_MAX_LISTED_KEYS = 12


class ParameterMappingError(ValueError):
    """A checkpoint's tensors do not match the parameters the model config calls for."""


class Transform(enum.Enum):
    """Layout change from a JAX tensor to its PyTorch counterpart (each is its own inverse)."""

    IDENTITY = "identity"
    TRANSPOSE = "transpose"  # flax Dense [in, out] <-> nn.Linear [out, in]
    REVERSE_AXES = "reverse_axes"  # flax depthwise Conv [K, 1, C] <-> nn.Conv1d [C, 1, K]
    SWAP_LAST_TWO = "swap_last_two"  # learnable_ttt_lr [H, C, 1] <-> [H, 1, C]

    @property
    def ndim(self) -> int | None:
        """The rank the transform requires, or None for any rank."""
        return {Transform.IDENTITY: None, Transform.TRANSPOSE: 2, Transform.REVERSE_AXES: 3, Transform.SWAP_LAST_TWO: 3}[self]

    def axes(self, ndim: int) -> tuple[int, ...]:
        """The axis permutation of the transform for a tensor of rank `ndim`."""
        if self is Transform.IDENTITY:
            return tuple(range(ndim))
        if self.ndim != ndim:
            raise ValueError(f"{self.value} needs a {self.ndim}-d tensor, got {ndim}-d")
        if self is Transform.SWAP_LAST_TWO:
            return (0, 2, 1)
        return tuple(reversed(range(ndim)))

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape after the transform (also its preimage, since the transform is an involution)."""
        return tuple(shape[axis] for axis in self.axes(len(shape)))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Apply the transform; the result is C-contiguous so it can be handed to torch/safetensors as is."""
        if self is Transform.IDENTITY:
            return array
        return np.ascontiguousarray(np.transpose(array, self.axes(array.ndim)))


@dataclass(frozen=True)
class ParameterSpec:
    """One checkpoint tensor: its upstream key, its `modeling_ttt` state-dict key, and the layout transform."""

    jax_key: KeyPath
    hf_key: str
    transform: Transform


def _hf_field(config: Mapping[str, Any] | Any, name: str) -> Any:
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


def parameter_specs(config: Mapping[str, Any] | Any) -> list[ParameterSpec]:
    """All parameters of a model, from its `TTTConfig` (or the kwargs / dict of one).

    The set of tensors depends on `num_hidden_layers`, `ttt_layer_type`, `pre_conv`, `share_qk`, `use_gate`
    and `tie_word_embeddings` (a tied LM head is not stored upstream).
    """
    num_layers = int(_hf_field(config, "num_hidden_layers"))
    layer_type = _hf_field(config, "ttt_layer_type")
    pre_conv = bool(_hf_field(config, "pre_conv"))
    share_qk = bool(_hf_field(config, "share_qk"))
    use_gate = bool(_hf_field(config, "use_gate"))
    tied = bool(_hf_field(config, "tie_word_embeddings"))
    if layer_type not in ("linear", "mlp"):
        raise ParameterMappingError(f"ttt_layer_type {layer_type!r} has no upstream counterpart")

    identity, transpose = Transform.IDENTITY, Transform.TRANSPOSE
    specs = [
        ParameterSpec(("model", "wte", "embedding"), "model.embed_tokens.weight", identity),
        ParameterSpec(("model", "ln_f", "kernel"), "model.norm.weight", identity),
    ]
    if not tied:
        specs.append(ParameterSpec(("lm_head", "kernel"), "lm_head.weight", transpose))

    for i in range(num_layers):
        jax_layer: KeyPath = ("model", "h", str(i))
        hf_layer = f"model.layers.{i}"
        jax_ttt = (*jax_layer, "seq_modeling_block")
        hf_ttt = f"{hf_layer}.seq_modeling_block"

        def layer(jax_suffix: KeyPath, hf_suffix: str, transform: Transform) -> ParameterSpec:
            return ParameterSpec((*jax_layer, *jax_suffix), f"{hf_layer}.{hf_suffix}", transform)

        def ttt(jax_suffix: KeyPath, hf_suffix: str, transform: Transform = identity) -> ParameterSpec:
            return ParameterSpec((*jax_ttt, *jax_suffix), f"{hf_ttt}.{hf_suffix}", transform)

        specs += [
            layer(("seq_norm", "kernel"), "seq_norm.weight", identity),
            layer(("ffn_norm", "kernel"), "ffn_norm.weight", identity),
            # w1 is the SiLU-gated branch of upstream's SwiGLU, w3 the linear one.
            layer(("feed_forward", "w1", "kernel"), "mlp.gate_proj.weight", transpose),
            layer(("feed_forward", "w3", "kernel"), "mlp.up_proj.weight", transpose),
            layer(("feed_forward", "w2", "kernel"), "mlp.down_proj.weight", transpose),
        ]
        if pre_conv:
            specs += [
                layer(("conv", "conv_norm", "kernel"), "conv.norm.weight", identity),
                layer(("conv", "conv1", "kernel"), "conv.conv.weight", Transform.REVERSE_AXES),
                layer(("conv", "conv1", "bias"), "conv.conv.bias", identity),
            ]
        specs += [ttt(("wq", "kernel"), "q_proj.weight", transpose)]
        if share_qk:
            # One projection feeds both Q and K; two depthwise causal convs then tell them apart.
            for name in ("conv_q", "conv_k"):
                specs += [
                    ttt((name, "kernel"), f"{name}.weight", Transform.REVERSE_AXES),
                    ttt((name, "bias"), f"{name}.bias"),
                ]
        else:
            specs += [ttt(("wk", "kernel"), "k_proj.weight", transpose)]
        specs += [
            ttt(("wv", "kernel"), "v_proj.weight", transpose),
            ttt(("wo", "kernel"), "o_proj.weight", transpose),
        ]
        if use_gate:
            specs += [ttt(("wg", "kernel"), "g_proj.weight", transpose)]
        # Upstream registers these per-head parameters under flattened names: "learnable_ttt_lr/kernel" is ONE
        # key element, not two.
        specs += [
            ttt(("learnable_ttt_lr/kernel",), "learnable_ttt_lr_weight", Transform.SWAP_LAST_TWO),
            ttt(("learnable_ttt_lr/bias",), "learnable_ttt_lr_bias"),
            ttt(("learnable_token_idx",), "learnable_token_idx"),
            ttt(("ttt_norm/scale",), "ttt_norm_weight"),
            ttt(("ttt_norm/bias",), "ttt_norm_bias"),
            ttt(("post_norm", "scale"), "post_norm.weight"),
            ttt(("post_norm", "bias"), "post_norm.bias"),
            ttt(("ttt_dense_0",), "W1"),
            ttt(("ttt_bias_0",), "b1"),
        ]
        if layer_type == "mlp":
            specs += [ttt(("ttt_dense_1",), "W2"), ttt(("ttt_bias_1",), "b2")]
    return specs


def jax_parameter_shapes(config: Mapping[str, Any] | Any) -> dict[KeyPath, tuple[int, ...]]:
    """The shape of every upstream parameter for a `TTTConfig` (or its kwargs), as upstream's model creates them."""
    c = int(_hf_field(config, "hidden_size"))
    h = int(_hf_field(config, "num_attention_heads"))
    d = c // h
    inner = 4 * d  # hidden width of the TTT-MLP inner model
    m = int(_hf_field(config, "mini_batch_size"))
    v = int(_hf_field(config, "vocab_size"))
    i_size = int(_hf_field(config, "intermediate_size"))
    mlp = _hf_field(config, "ttt_layer_type") == "mlp"

    ttt_leaves: dict[str, tuple[int, ...]] = {
        "learnable_ttt_lr/kernel": (h, c, 1),
        "learnable_ttt_lr/bias": (h, 1),
        "learnable_token_idx": (m,),
        "ttt_norm/scale": (h, d),
        "ttt_norm/bias": (h, d),
        "ttt_dense_0": (h, d, inner) if mlp else (h, d, d),
        "ttt_bias_0": (h, 1, inner) if mlp else (h, 1, d),
        "ttt_dense_1": (h, inner, d),
        "ttt_bias_1": (h, 1, d),
    }
    # Keyed by the last two key elements (module, leaf).
    module_leaves: dict[tuple[str, str], tuple[int, ...]] = {
        ("wte", "embedding"): (v, c),
        ("lm_head", "kernel"): (c, v),
        ("w1", "kernel"): (c, i_size),
        ("w3", "kernel"): (c, i_size),
        ("w2", "kernel"): (i_size, c),
        ("post_norm", "scale"): (c,),
        ("post_norm", "bias"): (c,),
    }
    for norm in ("ln_f", "seq_norm", "ffn_norm", "conv_norm"):
        module_leaves[(norm, "kernel")] = (c,)
    # conv_kernel only matters (and may only be set) when the model has a block pre-conv or Q/K convs.
    if bool(_hf_field(config, "pre_conv")) or bool(_hf_field(config, "share_qk")):
        k = int(_hf_field(config, "conv_kernel"))
        for conv in ("conv1", "conv_q", "conv_k"):
            module_leaves[(conv, "kernel")] = (k, 1, c)
            module_leaves[(conv, "bias")] = (c,)
    for proj in ("wq", "wk", "wv", "wo", "wg"):
        module_leaves[(proj, "kernel")] = (c, c)

    def shape_of(key: KeyPath) -> tuple[int, ...]:
        if key[-2] == "seq_modeling_block" and key[-1] in ttt_leaves:
            return ttt_leaves[key[-1]]
        return module_leaves[(key[-2], key[-1])]

    return {spec.jax_key: shape_of(spec.jax_key) for spec in parameter_specs(config)}


def _list_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    if len(keys) > _MAX_LISTED_KEYS:
        shown += f", … and {len(keys) - _MAX_LISTED_KEYS} more"
    return shown


def _check(problems: list[str], what: str) -> None:
    if problems:
        raise ParameterMappingError(f"{what}: " + "; ".join(problems))


def jax_to_hf(
    params: Mapping[KeyPath, np.ndarray],
    specs: Sequence[ParameterSpec],
    expected_hf_shapes: Mapping[str, Sequence[int]],
) -> dict[str, np.ndarray]:
    """Map upstream parameters to `modeling_ttt` state-dict entries, checking that they fit exactly.

    Args:
        params: upstream parameters keyed relative to the params root.
        specs: the mapping for the target config (`parameter_specs`).
        expected_hf_shapes: the shape of every entry of the target model's state dict that the checkpoint must
            provide (tied weights excluded).

    Raises:
        ParameterMappingError: listing, in one message, every checkpoint tensor the model has no place for,
            every tensor the model needs but the checkpoint lacks, and every shape mismatch.
    """
    problems: list[str] = []
    mapped_jax = {spec.jax_key for spec in specs}
    unused = [format_key(key) for key in params if key not in mapped_jax]
    if unused:
        problems.append(f"{len(unused)} checkpoint tensor(s) not used by this model config: {_list_keys(unused)}")
    missing = [f"{format_key(spec.jax_key)} (for {spec.hf_key})" for spec in specs if spec.jax_key not in params]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_list_keys(missing)}")
    mapped_hf = {spec.hf_key for spec in specs}
    unfilled = [key for key in expected_hf_shapes if key not in mapped_hf]
    if unfilled:
        problems.append(f"{len(unfilled)} model parameter(s) with no checkpoint counterpart: {_list_keys(unfilled)}")
    unknown = [spec.hf_key for spec in specs if spec.hf_key not in expected_hf_shapes]
    if unknown:
        problems.append(f"{len(unknown)} mapped parameter(s) that the model does not have: {_list_keys(unknown)}")

    for spec in specs:
        if spec.jax_key not in params or spec.hf_key not in expected_hf_shapes:
            continue
        hf_shape = tuple(expected_hf_shapes[spec.hf_key])
        found = tuple(params[spec.jax_key].shape)
        try:
            expected = spec.transform.shape(hf_shape)
        except ValueError:
            expected = None
        if expected != found:
            problems.append(
                f"{format_key(spec.jax_key)}: expected shape "
                f"{expected if expected is not None else f'of rank {spec.transform.ndim}'}, found {found} "
                f"(maps to {spec.hf_key})"
            )
    _check(problems, "checkpoint does not match the model")
    return {spec.hf_key: spec.transform.apply(params[spec.jax_key]) for spec in specs}


def hf_to_jax(
    state_dict: Mapping[str, np.ndarray],
    specs: Sequence[ParameterSpec],
    expected_jax_shapes: Mapping[KeyPath, Sequence[int]],
    *,
    ignored_hf_keys: frozenset[str] = frozenset(),
) -> dict[KeyPath, np.ndarray]:
    """Map `modeling_ttt` state-dict entries back to upstream parameters (the inverse of `jax_to_hf`).

    `ignored_hf_keys` names entries that may be present but have no upstream tensor (a tied LM head).
    """
    problems: list[str] = []
    mapped_hf = {spec.hf_key for spec in specs}
    unused = [key for key in state_dict if key not in mapped_hf and key not in ignored_hf_keys]
    if unused:
        problems.append(f"{len(unused)} model tensor(s) with no upstream counterpart: {_list_keys(unused)}")
    missing = [spec.hf_key for spec in specs if spec.hf_key not in state_dict]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the model: {_list_keys(missing)}")
    for spec in specs:
        if spec.hf_key not in state_dict:
            continue
        expected = tuple(expected_jax_shapes[spec.jax_key])
        hf_shape = tuple(state_dict[spec.hf_key].shape)
        try:
            found = spec.transform.shape(hf_shape)
        except ValueError:
            found = None
        if found != expected:
            problems.append(
                f"{spec.hf_key}: expected shape {spec.transform.shape(expected)}, found {hf_shape} "
                f"(maps to {format_key(spec.jax_key)})"
            )
    _check(problems, "model weights do not match its config")
    return {spec.jax_key: spec.transform.apply(state_dict[spec.hf_key]) for spec in specs}
