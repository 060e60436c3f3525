"""Configuration of TTT language models (Sun et al., 2024, arXiv 2407.04620).

Field names follow the official PyTorch port (test-time-training/ttt-lm-pytorch) so that its config files
load unchanged; the two backbones of the paper are combinations of flags:

* Mamba backbone (upstream ``ttt_linear`` / ``ttt_mlp``): ``pre_conv=True, share_qk=True, use_gate=True``.
* Transformer backbone (upstream ``ttt_linear_base`` / ``ttt_mlp_base``): all three False.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .ops import TTT_IMPLEMENTATIONS

TTT_LAYER_TYPES = ("linear", "mlp")

# Presets shipped as JSON under `configuration/`: the paper's Table 5 sizes, and a 5M-parameter TTT-Linear that
# trains in minutes on a laptop CPU (`ttt-train`'s default).
PRESET_NAMES = tuple(
    f"{size}-{kind}" for size in ("125m", "350m", "760m", "1.3b") for kind in ("linear", "mlp")
) + ("5m-linear",)


# ----------------------------------------------------------------------------------------------------------------
# What each field accepts
# ----------------------------------------------------------------------------------------------------------------
#
# `@strict` cannot check these fields: with `from __future__ import annotations` (here and in transformers) the
# annotations are strings, which huggingface_hub's validators skip. So every field is checked here, by name, when it
# is set (at construction, by `from_pretrained(..., field=value)`, or later) and again by `check_ttt_fields`. JSON
# spells what Python would coerce silently: `"false"` is a true value, `1.5` is not a group size, so the rules take
# types literally (a bool field takes only True/False; an int field neither a bool nor a float such as 2.0).


@dataclass(frozen=True)
class FieldRule:
    """The values one config field accepts: `allows(value)`, and `allowed`, the end of "TTTConfig.x must be ..."."""

    allows: Callable[[Any], bool]
    allowed: str


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_id(value) -> bool:
    return _is_int(value) and value >= 0


def boolean(optional: bool = False) -> FieldRule:
    if optional:
        return FieldRule(lambda value: value is None or isinstance(value, bool), "true, false or null (not a string)")
    return FieldRule(lambda value: isinstance(value, bool), "true or false (a boolean, not a string or a number)")


def integer(minimum: int, note: str = "") -> FieldRule:
    return FieldRule(lambda value: _is_int(value) and value >= minimum, f"an integer >= {minimum}{note}")


def positive_number() -> FieldRule:
    """A finite float > 0, or an int (a whole number written without a decimal point); not a bool or a string."""

    def allows(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return value > 0 and math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False

    return FieldRule(allows, "a finite number > 0")


def one_of(choices: tuple[str, ...]) -> FieldRule:
    return FieldRule(lambda value: isinstance(value, str) and value in choices, f"one of {choices}")


def token_id() -> FieldRule:
    return FieldRule(lambda value: value is None or _is_token_id(value), "null or a token id (an integer >= 0)")


def token_ids() -> FieldRule:
    """`eos_token_id`: generation stops at any of several tokens."""

    def allows(value) -> bool:
        if isinstance(value, (list, tuple)):
            return len(value) > 0 and all(_is_token_id(v) for v in value)
        return value is None or _is_token_id(value)

    return FieldRule(allows, "null, a token id (an integer >= 0) or a non-empty list of token ids")


FIELD_RULES: dict[str, FieldRule] = {
    "vocab_size": integer(1),
    "hidden_size": integer(1),
    "intermediate_size": integer(1),
    "num_hidden_layers": integer(1),
    "num_attention_heads": integer(1),
    "hidden_act": one_of(tuple(sorted(ACT2FN))),
    "max_position_embeddings": integer(1),
    "initializer_range": positive_number(),
    "rms_norm_eps": positive_number(),
    "rope_theta": positive_number(),
    "tie_word_embeddings": boolean(),
    "use_cache": boolean(),
    "pad_token_id": token_id(),
    "bos_token_id": token_id(),
    "eos_token_id": token_ids(),
    "ttt_layer_type": one_of(TTT_LAYER_TYPES),
    "mini_batch_size": integer(1),
    "ttt_base_lr": positive_number(),
    "pre_conv": boolean(),
    "conv_kernel": integer(1),
    "share_qk": boolean(),
    "use_gate": boolean(),
    "scan_checkpoint_group_size": integer(0, " (0 disables)"),
    "ttt_impl": one_of(TTT_IMPLEMENTATIONS),
    # Fields of `PreTrainedConfig` that the model or `generate()` reads.
    "output_hidden_states": boolean(optional=True),
    "return_dict": boolean(optional=True),
    "is_encoder_decoder": boolean(),
}

# Token ids that must name a row of the embedding (`pad_token_id` is its padding row) or a token `generate()` can
# produce (an `eos_token_id` outside the vocabulary never ends a generation).
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def check_field(name: str, value) -> None:
    """Raise `ValueError` naming the field, the value given and what is allowed if `value` is not allowed."""
    rule = FIELD_RULES[name]
    if not rule.allows(value):
        raise ValueError(f"TTTConfig.{name} must be {rule.allowed}, got {value!r} ({type(value).__name__}).")


@strict
class TTTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`TTTForCausalLM`].

    Args:
        vocab_size: size of the token vocabulary.
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU feed-forward block.
        num_hidden_layers: number of blocks.
        num_attention_heads: number of TTT heads; each head owns one inner model of width
            `hidden_size // num_attention_heads`.
        hidden_act: activation of the feed-forward block (`"silu"` in every official model).
        max_position_embeddings: longest context the model was trained on (informational: TTT layers apply
            RoPE to the position *inside* the mini-batch, so any length runs).
        initializer_range: standard deviation of the normal initialisation.
        rms_norm_eps: epsilon of the RMSNorm layers.
        rope_theta: RoPE base.
        tie_word_embeddings: share the input embedding and the LM head.
        ttt_layer_type: `"linear"` (TTT-Linear, inner model `x W + b`) or `"mlp"` (TTT-MLP, a two-layer GELU MLP
            of hidden width `4 * head_dim`).
        mini_batch_size: tokens per inner gradient step (`b` in the paper, Sec. 2.5).
        ttt_base_lr: base inner learning rate `η_base` (Sec. 2.7); the per-token rate is
            `η_base · sigmoid(θ_lr · x) / head_dim`.
        pre_conv: add the causal-conv block before each TTT layer (Mamba backbone).
        conv_kernel: width of every causal convolution.
        share_qk: one Q/K projection followed by separate causal convs for Q and K (Mamba backbone).
        use_gate: multiply the TTT output by `gelu(W_g x)` (Mamba backbone).
        scan_checkpoint_group_size: while training, recompute the inner loop in groups of this many
            mini-batches in the backward pass instead of storing it (0 = store everything). No effect on outputs.
        ttt_impl: implementation of the inner loop: `"torch"` (the PyTorch reference ops, any device),
            `"triton"` (fused Triton kernels; needs `triton` and a CUDA device, or `TRITON_INTERPRET=1` on CPU,
            else an error is raised, never a silent fallback), `"cpp"` (a C++ CPU kernel for decoding with
            TTT-Linear, one token per row without autograd, built on first use; the reference for everything
            else), or `"auto"` (default: Triton when the tensors are on a CUDA device, `triton` is installed and
            head_dim ≤ 64; "cpp" on the CPU when the kernel builds; the reference otherwise). The environment
            variable `TTT_IMPL` overrides this field (for benchmarking). All give the same results up to rounding.
    """

    model_type = "ttt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the output name of either release

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    ttt_layer_type: str = "linear"
    mini_batch_size: int = 16
    ttt_base_lr: float = 1.0
    pre_conv: bool = False
    conv_kernel: int = 4
    share_qk: bool = False
    use_gate: bool = False
    scan_checkpoint_group_size: int = 0
    ttt_impl: str = "auto"

    def __setattr__(self, name, value):
        # Every assignment of a field is checked: by the generated `__init__`, by `from_pretrained(..., name=value)`
        # (which sets it after construction) and by users.
        if name in FIELD_RULES:
            check_field(name, value)
        super().__setattr__(name, value)

    def __post_init__(self, **kwargs):
        # Our checks run first so that a wrong value is a plain `ValueError` naming the field (the `@strict`
        # validators would wrap it in huggingface_hub's own exception type).
        self.check_ttt_fields()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """`@strict` validator (also run on `validate()`)."""
        super().validate_architecture()
        self.check_ttt_fields()

    def check_ttt_fields(self):
        """Raise `ValueError` naming the field, the value and the allowed values for any wrong setting: each field
        against its rule in `FIELD_RULES`, then the rules that involve several fields."""
        for name in FIELD_RULES:
            check_field(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"TTTConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"TTTConfig head_dim = hidden_size // num_attention_heads = "
                f"{self.hidden_size // self.num_attention_heads} must be even (RoPE rotates pairs)."
            )
        for name in TOKEN_ID_FIELDS:
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) else [value]
            if any(token is not None and token >= self.vocab_size for token in ids):
                raise ValueError(
                    f"TTTConfig.{name} must be a token id < vocab_size ({self.vocab_size}), got {value!r}."
                )

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PreTrainedConfig.from_dict`, then the checks again: `from_pretrained(..., name=value)` sets fields after
        construction, one at a time (each checked by `__setattr__`), so the rules between fields are checked here."""
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config.check_ttt_fields()
        return result

    def save_pretrained(self, save_directory, *args, **kwargs):
        """[`PreTrainedConfig.save_pretrained`]; after `TTTConfig.register_for_auto_class()` the folder also gets
        the modeling code and `auto_map` (`modeling_ttt.hub`: transformers' own copy of this package's files would
        fail on its subpackages)."""
        try:
            from .hub import CONFIG_AUTO_MAP, save_pretrained_with_code
        except ImportError:  # this is the remote-code copy (no hub module): transformers' own save copies it
            return super().save_pretrained(save_directory, *args, **kwargs)
        return save_pretrained_with_code(self, super().save_pretrained, save_directory, *args,
                                         with_code=self._auto_class is not None, auto_map=CONFIG_AUTO_MAP, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TTTConfig":
        """Load one of the paper's sizes shipped in `configuration/`, e.g. `TTTConfig.from_preset("125m-linear")`."""
        if name not in PRESET_NAMES:
            raise ValueError(f"Unknown TTT preset {name!r}; available presets: {', '.join(PRESET_NAMES)}.")
        path = os.path.join(preset_dir(), f"ttt-{name}.json")
        config = cls.from_json_file(path)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"TTTConfig has no field {key!r}.")
            setattr(config, key, value)
        config.check_ttt_fields()
        return config


def preset_dir() -> str:
    """Folder holding the JSON presets: `configuration/` of the source tree, or its copy inside the package."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "presets"), os.path.join(os.path.dirname(here), "configuration")):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError("TTT presets folder not found (expected `configuration/` next to `modeling_ttt/`).")


__all__ = ["TTTConfig", "PRESET_NAMES"]
