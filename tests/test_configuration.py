import json

import pytest
from transformers import AutoConfig

from modeling_ttt import PRESET_NAMES, TTTConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(mini_batch_size=0), "mini_batch_size"),
        (dict(ttt_layer_type="conv"), "ttt_layer_type"),
        (dict(ttt_impl="cuda"), "ttt_impl"),
        (dict(conv_kernel=0), "conv_kernel"),
        (dict(ttt_base_lr=0.0), "ttt_base_lr"),
        (dict(scan_checkpoint_group_size=-1), "scan_checkpoint_group_size"),
        (dict(hidden_size=12, num_attention_heads=4), "head_dim"),
        (dict(hidden_act="nope"), "hidden_act"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TTTConfig(**kwargs)


def test_unknown_layer_type_lists_allowed_values():
    with pytest.raises(ValueError, match="linear.*mlp"):
        TTTConfig(ttt_layer_type="Linear")


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_load(name, tmp_path):
    config = TTTConfig.from_preset(name)
    assert config.model_type == "ttt" and config.pre_conv and config.share_qk and config.use_gate
    assert config.ttt_layer_type == name.split("-")[1]
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, TTTConfig)
    without_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(again) == without_path(config)


def test_preset_sizes_follow_the_paper():
    sizes = {name: TTTConfig.from_preset(name) for name in ("125m-linear", "1.3b-mlp")}
    assert (sizes["125m-linear"].hidden_size, sizes["125m-linear"].num_hidden_layers) == (768, 12)
    assert (sizes["1.3b-mlp"].hidden_size, sizes["1.3b-mlp"].num_attention_heads) == (2048, 32)
    assert sizes["1.3b-mlp"].ttt_base_lr == 0.1


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="125m-linear"):
        TTTConfig.from_preset("125m")
    with pytest.raises(ValueError, match="no field"):
        TTTConfig.from_preset("125m-linear", not_a_field=1)
    assert TTTConfig.from_preset("125m-linear", mini_batch_size=8).mini_batch_size == 8


def test_json_file_round_trip(tmp_path):
    config = TTTConfig(hidden_size=64, num_attention_heads=4, ttt_layer_type="mlp")
    path = tmp_path / "c.json"
    config.to_json_file(path)
    assert json.loads(path.read_text())["ttt_layer_type"] == "mlp"
    assert TTTConfig.from_json_file(path).ttt_layer_type == "mlp"
