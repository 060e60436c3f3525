import pytest
import torch

import modeling_ttt  # noqa: F401  (registers the auto classes)
from modeling_ttt import TTTConfig, TTTForCausalLM

BACKBONES = {
    "mamba": dict(pre_conv=True, share_qk=True, use_gate=True),
    "transformer": dict(pre_conv=False, share_qk=False, use_gate=False),
}
VARIANTS = [(layer, backbone) for layer in ("linear", "mlp") for backbone in BACKBONES]


def tiny_config(layer_type="linear", backbone="mamba", **overrides) -> TTTConfig:
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  mini_batch_size=8, ttt_layer_type=layer_type, ttt_base_lr=1.0 if layer_type == "linear" else 0.1,
                  **BACKBONES[backbone])
    kwargs.update(overrides)
    return TTTConfig(**kwargs)


def tiny_model(layer_type="linear", backbone="mamba", seed=0, **overrides) -> TTTForCausalLM:
    """A tiny random model whose every parameter is away from its (often trivial) initial value."""
    torch.manual_seed(seed)
    model = TTTForCausalLM(tiny_config(layer_type, backbone, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "learnable_token_idx" in name or name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(params=VARIANTS, ids=[f"{a}-{b}" for a, b in VARIANTS])
def variant(request):
    return request.param


#: Python source that makes `modeling_ttt` unimportable in the process that runs it (a meta-path finder refusing
#: it): scripts run in fresh interpreters prepend it to prove that a saved folder's own code is what loads.
BLOCK_MODELING_TTT = """import sys


class BlockModelingTTT:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "modeling_ttt" or name.startswith("modeling_ttt."):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, BlockModelingTTT)
"""
