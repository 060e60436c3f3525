"""Bad input is refused by name: a corpus of bad configs and bad checkpoints, each with its error and a phrase of
the message, and the good inputs next to them that must keep loading silently.

A config value that Python would coerce (`"false"` is true, `1.5` a group size, `inf` a learning rate) builds a
different model without a sign, and so does a checkpoint whose tensors do not match the model: both are errors."""

import json
import logging
import math
import shutil
import warnings
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_config, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_ttt import TTTConfig, TTTForCausalLM, TTTModel

# ----------------------------------------------------------------------------------------------------------------
# Bad configs: fields set on the valid `tiny_config()` (vocab_size 97), the exact error type, a phrase of its message
# ----------------------------------------------------------------------------------------------------------------

def case(case_id, *values):
    return pytest.param(*values, id=case_id)


STRING_BOOL = r"must be true or false \(a boolean, not a string or a number\), got 'false' \(str\)"
FINITE = r"must be a finite number > 0, got "

BAD_CONFIGS = [
    # (id, fields set, exact error type, phrase of its message)
    # booleans given as strings: a non-empty string is true ("false" built a gated model with a random g_proj)
    case("use_gate-string", dict(use_gate="false"), ValueError, r"TTTConfig\.use_gate " + STRING_BOOL),
    case("pre_conv-string", dict(pre_conv="false"), ValueError, r"TTTConfig\.pre_conv " + STRING_BOOL),
    case("share_qk-string", dict(share_qk="false"), ValueError, r"TTTConfig\.share_qk " + STRING_BOOL),
    case("tie_word_embeddings-string", dict(tie_word_embeddings="false"), ValueError,
         r"TTTConfig\.tie_word_embeddings " + STRING_BOOL),
    case("use_cache-string", dict(use_cache="true"), ValueError, r"TTTConfig\.use_cache must be true or false"),
    case("use_gate-int", dict(use_gate=0), ValueError, r"TTTConfig\.use_gate must be true or false .*, got 0 \(int\)"),
    case("output_hidden_states-string", dict(output_hidden_states="false"), ValueError,
         r"TTTConfig\.output_hidden_states must be true, false or null"),
    # floats: finite and in range; an int is a number, a bool or a string is not
    case("ttt_base_lr-inf", dict(ttt_base_lr=math.inf), ValueError, r"TTTConfig\.ttt_base_lr " + FINITE + "inf"),
    case("ttt_base_lr-string", dict(ttt_base_lr="1.0"), ValueError,
         r"TTTConfig\.ttt_base_lr " + FINITE + r"'1\.0' \(str\)"),
    case("ttt_base_lr-bool", dict(ttt_base_lr=True), ValueError, r"TTTConfig\.ttt_base_lr " + FINITE + "True"),
    case("rope_theta-inf", dict(rope_theta=math.inf), ValueError, r"TTTConfig\.rope_theta " + FINITE + "inf"),
    case("rope_theta-string", dict(rope_theta="10000"), ValueError, r"TTTConfig\.rope_theta " + FINITE + "'10000'"),
    case("rms_norm_eps-inf", dict(rms_norm_eps=math.inf), ValueError, r"TTTConfig\.rms_norm_eps " + FINITE + "inf"),
    case("initializer_range-minus-inf", dict(initializer_range=-math.inf), ValueError,
         r"TTTConfig\.initializer_range " + FINITE + "-inf"),
    # integers: neither a float nor a bool
    case("scan_checkpoint_group_size-float", dict(scan_checkpoint_group_size=1.5), ValueError,
         r"TTTConfig\.scan_checkpoint_group_size must be an integer >= 0 \(0 disables\), got 1\.5 \(float\)"),
    case("scan_checkpoint_group_size-bool", dict(scan_checkpoint_group_size=True), ValueError,
         r"TTTConfig\.scan_checkpoint_group_size must be an integer >= 0 .*, got True \(bool\)"),
    case("max_position_embeddings-zero", dict(max_position_embeddings=0), ValueError,
         r"TTTConfig\.max_position_embeddings must be an integer >= 1, got 0"),
    # strings from their allowed set (an unhashable value was a TypeError naming no field)
    case("hidden_act-list", dict(hidden_act=["silu"]), ValueError, r"TTTConfig\.hidden_act must be one of \(.*'silu'"),
    # token ids: ints >= 0 (eos_token_id: or a non-empty list of them), inside the vocabulary
    case("eos_token_id-string", dict(eos_token_id="2"), ValueError,
         r"TTTConfig\.eos_token_id must be null, a token id \(an integer >= 0\) or a non-empty list .*, got '2'"),
    case("eos_token_id-list-with-string", dict(eos_token_id=[2, "3"]), ValueError,
         r"TTTConfig\.eos_token_id must be .* list of token ids, got \[2, '3'\]"),
    case("eos_token_id-empty-list", dict(eos_token_id=[]), ValueError,
         r"TTTConfig\.eos_token_id must be .* non-empty list of token ids, got \[\]"),
    case("eos_token_id-outside-vocab", dict(eos_token_id=97), ValueError,
         r"TTTConfig\.eos_token_id must be a token id < vocab_size \(97\), got 97"),
    case("eos_token_id-list-outside-vocab", dict(eos_token_id=[2, 500]), ValueError,
         r"TTTConfig\.eos_token_id must be a token id < vocab_size \(97\), got \[2, 500\]"),
    case("pad_token_id-negative", dict(pad_token_id=-1), ValueError,
         r"TTTConfig\.pad_token_id must be null or a token id \(an integer >= 0\), got -1"),
    case("pad_token_id-outside-vocab", dict(pad_token_id=97), ValueError,
         r"TTTConfig\.pad_token_id must be a token id < vocab_size \(97\), got 97"),
    case("bos_token_id-bool", dict(bos_token_id=True), ValueError,
         r"TTTConfig\.bos_token_id must be null or a token id .*, got True \(bool\)"),
    case("bos_token_id-float", dict(bos_token_id=1.0), ValueError,
         r"TTTConfig\.bos_token_id must be null or a token id .*, got 1\.0 \(float\)"),
]


def _raises(error, match):
    """`pytest.raises` of exactly `error` (not a subclass, not huggingface_hub's wrapper)."""

    @contextmanager
    def check():
        with pytest.raises(error, match=match) as info:
            yield
        assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}"

    return check()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A valid checkpoint of `tiny_model()` (Mamba backbone, TTT-Linear)."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    return path


def _with_config_fields(source, target, fields):
    """Copy the checkpoint folder `source` to `target` with `fields` written into its config.json."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(fields)
    (target / "config.json").write_text(json.dumps(config))  # (inf is written as `Infinity`, which JSON loaders read)
    return target


@pytest.mark.parametrize("fields, error, match", BAD_CONFIGS)
def test_bad_config_at_construction(fields, error, match):
    with _raises(error, match):
        tiny_config(**fields)


@pytest.mark.parametrize("load", [AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained],
                         ids=["AutoConfig", "AutoModelForCausalLM"])
@pytest.mark.parametrize("fields, error, match", BAD_CONFIGS)
def test_bad_config_json_at_from_pretrained(fields, error, match, load, checkpoint_dir, tmp_path):
    path = _with_config_fields(checkpoint_dir, tmp_path / "checkpoint", fields)
    with _raises(error, match):
        load(path)


@pytest.mark.parametrize("fields, error, match", BAD_CONFIGS)
def test_bad_config_keyword_at_from_pretrained(fields, error, match, checkpoint_dir):
    """`from_pretrained(path, field=value)` sets the field after construction: checked as well."""
    with _raises(error, match):
        TTTConfig.from_pretrained(checkpoint_dir, **fields)


def test_assignment_and_preset_overrides_are_checked():
    config = tiny_config()
    with _raises(ValueError, r"TTTConfig\.use_gate must be true or false"):
        config.use_gate = "false"
    assert config.use_gate is True
    with _raises(ValueError, r"TTTConfig\.ttt_base_lr must be a finite number > 0, got nan"):
        TTTConfig.from_preset("125m-linear", ttt_base_lr=math.nan)


@pytest.mark.parametrize(
    "fields",
    [dict(ttt_base_lr=1, rope_theta=10000, rms_norm_eps=1e-5), dict(eos_token_id=[2, 3], pad_token_id=0),
     dict(eos_token_id=None, bos_token_id=None, pad_token_id=None), dict(output_hidden_states=None)],
    ids=["ints-for-floats", "token-id-list", "no-token-ids", "optional-bool-none"],
)
def test_good_configs_still_accepted(fields, tmp_path):
    config = tiny_config(**fields)
    config.save_pretrained(tmp_path)
    again = TTTConfig.from_pretrained(tmp_path)
    assert {name: getattr(again, name) for name in fields} == fields


# ----------------------------------------------------------------------------------------------------------------
# Bad checkpoints: a tensor the model would initialise at random, or one the model does not use
# ----------------------------------------------------------------------------------------------------------------


def drop(part):
    """The state-dict edit that removes every tensor whose name contains `part`."""
    return lambda tensors: {key: value for key, value in tensors.items() if part not in key}


def add(key):
    return lambda tensors: {**tensors, key: torch.zeros(3)}


def both(first, second):
    return lambda tensors: second(first(tensors))


def keep(tensors):
    return tensors


MAMBA, TRANSFORMER = dict(backbone="mamba"), dict(backbone="transformer")
MISSING = r"Missing from the checkpoint \(the model would initialise them at random\): "
UNUSED = r"In the checkpoint but not used by the model \(they would be ignored\): "

BAD_CHECKPOINTS = [
    # (id, model saved, its tensors edited, config.json fields edited, exact error type, phrase of its message)
    case("missing-g_proj", MAMBA, drop("g_proj"), {}, ValueError,
         MISSING + r"model\.layers\.\{0, 1\}\.seq_modeling_block\.g_proj\.weight\. .*allow_missing_ttt_weights=True"),
    case("extra-tensor", MAMBA, add("model.layers.0.seq_modeling_block.extra.weight"), {}, ValueError,
         UNUSED + r"model\.layers\.0\.seq_modeling_block\.extra\.weight\. .*allow_unexpected_ttt_weights=True"),
    case("missing-and-extra", MAMBA, both(drop("g_proj"), add("model.extra.weight")), {}, ValueError,
         MISSING + r".*g_proj\.weight\. " + UNUSED + r"model\.extra\.weight\. .*"
         r"allow_missing_ttt_weights=True.* and .*allow_unexpected_ttt_weights=True"),
    case("extra-head-bias", MAMBA, add("lm_head.bias"), {}, ValueError, UNUSED + r"lm_head\.bias"),
    case("use_gate-true-for-ungated-checkpoint", TRANSFORMER, keep, dict(use_gate=True), ValueError,
         MISSING + r"model\.layers\.\{0, 1\}\.seq_modeling_block\.g_proj\.weight"),
    case("use_gate-false-for-gated-checkpoint", MAMBA, keep, dict(use_gate=False), ValueError,
         UNUSED + r"model\.layers\.\{0, 1\}\.seq_modeling_block\.g_proj\.weight"),
    case("pre_conv-true-for-checkpoint-without-conv", TRANSFORMER, keep, dict(pre_conv=True), ValueError,
         MISSING + r"model\.layers\.\{0, 1\}\.conv\.conv\.bias, model\.layers\.\{0, 1\}\.conv\.conv\.weight"),
    case("more-layers-than-the-checkpoint", MAMBA, keep, dict(num_hidden_layers=3), ValueError,
         MISSING + r".*model\.layers\.2\.mlp\.down_proj\.weight"),
    case("fewer-layers-than-the-checkpoint", MAMBA, keep, dict(num_hidden_layers=1), ValueError,
         UNUSED + r".*model\.layers\.1\.mlp\.down_proj\.weight"),
    case("untied-checkpoint-without-head", dict(tie_word_embeddings=False), drop("lm_head"), {}, ValueError,
         MISSING + r"lm_head\.weight\."),
    case("missing-final-norm", MAMBA, drop("model.norm.weight"), {}, ValueError, MISSING + r"model\.norm\.weight\."),
]


def _bad_checkpoint(path, saved, edit_tensors, config_fields):
    tiny_model(**saved).save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    save_file(edit_tensors(tensors), path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(config_fields)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("load", [TTTForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained],
                         ids=["TTTForCausalLM", "AutoModelForCausalLM"])
@pytest.mark.parametrize("saved, edit_tensors, config_fields, error, match", BAD_CHECKPOINTS)
def test_bad_checkpoint(saved, edit_tensors, config_fields, error, match, load, tmp_path):
    path = _bad_checkpoint(tmp_path, saved, edit_tensors, config_fields)
    with _raises(error, match):
        load(path)


def test_bad_checkpoint_of_the_base_model(tmp_path):
    path = _bad_checkpoint(tmp_path, MAMBA, drop("g_proj"), {})
    with _raises(ValueError, r"TTTModel\.from_pretrained\(.*Missing .*g_proj"):
        TTTModel.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------
# What still loads: on purpose (opt-in), and silently (a folder written by save_pretrained)
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def no_warnings():
    """Fail on any warning: transformers' log records (its load report is one) and Python warnings."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        library_logger.removeHandler(handler)
    assert not records, [record.getMessage() for record in records]


@pytest.mark.parametrize("saved", [MAMBA, TRANSFORMER, dict(layer_type="mlp", tie_word_embeddings=False)],
                         ids=["mamba", "transformer", "mlp-untied"])
def test_save_pretrained_folder_loads_silently(saved, tmp_path):
    model = tiny_model(**saved)
    model.save_pretrained(tmp_path)
    with no_warnings():
        loaded, info = TTTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    expected, got = model.state_dict(), loaded.state_dict()  # (buffers included; logits: tests/test_modeling.py)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_base_model_loads_from_a_causal_lm_checkpoint_without_its_head(tmp_path):
    tiny_model(tie_word_embeddings=False).save_pretrained(tmp_path)  # (holds lm_head.weight)
    with no_warnings():
        TTTModel.from_pretrained(tmp_path)


def test_random_initialisation_on_purpose():
    config = tiny_config()
    assert TTTForCausalLM(config).model.layers[0].seq_modeling_block.g_proj.weight.shape == (32, 32)
    assert isinstance(AutoModelForCausalLM.from_config(config), TTTForCausalLM)


@pytest.mark.parametrize("load", [TTTForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained],
                         ids=["TTTForCausalLM", "AutoModelForCausalLM"])
def test_opting_in_loads_and_reports(load, tmp_path):
    path = _bad_checkpoint(tmp_path, MAMBA, both(drop("g_proj"), add("model.extra.weight")), {})
    model, info = load(path, allow_missing_ttt_weights=True, allow_unexpected_ttt_weights=True,
                       output_loading_info=True)
    assert isinstance(model, TTTForCausalLM)
    assert info["missing_keys"] == {f"model.layers.{i}.seq_modeling_block.g_proj.weight" for i in (0, 1)}
    assert info["unexpected_keys"] == {"model.extra.weight"}
    assert isinstance(load(path, allow_missing_ttt_weights=True, allow_unexpected_ttt_weights=True), TTTForCausalLM)


def test_opting_in_to_one_problem_still_refuses_the_other(tmp_path):
    path = _bad_checkpoint(tmp_path, MAMBA, both(drop("g_proj"), add("model.extra.weight")), {})
    with _raises(ValueError, r"not used by the model .*model\.extra\.weight"):
        TTTForCausalLM.from_pretrained(path, allow_missing_ttt_weights=True)
    with pytest.raises(ValueError) as info:
        TTTForCausalLM.from_pretrained(path, allow_unexpected_ttt_weights=True)
    assert "g_proj" in str(info.value) and "extra" not in str(info.value)


def test_ignore_mismatched_sizes_is_honoured(tmp_path):
    """A size mismatch stays transformers' own error, and `ignore_mismatched_sizes=True` its opt-in."""
    _bad_checkpoint(tmp_path, MAMBA, keep, dict(vocab_size=101))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        TTTForCausalLM.from_pretrained(tmp_path)
    model, info = TTTForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.config.vocab_size == 101
    assert {key for key, *_ in info["mismatched_keys"]} == {"model.embed_tokens.weight"}
