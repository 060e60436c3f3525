"""`ttt-convert-jax --official NAME` (the nine published checkpoints), `--reference` parity and the model card.

The official checkpoints are far too big for a test, so their table is checked against the numbers of upstream's
own config definitions, read from test-time-training/ttt-lm-jax@a9b2904 and written out here by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modeling_ttt import TTTConfig, hub
from modeling_ttt.conversion.jax import main
from modeling_ttt.conversion.jax_config import (
    OFFICIAL_MODELS,
    ConfigConversionError,
    official_config,
    official_hub_id,
    official_jax_config,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ttt_jax"

# Sizes of upstream's presets: `CONFIGS` in ttt/models/model.py (layers, hidden, heads, intermediate); every
# "*-TTT" preset has vocab 32000, mini_batch_size 16, pre_conv True, conv_width 4, rope_theta 1e4, tied embeddings.
UPSTREAM_PRESET_SIZES = {
    "125m-TTT": (12, 768, 12, 2048),
    "350m-TTT": (24, 1024, 16, 2736),
    "760m-TTT": (24, 1536, 16, 4096),
    "1b-TTT": (24, 2048, 32, 5504),
}
# name -> (--load_model_config, seq_modeling_block, ttt_base_lr, ttt_base_lr_warmup, context length, dataset).
# --load_model_config / --update_model_config: scripts/ttt_linear/{125m,350m,760m,1.3b}.sh and
# scripts/ttt_mlp/{125m,350m,760m,1.3b}.sh, lines 23-24 (TTT-MLP: ttt_base_lr=0.1, ttt_base_lr_init=0.01,
# ttt_base_lr_warmup=<lr_warmup_steps>: 480, 1350, 2900, 5000; TTT-Linear: ttt_base_lr=1.0, no warmup, i.e. -1).
# Context length: SEQ_LEN=2048 in the scripts for "2k"; 8192 / 32768 from the names (train.py sets
# max_sequence_length = seq_length).
EXPECTED = {
    "ttt-linear-125m-books-2k": ("125m-TTT", "ttt_linear", 1.0, -1, 2048, "books3"),
    "ttt-linear-350m-books-2k": ("350m-TTT", "ttt_linear", 1.0, -1, 2048, "books3"),
    "ttt-mlp-125m-books-2k": ("125m-TTT", "ttt_mlp", 0.1, 480, 2048, "books3"),
    "ttt-mlp-350m-books-2k": ("350m-TTT", "ttt_mlp", 0.1, 1350, 2048, "books3"),
    "ttt-linear-760m-pile-8k": ("760m-TTT", "ttt_linear", 1.0, -1, 8192, "the_pile"),
    "ttt-mlp-760m-pile-8k": ("760m-TTT", "ttt_mlp", 0.1, 2900, 8192, "the_pile"),
    "ttt-linear-1.3b-pile-8k": ("1b-TTT", "ttt_linear", 1.0, -1, 8192, "the_pile"),
    "ttt-mlp-1.3b-pile-8k": ("1b-TTT", "ttt_mlp", 0.1, 5000, 8192, "the_pile"),
    "ttt-linear-1.3b-books-32k": ("1b-TTT", "ttt_linear", 1.0, -1, 32768, "books3"),
}


def test_table_lists_the_nine_names() -> None:
    assert list(OFFICIAL_MODELS) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_table_matches_upstream_scripts(name: str) -> None:
    preset, block, base_lr, warmup, context, dataset = EXPECTED[name]
    row = OFFICIAL_MODELS[name]
    assert (row.preset, row.context_length, row.dataset) == (preset, context, dataset)
    assert row.update["seq_modeling_block"] == block and row.update["ttt_base_lr"] == base_lr
    assert row.update.get("ttt_base_lr_warmup", -1) == warmup
    if block == "ttt_mlp":
        assert row.update["ttt_base_lr_init"] == 0.01

    config = official_jax_config(name)
    layers, hidden, heads, intermediate = UPSTREAM_PRESET_SIZES[preset]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["intermediate_size"]) == (layers, hidden, heads, intermediate)
    assert config["vocab_size"] == 32000 and config["max_sequence_length"] == context
    assert config["mini_batch_size"] == 16 and config["pre_conv"] is True and config["conv_width"] == 4
    assert config["seq_modeling_block"] == block and config["ttt_base_lr"] == base_lr


@pytest.mark.parametrize("name", list(EXPECTED))
def test_official_config_builds_the_ttt_config(name: str) -> None:
    preset, block, base_lr, _, context, _ = EXPECTED[name]
    layers, hidden, heads, intermediate = UPSTREAM_PRESET_SIZES[preset]
    config = official_config(name)
    assert isinstance(config, TTTConfig)
    assert config.ttt_layer_type == ("mlp" if block == "ttt_mlp" else "linear")
    # Mamba backbone (seq_modeling_block ttt_linear / ttt_mlp, not *_base).
    assert config.share_qk and config.use_gate and config.pre_conv and config.conv_kernel == 4
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        layers, hidden, heads, intermediate)
    assert config.vocab_size == 32000 and config.max_position_embeddings == context
    assert config.mini_batch_size == 16 and config.ttt_base_lr == base_lr and config.tie_word_embeddings
    assert official_hub_id(name) == f"Test-Time-Training/{name}"


def test_unknown_official_name_lists_the_nine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigConversionError) as info:
        official_config("ttt-linear-7b")
    assert all(name in str(info.value) for name in EXPECTED)
    code = main(["--checkpoint", str(FIXTURES / "ttt_linear" / "streaming_params"), "--official", "ttt-linear-7b",
                 "--output", str(tmp_path / "model"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert all(name in err for name in EXPECTED)
    assert not (tmp_path / "model").exists()


def test_official_and_jax_config_together_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--checkpoint", str(FIXTURES / "ttt_linear" / "streaming_params"), "--official",
                 "ttt-linear-125m-books-2k", "--jax-config", str(FIXTURES / "ttt_linear" / "config.json"),
                 "--output", str(tmp_path / "model"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--official" in err and "--jax-config" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists()


def test_neither_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--checkpoint", str(FIXTURES / "ttt_linear" / "streaming_params"), "--output",
                 str(tmp_path / "model"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--jax-config" in err and "--official" in err
    assert not (tmp_path / "model").exists()


def test_official_on_a_tiny_fixture_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The fixture is not a 125M model: the shapes mismatch, nothing is written.
    code = main(["--checkpoint", str(FIXTURES / "ttt_linear" / "streaming_params"), "--official",
                 "ttt-linear-125m-books-2k", "--output", str(tmp_path / "model"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    assert not any(tmp_path.iterdir())


_PARITY_ROW = re.compile(r"^\| ([0-9.e+-]+) \| ([0-9.]+)% \|$", re.MULTILINE)


@pytest.mark.parametrize("variant", ["ttt_linear", "ttt_mlp"])
def test_reference_parity_goes_into_card(variant: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "model"
    code = main(["--checkpoint", str(FIXTURES / variant / "streaming_params"), "--jax-config",
                 str(FIXTURES / variant / "config.json"), "--reference", str(FIXTURES / variant), "--output",
                 str(output), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "max |delta logits|" in captured.out and "100.00%" in captured.out
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors", *hub.remote_code_files()])
    card = (output / "README.md").read_text()
    assert "## Conversion parity" in card
    [(max_abs, agreement)] = _PARITY_ROW.findall(card)
    assert float(max_abs) <= 1e-4 and agreement == "100.00"
    assert "128 positions" in card  # 2 x 64 ids


def test_card_without_reference_has_no_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "model"
    code = main(["--checkpoint", str(FIXTURES / "ttt_linear" / "streaming_params"), "--jax-config",
                 str(FIXTURES / "ttt_linear" / "config.json"), "--output", str(output), "--quiet"])
    assert code == 0, capsys.readouterr().err
    card = (output / "README.md").read_text()
    assert "Conversion parity" not in card and "TTT-Linear" in card


def test_bad_reference_is_refused_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--checkpoint", str(FIXTURES / "ttt_linear" / "streaming_params"), "--jax-config",
                 str(FIXTURES / "ttt_linear" / "config.json"), "--reference", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "model"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--reference" in err
    assert not (tmp_path / "model").exists()
