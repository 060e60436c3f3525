"""PEFT LoRA for TTT models: which modules take adapters, and the TTT parameters that train fully beside them.

A TTT layer has two kinds of weights:

- the projections `q_proj`, `k_proj` (Transformer backbone only; the Mamba backbone shares one projection for Q and
  K), `v_proj`, `o_proj` and the gate `g_proj` (`use_gate`): `nn.Linear`s, the usual LoRA targets;
- the TTT parameters, small tensors held by the layer itself (`nn.Parameter`s, no module of their own): the inner
  model's initial weights `W1`, `b1` (and `W2`, `b2` for TTT-MLP), the inner learning-rate gate
  `learnable_ttt_lr_weight` / `learnable_ttt_lr_bias`, the token scale offset `learnable_token_idx`, and the inner
  LayerNorm `ttt_norm_weight` / `ttt_norm_bias`. Together about `num_heads * head_dim**2` numbers per layer for
  TTT-Linear (`hidden_size * head_dim`), a few percent of the layer.

The TTT parameters are trained fully, not through a low-rank adapter. PEFT has no per-parameter option for that:
`modules_to_save` copies whole modules (here the whole TTT layer, projections included), and `target_parameters`
puts a LoRA update on 2-D/3-D parameters (a rank-r change of each head's `W1`, nothing for the 1-D `learnable_token_idx`
or the biases). So [`get_ttt_peft_model`] sets `requires_grad` on them in the base model, and
[`TTTPeftModelForCausalLM`] (a `PeftModelForCausalLM`) writes them into the adapter file next to the LoRA weights,
under their model keys (`base_model.model.model.layers.0.seq_modeling_block.W1`). PEFT's own loader passes such
keys through to the model, so a plain `PeftModel.from_pretrained(base, folder)` restores them as well; load with
[`load_ttt_peft_model`] to keep them trainable and saved on the next `save_pretrained`.

Since they live in the base model, the trained TTT parameters stay in place when the adapter is disabled
(`with peft_model.disable_adapter():`) or unloaded, and are shared by all adapters of the model.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftConfig, PeftModelForCausalLM

from .configuration_ttt import TTTConfig

#: LoRA targets of a TTT layer; `k_proj` exists only without `share_qk`, `g_proj` only with `use_gate`.
TTT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj")
#: The SwiGLU MLP of every block (`include_mlp=True`).
MLP_LORA_TARGET_MODULES = ("gate_proj", "up_proj", "down_proj")
#: Parameters of a TTT layer that train fully with `train_ttt_parameters=True` (`W2`, `b2`: TTT-MLP only).
TTT_PARAMETER_NAMES = ("W1", "b1", "W2", "b2", "learnable_ttt_lr_weight", "learnable_ttt_lr_bias",
                       "learnable_token_idx", "ttt_norm_weight", "ttt_norm_bias")

ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"


def _config_of(model_or_config) -> TTTConfig:
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, TTTConfig):
        raise TypeError(f"Expected a TTT model or TTTConfig, got {type(model_or_config).__name__}.")
    return config


def ttt_lora_target_modules(model_or_config, include_mlp: bool = False) -> list[str]:
    """The LoRA target module names that exist in a TTT model with this config: `q_proj`, `v_proj`, `o_proj`, plus
    `k_proj` (Transformer backbone, `share_qk=False`) and `g_proj` (`use_gate=True`), and with `include_mlp` the
    MLP's `gate_proj`, `up_proj`, `down_proj`."""
    config = _config_of(model_or_config)
    names = ["q_proj"] + ([] if config.share_qk else ["k_proj"]) + ["v_proj", "o_proj"]
    if config.use_gate:
        names.append("g_proj")
    if include_mlp:
        names += list(MLP_LORA_TARGET_MODULES)
    return names


def ttt_lora_config(model_or_config, r: int = 8, alpha: int = 16, dropout: float = 0.0, include_mlp: bool = False,
                    **lora_kwargs) -> LoraConfig:
    """A causal-LM `peft.LoraConfig` for a TTT model (or its `TTTConfig`): LoRA of rank `r`, scale `alpha / r` and
    dropout `dropout` on the projections of every TTT layer ([`ttt_lora_target_modules`]; with `include_mlp` also the
    SwiGLU MLP). Further `LoraConfig` arguments pass through (`target_modules=` replaces the list).

    The TTT parameters are not part of a `LoraConfig`; [`get_ttt_peft_model`] makes them train (its
    `train_ttt_parameters`)."""
    lora_kwargs.setdefault("target_modules", ttt_lora_target_modules(model_or_config, include_mlp=include_mlp))
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, **lora_kwargs)


def ttt_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The TTT parameters of every TTT layer under `model` (a TTT model or a PEFT model of one), by their key in
    `model.state_dict()`."""
    from .layers import TTTLayerBase

    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, TTTLayerBase):
            for name in TTT_PARAMETER_NAMES:
                param = module._parameters.get(name)
                if param is not None:
                    found[f"{module_name}.{name}"] = param
    return found


class TTTPeftModelForCausalLM(PeftModelForCausalLM):
    """`PeftModelForCausalLM` for a TTT model whose TTT parameters train fully: `save_pretrained` (also what
    `Trainer` calls for its checkpoints and `save_model`) writes them into the adapter file with the adapter weights.
    Made by [`get_ttt_peft_model`] and [`load_ttt_peft_model`]; everything else is PEFT's (`generate`,
    `merge_and_unload`, ...)."""

    #: whether save_pretrained writes the TTT parameters (set by get_ttt_peft_model / load_ttt_peft_model)
    saves_ttt_parameters: bool = False

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True, **kwargs):
        """[`PeftModel.save_pretrained`], then the TTT parameters added to each saved adapter's weights file (where
        they train: `saves_ttt_parameters`)."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization,
                                selected_adapters=selected_adapters, is_main_process=is_main_process, **kwargs)
        if not self.saves_ttt_parameters or not is_main_process:
            return
        tensors = {key: param.detach().contiguous() for key, param in ttt_parameters(self).items()}
        for adapter_name in selected_adapters or list(self.peft_config):
            # PEFT writes the adapter named "default" at the top and the others in subfolders named after them
            folder = save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)
            _add_to_adapter_file(folder, tensors, safe_serialization)


def _add_to_adapter_file(folder: str, tensors: dict[str, torch.Tensor], safe_serialization: bool) -> None:
    """Add `tensors` to the adapter weights file PEFT has just written in `folder` (safetensors, or the pickle of
    `safe_serialization=False`)."""
    path = os.path.join(folder, ADAPTER_SAFETENSORS if safe_serialization else ADAPTER_BIN)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PEFT wrote no {os.path.basename(path)} in {folder} to add the TTT parameters to.")
    tensors = {key: tensor.cpu() for key, tensor in tensors.items()}
    if safe_serialization:
        from safetensors.torch import load_file, save_file

        save_file({**load_file(path), **tensors}, path, metadata={"format": "pt"})
    else:
        torch.save({**torch.load(path, map_location="cpu", weights_only=True), **tensors}, path)


def _set_ttt_parameters_trainable(peft_model: TTTPeftModelForCausalLM) -> None:
    for param in ttt_parameters(peft_model).values():
        param.requires_grad_(True)
    peft_model.saves_ttt_parameters = True


def get_ttt_peft_model(model, lora_config: LoraConfig | None = None, train_ttt_parameters: bool = True,
                       adapter_name: str = "default", **kwargs) -> TTTPeftModelForCausalLM:
    """`peft.get_peft_model` for a `TTTForCausalLM`: LoRA as `lora_config` says (default [`ttt_lora_config`]`(model)`),
    and with `train_ttt_parameters` the TTT parameters of every layer trainable (in full) and saved with the
    adapter. The model is modified in place, as with `get_peft_model`. `kwargs` go to the PEFT model
    (`autocast_adapter_dtype`, `low_cpu_mem_usage`)."""
    if lora_config is None:
        lora_config = ttt_lora_config(model)
    lora_config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    peft_model = TTTPeftModelForCausalLM(model, lora_config, adapter_name=adapter_name, **kwargs)
    if train_ttt_parameters:
        _set_ttt_parameters_trainable(peft_model)
    return peft_model


def load_ttt_peft_model(model, adapter_folder: str, is_trainable: bool = False, adapter_name: str = "default",
                        **kwargs) -> TTTPeftModelForCausalLM:
    """Load an adapter saved by [`TTTPeftModelForCausalLM.save_pretrained`] onto a base `TTTForCausalLM` (as
    `PeftModel.from_pretrained` does, TTT parameters included). Where the folder holds TTT parameters, they are kept
    trainable (with `is_trainable`) and saved again by the next `save_pretrained`, so continuing the training keeps
    them. `kwargs` go to `load_adapter`."""
    config = PeftConfig.from_pretrained(adapter_folder)
    config.inference_mode = not is_trainable
    peft_model = TTTPeftModelForCausalLM(model, config, adapter_name=adapter_name)
    peft_model.load_adapter(adapter_folder, adapter_name, is_trainable=is_trainable, **kwargs)
    if _adapter_file_has_ttt_parameters(adapter_folder, ttt_parameters(peft_model)):
        peft_model.saves_ttt_parameters = True
        if is_trainable:
            _set_ttt_parameters_trainable(peft_model)
    return peft_model


def _adapter_file_has_ttt_parameters(folder: str, expected: dict) -> bool:
    path = os.path.join(folder, ADAPTER_SAFETENSORS)
    if os.path.exists(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as file:
            keys = set(file.keys())
    else:
        keys = set(torch.load(os.path.join(folder, ADAPTER_BIN), map_location="cpu", weights_only=True))
    return bool(expected) and set(expected) <= keys


__all__ = [
    "MLP_LORA_TARGET_MODULES",
    "TTT_LORA_TARGET_MODULES",
    "TTT_PARAMETER_NAMES",
    "TTTPeftModelForCausalLM",
    "get_ttt_peft_model",
    "load_ttt_peft_model",
    "ttt_lora_config",
    "ttt_lora_target_modules",
    "ttt_parameters",
]
