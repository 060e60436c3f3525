"""A saved folder carries its modeling code (`modeling_ttt.hub`): it loads with `trust_remote_code=True` in a
process that cannot import `modeling_ttt`, and gives the same numbers as the package."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_ttt import TTTConfig, TTTForCausalLM, hub

from conftest import BLOCK_MODELING_TTT, VARIANTS, tiny_model

IDS = [[5, 17, 3, 88, 41, 2, 9, 60, 33, 12, 71]]

# Runs in a fresh interpreter: `modeling_ttt` cannot be imported there (a meta-path finder refuses it, and the
# working directory is outside the repository), so transformers must use the code in the folder.
REMOTE_SCRIPT = textwrap.dedent("""
    import sys

    {block_modeling_ttt}
    import torch
    from transformers import AutoModelForCausalLM

    folders, ids, out = sys.argv[1:-2], torch.tensor(eval(sys.argv[-2])), sys.argv[-1]
    results = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
        results[folder] = {"module": type(model).__module__, "logits": logits, "tokens": tokens}
    ops = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".ttt_ops"]
    results["auto"] = ops.resolve_ttt_impl("auto", "cpu")  # the copy has no kernels: "auto" is the PyTorch ops
    results["loaded"] = sorted(name for name in sys.modules if name.startswith("modeling_ttt"))
    torch.save(results, out)
""").replace("{block_modeling_ttt}", BLOCK_MODELING_TTT)


def _load_remotely(folders, tmp_path):
    """Load each folder in one fresh interpreter without `modeling_ttt` (one process: starting one costs seconds)."""
    out = tmp_path / "remote.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TTT_IMPL="")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, *map(str, folders), repr(IDS), str(out)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _expected(model):
    ids = torch.tensor(IDS)
    with torch.no_grad():
        return model(ids).logits, model.generate(ids, max_new_tokens=6, do_sample=False)


def test_folder_loads_without_the_package(tmp_path):
    models = {f"{layer}-{backbone}": tiny_model(layer, backbone, ttt_impl="torch") for layer, backbone in VARIANTS}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    remote = _load_remotely([tmp_path / name for name in models], tmp_path)
    assert remote["loaded"] == []  # the blocker held: nothing of the package was imported there
    assert remote["auto"] == "torch"
    for name, model in models.items():
        logits, tokens = _expected(model)
        loaded = remote[str(tmp_path / name)]
        assert loaded["module"].startswith("transformers_modules."), loaded["module"]
        assert torch.equal(loaded["logits"], logits), name
        assert torch.equal(loaded["tokens"], tokens), name


def test_auto_map_and_files(tmp_path):
    folder = tmp_path / "saved"
    model = tiny_model()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == hub.AUTO_MAP
    names = set(os.listdir(folder))
    assert set(hub.remote_code_files()) <= names
    assert {"configuration_ttt.py", "modeling_ttt.py", "ttt_ops.py"} <= names
    # the in-memory config is unchanged by the save
    assert not hasattr(model.config, "auto_map")


def test_with_code_false_writes_no_code(tmp_path):
    folder = tmp_path / "plain"
    tiny_model().save_pretrained(folder, with_code=False)
    assert not any(name.endswith(".py") for name in os.listdir(folder))
    assert "auto_map" not in json.loads((folder / "config.json").read_text())


def test_load_with_the_package_installed(tmp_path):
    model = tiny_model("mlp", "transformer", ttt_impl="torch")
    folder = tmp_path / "saved"
    hub.save_with_code(model, folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is TTTForCausalLM
    assert torch.equal(_expected(loaded)[0], _expected(model)[0])


def test_registered_auto_class_saves(tmp_path):
    # transformers' own custom_object_save copied the package files as they are and failed on `ops.py`
    TTTConfig.register_for_auto_class()
    TTTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    try:
        tiny_model().save_pretrained(tmp_path / "model")
        TTTConfig(**tiny_model().config.to_diff_dict()).save_pretrained(tmp_path / "config")
    finally:
        del TTTConfig._auto_class, TTTForCausalLM._auto_class
    assert json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"] == hub.AUTO_MAP
    assert json.loads((tmp_path / "config" / "config.json").read_text())["auto_map"] == hub.CONFIG_AUTO_MAP
    assert AutoConfig.from_pretrained(tmp_path / "config").model_type == "ttt"
    assert not hasattr(TTTConfig, "auto_map")


def test_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_model().save_pretrained(tmp_path / "saved")
    assert os.listdir(tmp_path) == []
