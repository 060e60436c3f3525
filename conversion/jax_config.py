"""Model configs of `test-time-training/ttt-lm-jax` and their translation to `modeling_ttt.TTTConfig` fields.

Upstream describes a model by its `ModelConfig` (a transformers 4.x `PretrainedConfig`): either one of
the named presets in `ttt/models/model.py`, or a JSON dump of `ModelConfig.to_dict()`, optionally
patched field by field with `train.py --update_model_config`. This module reproduces that lookup
(without jax) and maps the result onto the field names of the official PyTorch port, which
`modeling_ttt.TTTConfig` shares.
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigConversionError(ValueError):
    """A JAX config cannot be read or has no `modeling_ttt` counterpart."""


# Defaults of upstream `ModelConfig.__init__`: fields a JSON file or preset leaves out take these values.
# Note `tie_word_embeddings=False` here although every preset sets True, so it must always be read.
JAX_MODEL_CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_sequence_length": 2048,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "tie_word_embeddings": False,
    "remat_block": "",
    "remat_attention": "",
    "remat_mlp": "",
    "remat_conv": "",
    "scan_attention": False,
    "scan_mlp": False,
    "scan_query_chunk_size": 1024,
    "scan_key_chunk_size": 1024,
    "scan_mlp_chunk_size": 1024,
    "fcm_min_ratio": 0.0,
    "fcm_max_ratio": 0.0,
}


def _ttt_preset(num_hidden_layers: int, hidden_size: int, num_attention_heads: int, intermediate_size: int) -> dict[str, Any]:
    # The four upstream "*-TTT" presets differ only in these sizes; everything else is shared.
    return {
        "vocab_size": 32000,
        "num_hidden_layers": num_hidden_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "max_sequence_length": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": True,
        "seq_modeling_block": "ttt_linear",
        "ttt_base_lr": 1.0,
        "ttt_base_lr_init": -1.0,
        "ttt_base_lr_warmup": -1,
        "mini_batch_size": 16,
        "remat_mini_batch_group_size": 4,
        "rope_theta": 10000.0,
        "pre_conv": True,
        "conv_width": 4,
    }


# Upstream's TTT presets (`CONFIGS` in ttt/models/model.py). TTT-MLP runs use them with an update such as
# `{"seq_modeling_block": "ttt_mlp", "ttt_base_lr": 0.1}`.
JAX_PRESETS: dict[str, dict[str, Any]] = {
    "125m-TTT": _ttt_preset(12, 768, 12, 2048),
    "350m-TTT": _ttt_preset(24, 1024, 16, 2736),
    "760m-TTT": _ttt_preset(24, 1536, 16, 4096),
    "1b-TTT": _ttt_preset(24, 2048, 32, 5504),
}

# Upstream's Transformer-baseline presets: named here only to explain why they cannot be converted.
JAX_SELF_ATTENTION_PRESETS = ("125m", "350m", "760m", "1b")

# Fields an update may set even when the loaded config does not list them (upstream checks `hasattr`,
# which is true for these on any ModelConfig or is how TTT fields get added to a bare JSON config).
_UPDATABLE_EXTRA_FIELDS = frozenset(
    {
        "seq_modeling_block",
        "mini_batch_size",
        "ttt_base_lr",
        "ttt_base_lr_init",
        "ttt_base_lr_warmup",
        "remat_mini_batch_group_size",
        "rope_theta",
        "pre_conv",
        "conv_width",
        "use_rotary_emb",
    }
)

# seq_modeling_block -> (ttt_layer_type, Mamba backbone?). The Mamba backbone shares Q/K and gates the output.
_BLOCKS: dict[str, tuple[str, bool]] = {
    "ttt_linear": ("linear", True),
    "ttt_mlp": ("mlp", True),
    "ttt_linear_base": ("linear", False),
    "ttt_mlp_base": ("mlp", False),
}


def parse_config_update(text: str) -> dict[str, Any]:
    """Parse a config update: JSON (`{"ttt_base_lr": 0.1}`) or upstream's Python form (`dict(ttt_base_lr=0.1)`).

    Upstream `eval`s its `--update_model_config`; the Python form is accepted here so its shell scripts can be
    reused verbatim, but only literal values are allowed and nothing is evaluated.
    """
    text = text.strip()
    try:
        update = json.loads(text)
    except json.JSONDecodeError:
        update = _parse_python_dict(text)
    if not isinstance(update, dict):
        raise ConfigConversionError(f"config update must be a JSON object, got {type(update).__name__}: {text!r}")
    for key in update:
        if not isinstance(key, str):
            raise ConfigConversionError(f"config update keys must be strings, got {key!r}")
    return update


def _parse_python_dict(text: str) -> Any:
    error = ConfigConversionError(
        f"config update is neither JSON nor a Python dict literal / dict(...) call with literal values: {text!r}"
    )
    try:
        node = ast.parse(text, mode="eval").body
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
            if any(keyword.arg is None for keyword in node.keywords):
                raise error
            return {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
        return ast.literal_eval(node)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        raise error from exc


def load_jax_config(source: str | os.PathLike[str], update: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load an upstream model config the way `train.py` does: a preset name or a JSON file, then an update.

    Args:
        source: a preset name (`125m-TTT`, `350m-TTT`, `760m-TTT`, `1b-TTT`), a path to a JSON dump of
            `ModelConfig.to_dict()`, or upstream's `json::PATH` spelling of the latter.
        update: fields to override, as a mapping or as text accepted by `parse_config_update`. Like upstream,
            a field the config does not have is an error (it would otherwise be silently ignored).

    Returns:
        The full config as a plain dict: `ModelConfig` defaults, overlaid by the preset/file, then the update.
    """
    name = os.fspath(source)
    if name in JAX_PRESETS:
        loaded = JAX_PRESETS[name]
    elif name in JAX_SELF_ATTENTION_PRESETS:
        raise ConfigConversionError(
            f"upstream preset {name!r} is the self-attention Transformer baseline, which modeling_ttt does not "
            f"implement; TTT presets are: {', '.join(JAX_PRESETS)}"
        )
    else:
        path = Path(name[len("json::") :] if name.startswith("json::") else name)
        if not path.is_file():
            raise ConfigConversionError(
                f"JAX config {name!r} is neither an existing JSON file nor an upstream preset "
                f"({', '.join(JAX_PRESETS)})"
            )
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigConversionError(f"{path}: not a JSON file: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigConversionError(f"{path}: expected a JSON object (ModelConfig.to_dict()), got {type(loaded).__name__}")

    config = {**JAX_MODEL_CONFIG_DEFAULTS, **loaded}
    if update:
        changes = parse_config_update(update) if isinstance(update, str) else dict(update)
        unknown = sorted(key for key in changes if key not in config and key not in _UPDATABLE_EXTRA_FIELDS)
        if unknown:
            raise ConfigConversionError(f"config update sets unknown JAX config field(s): {', '.join(unknown)}")
        config.update(changes)
    return config


def _require(config: Mapping[str, Any], name: str) -> Any:
    if name not in config or config[name] is None:
        raise ConfigConversionError(f"JAX config has no {name!r}; upstream needs it to build a TTT model")
    return config[name]


def _as_int(config: Mapping[str, Any], name: str) -> int:
    value = _require(config, name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigConversionError(f"JAX config field {name!r} must be an integer, got {value!r}")
    return value


def _as_float(config: Mapping[str, Any], name: str) -> float:
    value = _require(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigConversionError(f"JAX config field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _as_bool(config: Mapping[str, Any], name: str) -> bool:
    value = _require(config, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigConversionError(f"JAX config field {name!r} must be a boolean, got {value!r}")


def _token_id(config: Mapping[str, Any], name: str) -> int | list[int] | None:
    value = config.get(name)
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return _as_int(config, name)


def jax_config_to_hf_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an upstream model config into keyword arguments of `modeling_ttt.TTTConfig`.

    Only what determines the weights and the outputs is carried over; upstream's training-only knobs
    (`*_pdrop`, `remat_*` except the mini-batch group, `scan_*`, `fcm_*`, the `ttt_base_lr` warmup) have no
    counterpart. `pre_conv`, `share_qk` and `use_gate` are always written explicitly because the PyTorch
    defaults (all False) differ from upstream's Mamba backbone.
    """
    block = _require(config, "seq_modeling_block")
    if block == "self_attention":
        raise ConfigConversionError(
            "seq_modeling_block='self_attention' (upstream's Transformer baseline) is not supported: modeling_ttt only "
            f"implements the TTT blocks {', '.join(_BLOCKS)}"
        )
    if block not in _BLOCKS:
        raise ConfigConversionError(f"unknown seq_modeling_block {block!r}; expected one of {', '.join(_BLOCKS)}")
    layer_type, mamba_backbone = _BLOCKS[block]
    pre_conv = _as_bool(config, "pre_conv")

    kwargs: dict[str, Any] = {
        "vocab_size": _as_int(config, "vocab_size"),
        "hidden_size": _as_int(config, "hidden_size"),
        "intermediate_size": _as_int(config, "intermediate_size"),
        "num_hidden_layers": _as_int(config, "num_hidden_layers"),
        "num_attention_heads": _as_int(config, "num_attention_heads"),
        "hidden_act": "silu",  # upstream's feed-forward is a SwiGLU with SiLU, not configurable there
        "max_position_embeddings": _as_int(config, "max_sequence_length"),
        "initializer_range": _as_float(config, "initializer_range"),
        "rms_norm_eps": _as_float(config, "rms_norm_eps"),
        "rope_theta": _as_float(config, "rope_theta"),
        "tie_word_embeddings": _as_bool(config, "tie_word_embeddings"),
        "ttt_layer_type": layer_type,
        "share_qk": mamba_backbone,
        "use_gate": mamba_backbone,
        "pre_conv": pre_conv,
        "ttt_base_lr": _as_float(config, "ttt_base_lr"),
        "mini_batch_size": _as_int(config, "mini_batch_size"),
        "pad_token_id": _token_id(config, "pad_token_id"),
        "bos_token_id": _token_id(config, "bos_token_id"),
        "eos_token_id": _token_id(config, "eos_token_id"),
    }
    # Upstream only reads conv_width where a conv exists (block pre-conv, or the Q/K convs of the Mamba block).
    if pre_conv or mamba_backbone or config.get("conv_width") is not None:
        kwargs["conv_kernel"] = _as_int(config, "conv_width")
    # Memory-only knob in both implementations (no effect on outputs), but keep the user's grouping.
    if config.get("remat_mini_batch_group_size") is not None:
        kwargs["scan_checkpoint_group_size"] = _as_int(config, "remat_mini_batch_group_size")
    return kwargs


def hf_config_to_jax_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Translate `TTTConfig` fields (e.g. `TTTConfig.to_dict()`) into an upstream `ModelConfig` dict.

    The result loads with upstream's `ModelConfig.load_config("json::PATH")`. Only the two backbones of the
    paper exist upstream, so `share_qk` and `use_gate` must agree.
    """
    layer_type = hf_config.get("ttt_layer_type", "linear")
    share_qk = bool(hf_config.get("share_qk", False))
    use_gate = bool(hf_config.get("use_gate", False))
    if layer_type not in ("linear", "mlp"):
        raise ConfigConversionError(f"ttt_layer_type {layer_type!r} has no upstream JAX block")
    if share_qk != use_gate:
        raise ConfigConversionError(
            f"share_qk={share_qk} with use_gate={use_gate} has no upstream JAX block: upstream's Mamba blocks "
            "(ttt_linear/ttt_mlp) have both, its Transformer blocks (*_base) have neither"
        )
    hidden_act = hf_config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigConversionError(f"hidden_act={hidden_act!r}: upstream's feed-forward is fixed to SiLU (SwiGLU)")
    group = hf_config.get("scan_checkpoint_group_size") or 0
    config = dict(JAX_MODEL_CONFIG_DEFAULTS)
    config.update(
        {
            "vocab_size": hf_config["vocab_size"],
            "hidden_size": hf_config["hidden_size"],
            "intermediate_size": hf_config["intermediate_size"],
            "num_hidden_layers": hf_config["num_hidden_layers"],
            "num_attention_heads": hf_config["num_attention_heads"],
            "max_sequence_length": hf_config["max_position_embeddings"],
            "rms_norm_eps": hf_config["rms_norm_eps"],
            "initializer_range": hf_config["initializer_range"],
            "bos_token_id": hf_config.get("bos_token_id"),
            "eos_token_id": hf_config.get("eos_token_id"),
            "pad_token_id": hf_config.get("pad_token_id"),
            "tie_word_embeddings": bool(hf_config["tie_word_embeddings"]),
            "seq_modeling_block": f"ttt_{layer_type}" if share_qk else f"ttt_{layer_type}_base",
            "ttt_base_lr": hf_config["ttt_base_lr"],
            # Inference runs with the warmup multiplier at 1.0; -1 disables upstream's warmup.
            "ttt_base_lr_init": -1.0,
            "ttt_base_lr_warmup": -1,
            "mini_batch_size": hf_config["mini_batch_size"],
            # Upstream needs a positive group; 1 divides every sequence and, like "0" here, changes no output.
            "remat_mini_batch_group_size": group if group > 0 else 1,
            "rope_theta": hf_config["rope_theta"],
            "pre_conv": bool(hf_config["pre_conv"]),
            "conv_width": hf_config["conv_kernel"],
        }
    )
    return config


# ------------------------------------------------------------------------------------------------ official checkpoints

# The Hub organisation that publishes upstream's trained checkpoints (`Test-Time-Training/<name>`).
OFFICIAL_HUB_ORGANIZATION = "Test-Time-Training"
# Upstream's tokenizer (train.py `tokenizer_name="meta-llama/Llama-2-7b-hf"`); train.py sets
# `model_config.vocab_size = data_module.vocab_size`, i.e. Llama-2's 32000.
OFFICIAL_TOKENIZER = "meta-llama/Llama-2-7b-hf"
OFFICIAL_VOCAB_SIZE = 32000

# The TTT-Linear runs' `--update_model_config` (scripts/ttt_linear/{125m,350m,760m,1.3b}.sh, line 24).
_LINEAR_UPDATE: dict[str, Any] = {"seq_modeling_block": "ttt_linear", "ttt_base_lr": 1.0}


def _mlp_update(warmup: int) -> dict[str, Any]:
    # The TTT-MLP runs' `--update_model_config` (scripts/ttt_mlp/*.sh, line 24): the inner learning rate ramps from
    # 0.01 to 0.1 over the first `warmup` steps (= the script's lr_warmup_steps); inference runs at the peak, 0.1.
    return {"seq_modeling_block": "ttt_mlp", "ttt_base_lr": 0.1, "ttt_base_lr_init": 0.01, "ttt_base_lr_warmup": warmup}


@dataclass(frozen=True)
class OfficialModel:
    """One row of `OFFICIAL_MODELS`: how upstream's train.py built that checkpoint's config."""

    preset: str  # `--load_model_config`
    update: Mapping[str, Any]  # `--update_model_config`
    context_length: int  # `--seq_length`, which train.py writes into `max_sequence_length`
    dataset: str  # `--dataset_name`


def _official(preset: str, update: Mapping[str, Any], context_length: int, dataset: str) -> OfficialModel:
    return OfficialModel(preset, dict(update), context_length, dataset)


# The nine checkpoints of the paper published as `Test-Time-Training/<name>`: which upstream preset and
# `--update_model_config` each was trained with, at which context length, on which data. All use the Mamba backbone
# (the "*-TTT" presets: pre_conv=True, seq_modeling_block ttt_linear/ttt_mlp) and mini-batch size 16 (the presets'
# `mini_batch_size`). train.py overwrites `max_sequence_length` with `--seq_length`, so the context length is the
# model's `max_sequence_length`. Sources (test-time-training/ttt-lm-jax@a9b2904):
#   preset      — `--load_model_config` of scripts/ttt_{linear,mlp}/<size>.sh, line 23 (the 1.3B scripts load "1b-TTT");
#                 the sizes themselves are `CONFIGS` in ttt/models/model.py (reproduced in JAX_PRESETS above).
#   update      — `--update_model_config` of the same script, line 24.
#   2k          — `SEQ_LEN=2048` of the scripts (line 7). 8k / 32k (8192 / 32768) are the names' context lengths: the
#                 scripts only ship the 2k setting, and their comment "Product should equal 0.5 million" fixes only
#                 SEQ_LEN * BS. The long-context runs fine-tune at the longer length, which changes no weight shape.
#   dataset     — the name; the scripts' `DATA_NAME="the_pile" # "books3"`.
OFFICIAL_MODELS: dict[str, OfficialModel] = {
    # scripts/ttt_linear/125m.sh (load 125m-TTT line 23, update line 24, SEQ_LEN=2048 line 7), data books3
    "ttt-linear-125m-books-2k": _official("125m-TTT", _LINEAR_UPDATE, 2048, "books3"),
    # scripts/ttt_linear/350m.sh
    "ttt-linear-350m-books-2k": _official("350m-TTT", _LINEAR_UPDATE, 2048, "books3"),
    # scripts/ttt_mlp/125m.sh (ttt_base_lr_warmup=480)
    "ttt-mlp-125m-books-2k": _official("125m-TTT", _mlp_update(480), 2048, "books3"),
    # scripts/ttt_mlp/350m.sh (ttt_base_lr_warmup=1350)
    "ttt-mlp-350m-books-2k": _official("350m-TTT", _mlp_update(1350), 2048, "books3"),
    # scripts/ttt_linear/760m.sh, at 8k on the Pile
    "ttt-linear-760m-pile-8k": _official("760m-TTT", _LINEAR_UPDATE, 8192, "the_pile"),
    # scripts/ttt_mlp/760m.sh (ttt_base_lr_warmup=2900), at 8k on the Pile
    "ttt-mlp-760m-pile-8k": _official("760m-TTT", _mlp_update(2900), 8192, "the_pile"),
    # scripts/ttt_linear/1.3b.sh (load 1b-TTT), at 8k on the Pile
    "ttt-linear-1.3b-pile-8k": _official("1b-TTT", _LINEAR_UPDATE, 8192, "the_pile"),
    # scripts/ttt_mlp/1.3b.sh (load 1b-TTT, ttt_base_lr_warmup=5000), at 8k on the Pile
    "ttt-mlp-1.3b-pile-8k": _official("1b-TTT", _mlp_update(5000), 8192, "the_pile"),
    # scripts/ttt_linear/1.3b.sh (load 1b-TTT), at 32k on Books3
    "ttt-linear-1.3b-books-32k": _official("1b-TTT", _LINEAR_UPDATE, 32768, "books3"),
}


def official_model(name: str) -> OfficialModel:
    """The `OFFICIAL_MODELS` row of `name`; a `ConfigConversionError` listing the nine names for any other."""
    if name not in OFFICIAL_MODELS:
        raise ConfigConversionError(
            f"unknown official checkpoint {name!r}; the official ones are: {', '.join(OFFICIAL_MODELS)}"
        )
    return OFFICIAL_MODELS[name]


def official_hub_id(name: str) -> str:
    """`Test-Time-Training/<name>`, the Hub repository an official checkpoint is published in."""
    official_model(name)
    return f"{OFFICIAL_HUB_ORGANIZATION}/{name}"


def official_jax_config(name: str, update: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The upstream config an official checkpoint was trained with, built as train.py builds it.

    That is the preset, then the script's `--update_model_config`, then train.py's own overrides
    (`vocab_size` of the Llama-2 tokenizer, `max_sequence_length = seq_length`), then `update` if given.
    """
    row = official_model(name)
    config = load_jax_config(row.preset, dict(row.update))
    config.update(vocab_size=OFFICIAL_VOCAB_SIZE, max_sequence_length=row.context_length)
    if update:
        # Same checks as any other update (unknown fields are refused).
        config = load_jax_config_from_dict(config, update)
    return config


def load_jax_config_from_dict(config: Mapping[str, Any], update: str | Mapping[str, Any]) -> dict[str, Any]:
    """Apply an update to an already loaded config, with `load_jax_config`'s checks."""
    changes = parse_config_update(update) if isinstance(update, str) else dict(update)
    unknown = sorted(key for key in changes if key not in config and key not in _UPDATABLE_EXTRA_FIELDS)
    if unknown:
        raise ConfigConversionError(f"config update sets unknown JAX config field(s): {', '.join(unknown)}")
    return {**config, **changes}


def official_config(name: str):
    """The `modeling_ttt.TTTConfig` of an official checkpoint (see `official_jax_config`)."""
    from modeling_ttt import TTTConfig

    return TTTConfig(**jax_config_to_hf_kwargs(official_jax_config(name)))
