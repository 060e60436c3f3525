"""lm_eval runs on a saved TTT folder through its own modeling code (`trust_remote_code=True`), with the tiny task
pack in `eval/tasks/`: a multiple-choice (loglikelihood) task and a `generate_until` task.

The CLI runs in a fresh interpreter in which `modeling_ttt` cannot be imported (a meta-path finder refuses it, the
working directory is outside the repository and PYTHONPATH is unset), offline, with every cache in tmp dirs."""

import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
tokenizers = pytest.importorskip("tokenizers")

from transformers import PreTrainedTokenizerFast  # noqa: E402

from conftest import BLOCK_MODELING_TTT, tiny_model  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parents[1] / "eval" / "tasks"
TASKS = ["ttt_tiny_loglikelihood", "ttt_tiny_generate"]
MAX_GEN_TOKS = 8  # ttt_tiny_generate.yaml

# Runs lm_eval's CLI (the `lm_eval` console script's function) with `modeling_ttt` blocked, then records which
# modules named like ours were loaded and which module the model class came from.
CLI_SCRIPT = textwrap.dedent("""
    import json, sys

    {block_modeling_ttt}
    probe, sys.argv = sys.argv[1], ["lm_eval", *sys.argv[2:]]
    from lm_eval.__main__ import cli_evaluate
    from transformers import PreTrainedModel

    classes = []
    original = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        result = original(cls, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # (model, loading_info) when asked for it
        classes.append(type(model).__module__ + "." + type(model).__qualname__)
        return result

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        cli_evaluate()
    finally:
        loaded = sorted(name for name in sys.modules if name == "modeling_ttt" or name.startswith("modeling_ttt."))
        with open(probe, "w") as f:
            json.dump({"loaded": loaded, "classes": classes}, f)
""").replace("{block_modeling_ttt}", BLOCK_MODELING_TTT)


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (one token per byte) plus <eos>/<pad>: nothing from the Hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<eos>": len(vocab), "<pad>": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    folder = tmp / "model"
    tokenizer = _byte_level_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out, probe, work = tmp / "out", tmp / "probe.json", tmp / "cwd"
    work.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp / "hf"), HF_DATASETS_CACHE=str(tmp / "datasets"),
               HF_MODULES_CACHE=str(tmp / "modules"), TTT_IMPL="", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    args = ["--model", "hf", "--model_args", f"pretrained={folder},dtype=float32,trust_remote_code=True",
            "--tasks", ",".join(TASKS), "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "1",
            "--output_path", str(out), "--log_samples"]
    result = subprocess.run([sys.executable, "-c", CLI_SCRIPT, str(probe), *args], env=env, cwd=work,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    samples = {task: [json.loads(line) for path in glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"),
                                                              recursive=True) for line in open(path)]
               for task in TASKS}
    return dict(folder=folder, model=model, tokenizer=tokenizer, probe=json.loads(probe.read_text()),
                results=json.loads(Path(results_file).read_text()), samples=samples)


def test_uses_the_folders_own_code(lm_eval_run):
    probe = lm_eval_run["probe"]
    assert probe["loaded"] == []
    assert probe["classes"], "lm_eval loaded no model through from_pretrained"
    assert all(name.startswith("transformers_modules.") and name.endswith(".TTTForCausalLM")
               for name in probe["classes"]), probe["classes"]


def test_results_have_both_tasks_with_metrics_in_range(lm_eval_run):
    results = lm_eval_run["results"]["results"]
    acc = results["ttt_tiny_loglikelihood"]["acc,none"]
    em = results["ttt_tiny_generate"]["exact_match,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert isinstance(em, float) and 0.0 <= em <= 1.0
    with open(TASKS_DIR / "ttt_tiny_choice.jsonl") as f:
        n_choice = sum(1 for line in f if line.strip())
    assert len(lm_eval_run["samples"]["ttt_tiny_loglikelihood"]) == n_choice
    assert lm_eval_run["results"]["config"]["model_args"]["trust_remote_code"] is True


def test_loglikelihoods_match_the_package(lm_eval_run):
    """Each choice's loglikelihood lm_eval logged is the package model's sum of log-probs of the choice's tokens."""
    model, tokenizer = lm_eval_run["model"], lm_eval_run["tokenizer"]
    for sample in lm_eval_run["samples"]["ttt_tiny_loglikelihood"]:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            context, continuation = tokenizer.encode(doc["query"]), tokenizer.encode(" " + choice)
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = model(ids).logits.log_softmax(-1)[0, len(context) - 1:-1]
            expected = logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-4)


def test_generate_until_outputs_are_the_packages_greedy_generations(lm_eval_run):
    model, tokenizer = lm_eval_run["model"], lm_eval_run["tokenizer"]
    samples = lm_eval_run["samples"]["ttt_tiny_generate"]
    with open(TASKS_DIR / "ttt_tiny_generate.jsonl") as f:
        assert len(samples) == sum(1 for line in f if line.strip())
    outputs = []
    for sample in samples:
        (output,) = sample["filtered_resps"]
        assert isinstance(output, str)
        ids = torch.tensor([tokenizer.encode(sample["doc"]["prompt"])])
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN_TOKS,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert output == expected
        outputs.append(output)
    assert any(outputs), "every generation was empty"
    em = lm_eval_run["results"]["results"]["ttt_tiny_generate"]["exact_match,none"]
    assert em == pytest.approx(sum(o == s["target"] for o, s in zip(outputs, samples)) / len(samples))
