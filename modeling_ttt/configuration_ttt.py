"""Configuration of TTT language models (Sun et al., 2024, arXiv 2407.04620).

Field names follow the official PyTorch port (test-time-training/ttt-lm-pytorch) so that its config files
load unchanged; the two backbones of the paper are combinations of flags:

* Mamba backbone (upstream ``ttt_linear`` / ``ttt_mlp``): ``pre_conv=True, share_qk=True, use_gate=True``.
* Transformer backbone (upstream ``ttt_linear_base`` / ``ttt_mlp_base``): all three False.
"""

from __future__ import annotations

import os

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

TTT_LAYER_TYPES = ("linear", "mlp")
TTT_IMPLEMENTATIONS = ("torch", "triton", "cpp", "auto")

# Presets shipped as JSON under `configuration/` (paper Table 5 sizes).
PRESET_NAMES = tuple(
    f"{size}-{kind}" for size in ("125m", "350m", "760m", "1.3b") for kind in ("linear", "mlp")
)


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
        """Raise `ValueError` naming the field and the allowed values for any wrong setting."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "mini_batch_size", "conv_kernel")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TTTConfig.{name} must be an integer >= 1, got {value!r}.")
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
        if self.ttt_layer_type not in TTT_LAYER_TYPES:
            raise ValueError(
                f"TTTConfig.ttt_layer_type must be one of {TTT_LAYER_TYPES}, got {self.ttt_layer_type!r}."
            )
        if self.ttt_impl not in TTT_IMPLEMENTATIONS:
            raise ValueError(f"TTTConfig.ttt_impl must be one of {TTT_IMPLEMENTATIONS}, got {self.ttt_impl!r}.")
        for name in ("ttt_base_lr", "initializer_range", "rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"TTTConfig.{name} must be > 0, got {value!r}.")
        if self.scan_checkpoint_group_size < 0:
            raise ValueError(
                f"TTTConfig.scan_checkpoint_group_size must be >= 0 (0 disables), got {self.scan_checkpoint_group_size}."
            )
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"TTTConfig.hidden_act {self.hidden_act!r} is unknown; allowed: {sorted(ACT2FN)}.")

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
