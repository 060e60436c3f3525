"""Tests of the JAX (test-time-training/ttt-lm-jax) checkpoint converter in `conversion/`.

The fixtures under `fixtures/ttt_jax/` were written by the unmodified upstream JAX code, together with the
logits that code produces; see their README.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from modeling_ttt import hub
from modeling_ttt.conversion.jax import convert_hf_to_jax, convert_jax_checkpoint, main, main_to_jax
from modeling_ttt.conversion.jax_config import (
    ConfigConversionError,
    hf_config_to_jax_config,
    jax_config_to_hf_kwargs,
    load_jax_config,
    parse_config_update,
)
from modeling_ttt.conversion.jax_params import ParameterMappingError, Transform, jax_parameter_shapes
from modeling_ttt.conversion.msgpack_checkpoint import (
    CheckpointFormatError,
    KeyPath,
    encode_value,
    read_checkpoint_params,
    read_streaming_checkpoint,
    write_streaming_checkpoint,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ttt_jax"
# Record counts of `streaming_params`, from the fixtures' README.
RECORD_COUNTS = {
    "ttt_linear": 52,
    "ttt_mlp": 56,
    "ttt_linear_base": 38,
    "ttt_mlp_base": 42,
    "ttt_mlp_mbs8_untied": 57,
}
VARIANTS = tuple(RECORD_COUNTS)
LOGITS_TOLERANCE = 1e-4
PREFIX_LENGTHS = (7, 33, 40)
BF16 = np.dtype(ml_dtypes.bfloat16)


def _listing(path: Path) -> list[tuple[KeyPath, tuple[int, ...], str]]:
    """Parse a `params.txt` / `train_state.txt` listing: key path, shape, stored dtype per record."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((tuple(json.loads(key)), tuple(json.loads(shape)), dtype))
    return rows


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8)


def _assert_same_tensors(actual: dict[KeyPath, np.ndarray], expected: dict[KeyPath, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert actual[key].shape == expected[key].shape, key
        assert np.array_equal(_bits(actual[key]), _bits(expected[key])), key


def _run_cli(entry: Callable[[list[str]], int], args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = entry([*args, "--quiet"])
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _convert_cli(
    checkpoint: Path, jax_config: str | Path, output: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    return _run_cli(
        main, ["--checkpoint", str(checkpoint), "--jax-config", str(jax_config), "--output", str(output), *extra], capsys
    )


# --------------------------------------------------------------------------------------------------- reader / writer


@pytest.mark.parametrize("variant", VARIANTS)
def test_reader_matches_fixture_listing(variant: str) -> None:
    tensors = read_streaming_checkpoint(FIXTURES / variant / "streaming_params")
    listing = _listing(FIXTURES / variant / "params.txt")
    assert len(tensors) == RECORD_COUNTS[variant] == len(listing)
    assert [key for key, _, _ in listing] == list(tensors)
    for key, shape, dtype in listing:
        assert tensors[key].shape == shape
        assert tensors[key].dtype.name == dtype


def test_reader_train_state() -> None:
    path = FIXTURES / "ttt_mlp" / "streaming_train_state"
    records = read_streaming_checkpoint(path)
    assert len(records) == 171 == len(_listing(FIXTURES / "ttt_mlp" / "train_state.txt"))
    assert records[("step",)].dtype == np.int32 and int(records[("step",)]) == 3
    assert sum(key[0] == "opt_state" for key in records) == 2 * 56 + 2

    loaded = read_checkpoint_params(path)
    assert loaded.is_train_state and loaded.step == 3
    # Only params/params/… with the prefix stripped; mu/nu repeat every path and must not leak in.
    _assert_same_tensors(loaded.params, read_streaming_checkpoint(FIXTURES / "ttt_mlp" / "streaming_params"))


def test_params_file_is_not_a_train_state() -> None:
    loaded = read_checkpoint_params(FIXTURES / "ttt_linear" / "streaming_params")
    assert not loaded.is_train_state and loaded.step is None
    assert len(loaded.params) == RECORD_COUNTS["ttt_linear"]


def test_bfloat16_decodes_exactly() -> None:
    path = FIXTURES / "ttt_mlp" / "streaming_params"
    tensors = read_streaming_checkpoint(path)
    with open(path, "rb") as stream:
        for key, value in msgpack.Unpacker(stream, raw=False):
            shape, dtype_name, data = msgpack.unpackb(msgpack.unpackb(value).data, raw=False)
            assert dtype_name == "bfloat16"
            # A bf16 value is the high half of a float32 bit pattern.
            expected = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
            decoded = tensors[tuple(key)]
            assert decoded.dtype == BF16
            assert np.array_equal(decoded.astype(np.float32).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("variant", VARIANTS)
def test_writer_reproduces_upstream_bytes(variant: str, tmp_path: Path) -> None:
    source = FIXTURES / variant / "streaming_params"
    written = write_streaming_checkpoint(tmp_path / "streaming_params", read_streaming_checkpoint(source))
    assert written.read_bytes() == source.read_bytes()


def test_writer_casts_floats_only(tmp_path: Path) -> None:
    tensors = {("a",): np.array([1.0, 1.00390625, 3.0e38], np.float32), ("step",): np.array(7, np.int32)}
    read = read_streaming_checkpoint(write_streaming_checkpoint(tmp_path / "ckpt", tensors, dtype="bfloat16"))
    assert read[("a",)].dtype == BF16 and read[("step",)].dtype == np.int32
    assert np.array_equal(read[("a",)], tensors[("a",)].astype(BF16))


def test_reader_accepts_scalar_and_chunked_leaves(tmp_path: Path) -> None:
    chunked = {
        "__msgpack_chunked_array__": True,
        "shape": {"0": 2, "1": 3},
        "chunks": {"0": msgpack.ExtType(1, msgpack.packb([[4], "float32", np.arange(4, dtype=np.float32).tobytes()])),
                   "1": msgpack.ExtType(1, msgpack.packb([[2], "float32", np.arange(4, 6, dtype=np.float32).tobytes()]))},
    }
    scalar = msgpack.ExtType(3, msgpack.packb([[], "int32", np.int32(5).tobytes()]))
    path = tmp_path / "ckpt"
    path.write_bytes(
        msgpack.packb([["big"], msgpack.packb(chunked)]) + msgpack.packb([["scalar"], msgpack.packb(scalar)])
    )
    read = read_streaming_checkpoint(path)
    assert np.array_equal(read[("big",)], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert read[("scalar",)].shape == () and int(read[("scalar",)]) == 5


def _record(key: list[str], value: Any) -> bytes:
    return msgpack.packb([key, value], use_bin_type=True)


GOOD_RECORD = _record(["model", "x"], encode_value(np.ones(3, np.float32)))
BAD_FILES: dict[str, tuple[Callable[[], bytes], tuple[str, ...]]] = {
    # name: (file content, fragments the error must contain besides the file name)
    "truncated_middle": (
        lambda: (FIXTURES / "ttt_linear" / "streaming_params").read_bytes()[:200_000],
        ("truncated", "record"),
    ),
    "truncated_first_record": (
        lambda: (FIXTURES / "ttt_linear" / "streaming_params").read_bytes()[:100],
        ("truncated", "record 0"),
    ),
    "random_bytes": (lambda: np.random.default_rng(0).bytes(4096), ("record 0",)),
    "json_file": (lambda: (FIXTURES / "ttt_linear" / "config.json").read_bytes(), ("record 0", "not a streaming")),
    "empty": (lambda: b"", ("empty",)),
    "record_not_a_pair": (lambda: GOOD_RECORD + msgpack.packb([["a"], b"x", 1]), ("record 1", "3-element")),
    "key_not_strings": (lambda: GOOD_RECORD + _record([1, 2], encode_value(np.ones(1))), ("record 1", "key")),
    "value_not_bin": (lambda: GOOD_RECORD + _record(["model", "y"], [1, 2]), ("record 1", '"model", "y"', "bin")),
    "unknown_ext_code": (
        lambda: GOOD_RECORD + _record(["model", "y"], msgpack.packb(msgpack.ExtType(7, b"\x90"))),
        ("record 1", "ext code 7"),
    ),
    "complex_leaf": (
        lambda: _record(["c"], msgpack.packb(msgpack.ExtType(2, msgpack.packb([1.0, 2.0])))),
        ("record 0", "complex"),
    ),
    "wrong_byte_count": (
        lambda: _record(["w"], msgpack.packb(msgpack.ExtType(1, msgpack.packb([[4], "float32", b"\0" * 8])))),
        ("record 0", "needs 16 bytes, found 8"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_reader_rejects_malformed_files(case: str, tmp_path: Path) -> None:
    content, fragments = BAD_FILES[case]
    path = tmp_path / f"{case}.ckpt"
    path.write_bytes(content())
    with pytest.raises(CheckpointFormatError) as error:
        read_checkpoint_params(path)
    message = str(error.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("case", ["truncated_middle", "random_bytes", "json_file"])
def test_cli_malformed_checkpoint_fails_cleanly(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "streaming_params"
    path.write_bytes(BAD_FILES[case][0]())
    output = tmp_path / "out" / "model"
    code, stderr = _convert_cli(path, FIXTURES / "ttt_linear" / "config.json", output, capsys)
    _assert_one_line_error(code, stderr, str(path))
    assert not output.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------------------- config


def test_fixture_config_maps_to_ttt_config() -> None:
    kwargs = jax_config_to_hf_kwargs(load_jax_config(FIXTURES / "ttt_mlp" / "config.json"))
    assert kwargs == {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "ttt_layer_type": "mlp",
        "share_qk": True,
        "use_gate": True,
        "pre_conv": True,
        "ttt_base_lr": 0.1,
        "mini_batch_size": 16,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "conv_kernel": 4,
        "scan_checkpoint_group_size": 4,
    }
    base = jax_config_to_hf_kwargs(load_jax_config(FIXTURES / "ttt_linear_base" / "config.json"))
    assert (base["ttt_layer_type"], base["share_qk"], base["use_gate"], base["pre_conv"]) == ("linear", False, False, False)
    untied = jax_config_to_hf_kwargs(load_jax_config(FIXTURES / "ttt_mlp_mbs8_untied" / "config.json"))
    assert untied["tie_word_embeddings"] is False and untied["mini_batch_size"] == 8


def test_presets_and_updates() -> None:
    kwargs = jax_config_to_hf_kwargs(load_jax_config("1b-TTT"))
    assert (kwargs["num_hidden_layers"], kwargs["hidden_size"], kwargs["num_attention_heads"]) == (24, 2048, 32)
    assert (kwargs["intermediate_size"], kwargs["vocab_size"], kwargs["max_position_embeddings"]) == (5504, 32000, 2048)
    assert (kwargs["ttt_layer_type"], kwargs["pre_conv"], kwargs["share_qk"], kwargs["tie_word_embeddings"]) == (
        "linear", True, True, True)
    assert (kwargs["bos_token_id"], kwargs["eos_token_id"], kwargs["conv_kernel"]) == (1, 2, 4)

    as_json = load_jax_config("125m-TTT", '{"seq_modeling_block": "ttt_mlp", "ttt_base_lr": 0.1}')
    as_python = load_jax_config("125m-TTT", "dict(seq_modeling_block='ttt_mlp', ttt_base_lr=0.1)")
    assert as_json == as_python
    assert jax_config_to_hf_kwargs(as_json)["ttt_layer_type"] == "mlp"
    assert load_jax_config("json::" + str(FIXTURES / "ttt_linear" / "config.json"))["seq_modeling_block"] == "ttt_linear"


@pytest.mark.parametrize(
    ("source", "update", "fragment"),
    [
        ("125m", None, "self-attention"),
        ("125m-TTT", '{"seq_modeling_block": "self_attention"}', "self_attention"),
        ("125m-TTT", '{"seq_modeling_block": "mamba"}', "unknown seq_modeling_block"),
        ("125m-TTT", '{"no_such_field": 1}', "no_such_field"),
        ("125m-TTT", '{"mini_batch_size": "16"}', "mini_batch_size"),
        ("125m-TTT", "dict(x=__import__('os'))", "literal"),
        ("125m-TTT", "[1, 2]", "JSON object"),
        ("no-such-preset", None, "neither an existing JSON file nor an upstream preset"),
    ],
)
def test_config_errors(source: str, update: str | None, fragment: str) -> None:
    with pytest.raises(ConfigConversionError) as error:
        jax_config_to_hf_kwargs(load_jax_config(source, update))
    assert fragment in str(error.value)


def test_parse_config_update_forms() -> None:
    assert parse_config_update('{"a": 1}') == {"a": 1}
    assert parse_config_update("{'a': True, 'b': [1, 2]}") == {"a": True, "b": [1, 2]}
    assert parse_config_update("dict(a=1.5, b='x')") == {"a": 1.5, "b": "x"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip(variant: str) -> None:
    kwargs = jax_config_to_hf_kwargs(load_jax_config(FIXTURES / variant / "config.json"))
    assert jax_config_to_hf_kwargs(hf_config_to_jax_config(kwargs)) == kwargs


def test_mixed_backbone_has_no_jax_config() -> None:
    kwargs = jax_config_to_hf_kwargs(load_jax_config(FIXTURES / "ttt_linear" / "config.json"))
    with pytest.raises(ConfigConversionError, match="share_qk=True with use_gate=False"):
        hf_config_to_jax_config({**kwargs, "use_gate": False})


# ------------------------------------------------------------------------------------------------- parameter mapping


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_shapes_match_upstream(variant: str) -> None:
    kwargs = jax_config_to_hf_kwargs(load_jax_config(FIXTURES / variant / "config.json"))
    expected = {key: shape for key, shape, _ in _listing(FIXTURES / variant / "params.txt")}
    assert jax_parameter_shapes(kwargs) == expected


def test_transforms_are_involutions() -> None:
    rng = np.random.default_rng(0)
    for transform, shape in [
        (Transform.IDENTITY, (3, 4, 5)),
        (Transform.TRANSPOSE, (3, 4)),
        (Transform.REVERSE_AXES, (4, 1, 6)),
        (Transform.SWAP_LAST_TWO, (2, 6, 1)),
    ]:
        array = rng.standard_normal(shape).astype(np.float32)
        assert transform.apply(array).shape == transform.shape(shape)
        assert np.array_equal(transform.apply(transform.apply(array)), array)


def _broken_checkpoint(tmp_path: Path, edit: Callable[[dict[KeyPath, np.ndarray]], None]) -> Path:
    tensors = read_streaming_checkpoint(FIXTURES / "ttt_linear" / "streaming_params")
    edit(tensors)
    return write_streaming_checkpoint(tmp_path / "streaming_params", tensors)


EXTRA_KEY = ("model", "h", "0", "seq_modeling_block", "wk", "kernel")
MISSING_KEY = ("model", "h", "1", "seq_modeling_block", "ttt_norm/scale")
RESHAPED_KEY = ("model", "h", "0", "seq_modeling_block", "wq", "kernel")
BROKEN_CHECKPOINTS: dict[str, tuple[Callable[[dict[KeyPath, np.ndarray]], None], tuple[str, ...]]] = {
    "extra_key": (
        lambda t: t.__setitem__(EXTRA_KEY, np.zeros((64, 64), np.float32)),
        ("not used", '["model", "h", "0", "seq_modeling_block", "wk", "kernel"]'),
    ),
    "missing_key": (
        lambda t: t.pop(MISSING_KEY),
        ("missing", '["model", "h", "1", "seq_modeling_block", "ttt_norm/scale"]',
         "model.layers.1.seq_modeling_block.ttt_norm_weight"),
    ),
    "wrong_shape": (
        lambda t: t.__setitem__(RESHAPED_KEY, np.zeros((64, 32), np.float32)),
        ('["model", "h", "0", "seq_modeling_block", "wq", "kernel"]', "expected shape (64, 64)", "found (64, 32)",
         "model.layers.0.seq_modeling_block.q_proj.weight"),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_mismatching_checkpoint_is_rejected(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit, fragments = BROKEN_CHECKPOINTS[case]
    checkpoint = _broken_checkpoint(tmp_path, edit)
    output = tmp_path / "model"
    with pytest.raises(ParameterMappingError) as error:
        convert_jax_checkpoint(checkpoint, FIXTURES / "ttt_linear" / "config.json", output)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))

    code, stderr = _convert_cli(checkpoint, FIXTURES / "ttt_linear" / "config.json", output, capsys)
    _assert_one_line_error(code, stderr, *fragments)
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streaming_params"]  # no staging folder left behind


def test_wrong_config_for_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "model"
    code, stderr = _convert_cli(
        FIXTURES / "ttt_mlp" / "streaming_params", FIXTURES / "ttt_linear" / "config.json", output, capsys
    )
    _assert_one_line_error(code, stderr, "ttt_dense_1", "not used")
    assert not output.exists()


def test_self_attention_config_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = _convert_cli(FIXTURES / "ttt_linear" / "streaming_params", "350m", tmp_path / "model", capsys)
    _assert_one_line_error(code, stderr, "self-attention")
    assert not (tmp_path / "model").exists()


def test_invalid_model_config_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = _convert_cli(
        FIXTURES / "ttt_linear" / "streaming_params", FIXTURES / "ttt_linear" / "config.json", tmp_path / "model",
        capsys, "--config-update", '{"num_attention_heads": 5}',
    )
    _assert_one_line_error(code, stderr, "invalid TTTConfig", "divisible by num_attention_heads")
    assert not any(tmp_path.iterdir())


def test_output_folder_is_protected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = FIXTURES / "ttt_linear" / "streaming_params"
    config = FIXTURES / "ttt_linear" / "config.json"
    output = tmp_path / "model"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    code, stderr = _convert_cli(checkpoint, config, output, capsys)
    _assert_one_line_error(code, stderr, "not empty", "--overwrite")
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]

    code, _ = _convert_cli(checkpoint, config, output, capsys, "--overwrite")
    assert code == 0
    # (with the modeling code that `save_pretrained` writes by default: `modeling_ttt.hub`)
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors", *hub.remote_code_files()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert_cli(checkpoint, config, empty, capsys)[0] == 0


# ------------------------------------------------------------------------------------------------------ round trip

TINY_JAX_CONFIGS: dict[str, dict[str, Any]] = {
    # Mamba backbone, TTT-MLP, untied head, mini-batch 4, conv width 3.
    "mlp_mamba_untied": {
        "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_sequence_length": 32, "seq_modeling_block": "ttt_mlp", "pre_conv": True,
        "conv_width": 3, "mini_batch_size": 4, "ttt_base_lr": 0.1, "rope_theta": 10000.0,
        "remat_mini_batch_group_size": 2, "tie_word_embeddings": False,
    },
    # Transformer backbone, TTT-Linear, tied head, no pre-conv.
    "linear_base_tied": {
        "vocab_size": 40, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 3,
        "num_attention_heads": 3, "max_sequence_length": 16, "seq_modeling_block": "ttt_linear_base",
        "pre_conv": False, "mini_batch_size": 8, "ttt_base_lr": 1.0, "rope_theta": 500.0,
        "remat_mini_batch_group_size": 1, "tie_word_embeddings": True,
    },
}


def _random_jax_checkpoint(config_file: Path, seed: int) -> dict[KeyPath, np.ndarray]:
    """Random tensors with every key and shape an upstream model of this config has."""
    shapes = jax_parameter_shapes(jax_config_to_hf_kwargs(load_jax_config(config_file)))
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()}


@pytest.mark.parametrize("name", sorted(TINY_JAX_CONFIGS))
@pytest.mark.parametrize(
    ("stored", "hf_dtype"), [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")]
)
def test_round_trip_is_bit_exact(
    name: str, stored: str, hf_dtype: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = TINY_JAX_CONFIGS[name]
    config_file = tmp_path / "jax_config.json"
    config_file.write_text(json.dumps(config))
    original = tmp_path / "streaming_params"
    write_streaming_checkpoint(original, _random_jax_checkpoint(config_file, seed=len(name)), dtype=stored)
    params = read_streaming_checkpoint(original)

    model_dir = tmp_path / "hf"
    code, stderr = _convert_cli(original, config_file, model_dir, capsys, "--dtype", hf_dtype)
    assert code == 0, stderr

    # The HF weights follow the documented layout transforms, checked here independently of the converter's tables.
    stored_hf = load_safetensors(model_dir / "model.safetensors")
    assert all(tensor.dtype == getattr(torch, hf_dtype) for tensor in stored_hf.values())
    weights = {key: tensor.float().numpy() for key, tensor in stored_hf.items()}
    as_f32 = {key: value.astype(np.float32) for key, value in params.items()}
    layer = ("model", "h", "0")
    ttt = (*layer, "seq_modeling_block")
    prefix = "model.layers.0.seq_modeling_block"
    assert np.array_equal(weights["model.embed_tokens.weight"], as_f32[("model", "wte", "embedding")])
    assert np.array_equal(weights["model.layers.0.mlp.gate_proj.weight"], as_f32[(*layer, "feed_forward", "w1", "kernel")].T)
    assert np.array_equal(weights["model.layers.0.mlp.down_proj.weight"], as_f32[(*layer, "feed_forward", "w2", "kernel")].T)
    assert np.array_equal(weights[f"{prefix}.q_proj.weight"], as_f32[(*ttt, "wq", "kernel")].T)
    assert np.array_equal(
        weights[f"{prefix}.learnable_ttt_lr_weight"], as_f32[(*ttt, "learnable_ttt_lr/kernel")].transpose(0, 2, 1)
    )
    assert np.array_equal(weights[f"{prefix}.ttt_norm_weight"], as_f32[(*ttt, "ttt_norm/scale")])
    assert np.array_equal(weights[f"{prefix}.W1"], as_f32[(*ttt, "ttt_dense_0")])
    if config["pre_conv"]:
        assert np.array_equal(
            weights["model.layers.0.conv.conv.weight"], as_f32[(*layer, "conv", "conv1", "kernel")].transpose(2, 1, 0)
        )
        assert np.array_equal(
            weights[f"{prefix}.conv_k.weight"], as_f32[(*ttt, "conv_k", "kernel")].transpose(2, 1, 0)
        )
    if config["tie_word_embeddings"]:
        assert "lm_head.weight" not in weights or np.array_equal(
            weights["lm_head.weight"], weights["model.embed_tokens.weight"]
        )
    else:
        assert np.array_equal(weights["lm_head.weight"], as_f32[("lm_head", "kernel")].T)

    back = tmp_path / "back" / "streaming_params"
    back_config = tmp_path / "back" / "config.json"
    code, stderr = _run_cli(
        main_to_jax,
        ["--model", str(model_dir), "--output", str(back), "--dtype", stored, "--jax-config-output", str(back_config)],
        capsys,
    )
    assert code == 0, stderr
    _assert_same_tensors(read_streaming_checkpoint(back), params)
    assert back.read_bytes() == original.read_bytes()
    # The written upstream config describes the same model (it may spell out defaults the input left implicit).
    from modeling_ttt import TTTConfig

    assert (
        TTTConfig(**jax_config_to_hf_kwargs(load_jax_config(back_config))).to_dict()
        == TTTConfig(**jax_config_to_hf_kwargs(load_jax_config(config_file))).to_dict()
    )


def test_to_jax_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stderr = _run_cli(main_to_jax, ["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "x")], capsys)
    _assert_one_line_error(code, stderr, "config.json")

    model_dir = convert_jax_checkpoint(
        FIXTURES / "ttt_linear" / "streaming_params", FIXTURES / "ttt_linear" / "config.json", tmp_path / "hf"
    )
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep")
    code, stderr = _run_cli(main_to_jax, ["--model", str(model_dir), "--output", str(existing)], capsys)
    _assert_one_line_error(code, stderr, "exists", "--overwrite")
    assert existing.read_bytes() == b"keep"

    # A config that no longer matches the weights is caught tensor by tensor.
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "ttt_layer_type": "mlp"}))
    output = tmp_path / "out"
    code, stderr = _run_cli(main_to_jax, ["--model", str(model_dir), "--output", str(output)], capsys)
    _assert_one_line_error(code, stderr, "model.layers.0.seq_modeling_block.W2", "missing")
    assert not output.exists()


# ---------------------------------------------------------------------------------------------------------- logits

LOGITS_CASES = [(variant, "streaming_params") for variant in VARIANTS] + [("ttt_mlp", "streaming_train_state")]


def _max_logit_errors(model_dir: Path, variant: str) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    import modeling_ttt  # noqa: F401  (registers model_type "ttt")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    input_ids = torch.from_numpy(np.load(FIXTURES / variant / "input_ids.npy").astype(np.int64))
    reference = np.load(FIXTURES / variant / "logits.npy")
    errors = {}
    for length in (input_ids.shape[1], *PREFIX_LENGTHS):
        with torch.no_grad():
            logits = model(input_ids[:, :length], use_cache=False).logits.float().numpy()
        errors[length] = float(np.abs(logits - reference[:, :length]).max())
    return errors


@pytest.mark.parametrize(("variant", "checkpoint"), LOGITS_CASES)
def test_converted_fixture_reproduces_jax_logits(
    variant: str, checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "model"
    code, stderr = _convert_cli(FIXTURES / variant / checkpoint, FIXTURES / variant / "config.json", output, capsys)
    assert code == 0, stderr
    errors = _max_logit_errors(output, variant)
    assert all(error <= LOGITS_TOLERANCE for error in errors.values()), errors


def test_preset_with_update_reproduces_jax_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The fixtures were built as upstream train.py builds a config: the 125m-TTT preset plus overrides.
    update = {
        "seq_modeling_block": "ttt_mlp", "ttt_base_lr": 0.1, "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_sequence_length": 64,
    }
    output = tmp_path / "model"
    code, stderr = _convert_cli(
        FIXTURES / "ttt_mlp" / "streaming_train_state", "125m-TTT", output, capsys, "--config-update", json.dumps(update)
    )
    assert code == 0, stderr
    errors = _max_logit_errors(output, "ttt_mlp")
    assert all(error <= LOGITS_TOLERANCE for error in errors.values()), errors


def test_hf_to_jax_reproduces_upstream_file(tmp_path: Path) -> None:
    # fixture → HF (bf16 kept exactly in float32) → JAX bf16 gives back upstream's own bytes.
    source = FIXTURES / "ttt_mlp" / "streaming_params"
    model_dir = convert_jax_checkpoint(source, FIXTURES / "ttt_mlp" / "config.json", tmp_path / "hf")
    back = convert_hf_to_jax(model_dir, tmp_path / "streaming_params", dtype="bfloat16")
    assert back.read_bytes() == source.read_bytes()
