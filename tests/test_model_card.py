"""Model cards (`modeling_ttt.model_card`) and `push_to_hub` with the card, against a local fake of the Hub client."""

import os
import shutil
import subprocess
import sys
import zipfile

import huggingface_hub
import pytest
from huggingface_hub import CommitInfo, ModelCard, ModelCardData
from transformers.utils import hub as transformers_hub

from modeling_ttt.model_card import make_model_card, template_path, write_model_card

from conftest import tiny_config, tiny_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = {"dataset": "DKYoon/SlimPajama-6B", "split": "test", "perplexity": 12.3456, "context_length": 2048}
TRAINING = {"datasets": ["DKYoon/SlimPajama-6B"], "tokens": 2_500_000_000, "steps": 4800}


def reparse(card: ModelCard) -> ModelCard:
    """The card as the Hub reads it: parsed back from its text (metadata validated by `ModelCardData`)."""
    return ModelCard(str(card))


def assert_hub_metadata(data: ModelCardData, config) -> None:
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert {"ttt", "test-time-training", "text-generation"} <= set(data.tags)
    assert f"ttt-{config.ttt_layer_type}" in data.tags


# -- the card ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_type,backbone", [("linear", "mamba"), ("mlp", "transformer")])
def test_card_without_results_or_base_model(layer_type, backbone):
    model = tiny_model(layer_type, backbone)
    card = reparse(make_model_card(model.config, num_parameters=model.num_parameters(), repo_id="me/ttt-tiny"))
    assert_hub_metadata(card.data, model.config)
    assert card.data.base_model is None and card.data.eval_results is None and card.data.datasets is None
    assert "model-index" not in card.data.to_dict()
    assert f"{backbone}-backbone" in card.data.tags
    text = card.text
    assert f"{model.num_parameters():,}" in text
    assert {"mamba": "Mamba", "transformer": "Transformer"}[backbone] in text
    assert {"linear": "TTT-Linear", "mlp": "TTT-MLP"}[layer_type] in text
    assert "| Mini-batch size | 8 tokens" in text and "| Layers | 2 |" in text and "| Hidden size | 32 |" in text
    assert "| Heads | 4 (head dimension 8) |" in text
    assert "arxiv.org/abs/2407.04620" in text
    assert "import modeling_ttt" in text and 'AutoModelForCausalLM.from_pretrained("me/ttt-tiny")' in text
    assert 'from_pretrained("me/ttt-tiny", trust_remote_code=True)' in text
    assert "No evaluation results were given" in text and "No training details were given" in text
    assert "![" not in text and "[More Information Needed]" not in text
    assert "## Intended use and limitations" in text


def test_card_with_results_training_base_model_and_plot():
    model = tiny_model()
    card = reparse(make_model_card(model.config, num_parameters=model.num_parameters(), repo_id="me/ttt-tiny",
                                   base_model="test-time-training/ttt-125m", training=TRAINING, results=RESULT,
                                   plot="loss_by_position.png", license="mit", tags=["demo"]))
    data = card.data
    assert data.base_model == "test-time-training/ttt-125m"
    assert data.datasets == ["DKYoon/SlimPajama-6B"] and data.metrics == ["perplexity"]
    assert data.license == "mit" and "demo" in data.tags
    (result,) = data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(12.3456)
    assert result.task_type == "text-generation" and result.dataset_type == "DKYoon/SlimPajama-6B"
    assert result.dataset_split == "test"
    model_index = data.to_dict()["model-index"]
    assert model_index[0]["name"] == data.model_name
    assert model_index[0]["results"][0]["metrics"][0]["value"] == pytest.approx(12.3456)
    text = card.text
    assert "| DKYoon/SlimPajama-6B | test | 2048 | 12.35 |" in text
    assert "Tokens: 2,500,000,000" in text and "Steps: 4,800" in text
    assert "![Loss by token position](loss_by_position.png)" in text
    assert "https://huggingface.co/test-time-training/ttt-125m" in text
    assert text.lstrip().startswith(f"# {data.model_name}")


def test_several_results_become_several_model_index_entries():
    config = tiny_config()
    results = [RESULT, {"dataset": "pg19", "perplexity": 20.0}]
    card = reparse(make_model_card(config, num_parameters=1234, results=results))
    assert [r.dataset_type for r in card.data.eval_results] == ["DKYoon/SlimPajama-6B", "pg19"]
    assert "| pg19 | - | - | 20.00 |" in card.text


@pytest.mark.parametrize("kwargs,error", [
    (dict(results={"perplexity": 10.0}), "needs 'dataset'"),
    (dict(results={"dataset": "x", "perplexity": 0.5}), "perplexity"),
    (dict(results={"dataset": "x", "perplexity": 10.0, "ppl": 1}), "Unknown results"),
    (dict(training={"token": 10}), "Unknown training"),
    (dict(training={"tokens": "many"}), "positive int"),
])
def test_bad_metadata_is_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        make_model_card(tiny_config(), num_parameters=1000, **kwargs)


def test_write_model_card_copies_the_plot_and_counts_parameters(tmp_path):
    plot = tmp_path / "plots" / "loss.png"
    plot.parent.mkdir()
    plot.write_bytes(b"\x89PNG fake")
    model = tiny_model()
    write_model_card(model, tmp_path / "out", plot=str(plot), results=RESULT)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert (tmp_path / "out" / "loss.png").read_bytes() == b"\x89PNG fake"
    assert "![Loss by token position](loss.png)" in card.text
    assert f"{model.num_parameters():,}" in card.text
    with pytest.raises(ValueError, match="num_parameters"):
        write_model_card(model.config, tmp_path / "other")


def test_template_ships_as_package_data(tmp_path):
    """The wheel holds the template under modeling_ttt/model_cards/, and the installed package finds it there."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO_ROOT, name), source / name)
    for name in ("modeling_ttt", "configuration", "conversion", "model_cards"):
        shutil.copytree(os.path.join(REPO_ROOT, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "modeling_ttt/model_cards/ttt_model_card.md" in archive.namelist()
        archive.extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "import modeling_ttt.model_card as m; print(m.template_path())"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        check=True, capture_output=True, text=True).stdout.strip()
    assert found == str(tmp_path / "site" / "modeling_ttt" / "model_cards" / "ttt_model_card.md")
    assert template_path() == os.path.join(REPO_ROOT, "model_cards", "ttt_model_card.md")


# -- push_to_hub against a fake Hub ------------------------------------------------------------------------------


class FakeHubApi:
    """Records create_repo / create_branch / create_commit; any other Hub call fails the test."""

    def __init__(self):
        self.calls = []
        self.commits = []

    def create_repo(self, repo_id, *, private=None, token=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, token=None,
                      create_pr=False, revision=None, **kwargs):
        files = {}
        for operation in operations:
            assert isinstance(operation, huggingface_hub.CommitOperationAdd)
            with open(operation.path_or_fileobj, "rb") as handle:  # the folder is gone after the push
                files[operation.path_in_repo] = handle.read()
        self.calls.append(("create_commit", repo_id))
        self.commits.append(dict(repo_id=repo_id, files=files, message=commit_message, revision=revision,
                                 create_pr=create_pr))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message=commit_message,
                          commit_description=commit_description or "", oid="0" * 40)

    def __getattr__(self, name):
        raise AssertionError(f"unexpected Hub call HfApi.{name}")


def _refuse(*args, **kwargs):
    raise AssertionError("the real Hub client was reached")


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    api = FakeHubApi()
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    for name in ("create_repo", "create_commit", "create_branch", "upload_folder", "upload_file", "model_info",
                 "repo_info", "file_exists"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, _refuse)
    monkeypatch.setattr(ModelCard, "load", classmethod(_refuse))
    return api


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def saved_files(model, tokenizer, directory) -> set[str]:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return set(os.listdir(directory))


def test_push_to_hub_uploads_the_saved_folder_and_our_card_in_one_commit(fake_hub, tokenizer, tmp_path):
    model = tiny_model()
    plot = tmp_path / "loss_by_position.png"
    plot.write_bytes(b"\x89PNG fake")
    expected = saved_files(model, tokenizer, tmp_path / "local") | {"README.md", "loss_by_position.png"}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= expected

    info = model.push_to_hub("me/ttt-tiny", tokenizer=tokenizer, results=RESULT, training=TRAINING,
                             base_model="test-time-training/ttt-125m", commit_message="Upload TTT", tags=["demo"],
                             plot=str(plot))

    assert [call[0] for call in fake_hub.calls] == ["create_repo", "create_commit"]
    (commit,) = fake_hub.commits
    assert commit["repo_id"] == "me/ttt-tiny" and commit["message"] == "Upload TTT"
    assert set(commit["files"]) == expected
    assert isinstance(info, CommitInfo) and info.commit_message == "Upload TTT"
    assert commit["files"]["model.safetensors"] == (tmp_path / "local" / "model.safetensors").read_bytes()

    card = ModelCard(commit["files"]["README.md"].decode("utf-8"))
    assert isinstance(card.data, ModelCardData)
    assert_hub_metadata(card.data, model.config)
    assert "demo" in card.data.tags and "tags: []" not in str(card)
    assert card.data.base_model == "test-time-training/ttt-125m"
    assert card.data.eval_results[0].metric_value == pytest.approx(RESULT["perplexity"])
    assert 'from_pretrained("me/ttt-tiny"' in card.text and f"{model.num_parameters():,}" in card.text
    assert "[More Information Needed]" not in card.text
    assert "![Loss by token position](loss_by_position.png)" in card.text
    assert commit["files"]["loss_by_position.png"] == b"\x89PNG fake"


def test_push_to_hub_to_a_branch_without_tokenizer_and_with_a_given_card(fake_hub, tmp_path):
    model = tiny_model("mlp", "transformer")
    expected = saved_files(model, None, tmp_path / "local") | {"README.md"}
    given = make_model_card(model.config, num_parameters=model.num_parameters(), model_name="Given card")

    model.push_to_hub("me/ttt-mlp", revision="v1", model_card=given)

    assert [call[0] for call in fake_hub.calls] == ["create_repo", "create_branch", "create_commit"]
    (commit,) = fake_hub.commits
    assert set(commit["files"]) == expected and commit["revision"] == "v1"
    assert commit["message"] == "Upload TTTForCausalLM"  # transformers' default for this class name
    assert ModelCard(commit["files"]["README.md"].decode("utf-8")).text.lstrip().startswith("# Given card")


def test_the_fake_refuses_other_hub_calls(fake_hub):
    with pytest.raises(AssertionError, match="unexpected Hub call"):
        fake_hub.upload_folder(repo_id="me/x", folder_path=".")
    with pytest.raises(AssertionError, match="real Hub client"):
        huggingface_hub.HfApi().create_commit("me/x", operations=[], commit_message="x")
