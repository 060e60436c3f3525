"""`ttt-eval` (modeling_ttt.evaluation): the subcommands on tiny saved folders (TTT, Llama, Mamba2) with a tiny
BPE tokenizer, the exactness of the scoring paths, the evaluate metrics loaded offline, and bad input."""

import csv
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling_ttt.data import iter_documents, split_documents, stdlib_files, train_bpe_tokenizer
from modeling_ttt.evaluation import cli, metric_path
from modeling_ttt.evaluation import common, passkey
from modeling_ttt.evaluation.passkey import score_passkey_answer
from modeling_ttt.evaluation.scoring import ONE_PASS, SLIDING_WINDOW, STREAM, document_token_nll, scoring_plan

from conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VOCAB = 300
LLAMA_POSITIONS = 64


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files()[:12]]
    return train_bpe_tokenizer(texts, vocab_size=VOCAB, show_progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """Saved model folders with the tokenizer: a tiny TTT model (PyTorch ops, so nothing is compiled), a tiny
    Llama with 64 positions (longer documents need its sliding window) and a tiny Mamba2."""
    from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM

    root = tmp_path_factory.mktemp("models")
    models = {"ttt": tiny_model(vocab_size=VOCAB, ttt_impl="torch")}
    torch.manual_seed(0)
    models["llama"] = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=LLAMA_POSITIONS))
    models["mamba2"] = Mamba2ForCausalLM(Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16, expand=2, n_groups=1,
        state_size=8, chunk_size=32))
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """Five short documents (slices of standard-library files) of ~50 to ~300 tokens."""
    folder = tmp_path_factory.mktemp("data")
    files = stdlib_files()[20:25]
    for index, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        (folder / f"doc{index}.txt").write_text(text[: 60 + 100 * index] or "x = 1\n" * 50)
    return folder


def run_cli(argv, capsys=None):
    status = cli.main([str(arg) for arg in argv])
    if capsys is not None:
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return status


def one_pass_nll(model, ids):
    """Per-token NLLs of one forward over the whole document (the reference every path must match)."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[1:], reduction="none")


# ------------------------------------------------------------------------------------------------- exactness


def test_streamed_perplexity_equals_one_pass(folders, tokenizer, data_folder):
    model, _ = common.load_model_and_tokenizer(folders["ttt"])
    ids = torch.tensor(common.encode(tokenizer, (data_folder / "doc2.txt").read_text()))
    assert len(ids) > 100
    streamed, method = document_token_nll(model, ids, scoring_plan(model, chunk_size=36))
    assert method == STREAM
    reference = one_pass_nll(model, ids)
    assert streamed.shape == reference.shape
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert math.isclose(math.exp(streamed.double().mean()), math.exp(loss.item()), rel_tol=1e-5)
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-5)


def test_sliding_window_equals_one_pass_when_the_window_covers_the_document(folders, tokenizer, data_folder):
    model, _ = common.load_model_and_tokenizer(folders["llama"])
    ids = torch.tensor(common.encode(tokenizer, (data_folder / "doc0.txt").read_text()))[:LLAMA_POSITIONS]
    reference = one_pass_nll(model, ids)
    covering, method = document_token_nll(model, ids, scoring_plan(model))
    assert method == ONE_PASS
    torch.testing.assert_close(covering, reference)
    # a sliding window as long as the document, any stride: one window, the one-pass scores
    window, method = document_token_nll(model, ids, scoring_plan(model, window=len(ids), stride=7))
    torch.testing.assert_close(window, reference)

    # longer than the window: every token scored once; the first window's scores are the one-pass ones
    long_ids = torch.tensor(common.encode(tokenizer, (data_folder / "doc4.txt").read_text()))
    assert len(long_ids) > 2 * LLAMA_POSITIONS
    slid, method = document_token_nll(model, long_ids, scoring_plan(model, stride=16))
    assert method == SLIDING_WINDOW and slid.shape == (len(long_ids) - 1,)
    assert torch.isfinite(slid).all() and (slid > 0).all()
    torch.testing.assert_close(slid[: LLAMA_POSITIONS - 1], one_pass_nll(model, long_ids[:LLAMA_POSITIONS]))


def test_the_metrics_load_offline_and_match_the_direct_code(folders, tokenizer, data_folder):
    import evaluate

    model, _ = common.load_model_and_tokenizer(folders["ttt"])
    ids = torch.tensor(common.encode(tokenizer, (data_folder / "doc3.txt").read_text()))
    edges = [1, 2, 4, 8, 16, 32, 64, 128]
    score = model.stream(ids, chunk_size=32, position_buckets=edges, progress=False)

    perplexity = evaluate.load(metric_path("ttt_perplexity"))
    result = perplexity.compute(token_nll=[score.token_nll[0].tolist()])
    assert result["num_tokens"] == score.num_tokens
    assert math.isclose(result["mean_nll"], score.mean_nll, rel_tol=1e-12)
    assert math.isclose(result["perplexity"], score.perplexity, rel_tol=1e-12)
    assert result["documents"][0]["num_tokens"] == score.num_tokens

    # from logits and labels (the transformers convention: labels = input ids, -100 not scored)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    from_logits = evaluate.load(metric_path("ttt_perplexity"), "logits").compute(
        logits=[logits.tolist()], labels=[ids.tolist()])
    assert from_logits["num_tokens"] == len(ids) - 1
    assert math.isclose(from_logits["mean_nll"], loss, rel_tol=1e-5)

    position = evaluate.load(metric_path("position_loss"))
    binned = position.compute(token_nll=[score.token_nll[0].tolist()], bin_edges=edges)
    assert binned["bin_start"] == score.bucket_edges[:-1] and binned["tokens"] == score.bucket_count
    for ours, direct in zip(binned["mean_loss"], score.bucket_mean_nll):
        assert math.isclose(ours, direct, rel_tol=1e-9)
    # the default bins are powers of two up to the longest position
    default = position.compute(token_nll=[[1.0] * 20, [2.0] * 5])
    assert default["bin_start"] == [1, 2, 4, 8, 16] and default["bin_end"][-1] == 21
    assert default["tokens"] == [2, 4, 6, 8, 5] and default["mean_loss"][0] == 1.5
    with pytest.raises(ValueError, match="metric"):
        metric_path("perplexity")


# ------------------------------------------------------------------------------------------------ subcommands


def test_perplexity_for_every_kind_of_model(folders, tokenizer, data_folder, tmp_path, capsys):
    lengths = None
    for name in ("ttt", "llama", "mamba2"):
        output, table = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        status, out, _ = run_cli(["perplexity", "--model", folders[name], "--data", data_folder, "--output", output,
                                  "--csv", table, "--chunk-size", 64, "--no-progress"], capsys)
        assert status == 0 and json.loads(out)["num_documents"] == 5
        results = json.loads(output.read_text())
        corpus = results["corpus"]
        assert corpus["num_tokens"] == sum(d["num_tokens"] for d in results["documents"])
        assert all(d["num_tokens"] == d["length"] - 1 for d in results["documents"])
        assert 0 < corpus["mean_nll"] < 2 * math.log(VOCAB) and math.isfinite(corpus["perplexity"])
        lengths = lengths or [d["length"] for d in results["documents"]]
        assert [d["length"] for d in results["documents"]] == lengths  # one tokenizer: the same documents
        with table.open() as file:
            rows = list(csv.DictReader(file))
        assert len(rows) == 5 and set(rows[0]) == {"name", "length", "num_tokens", "total_nll", "mean_nll",
                                                   "perplexity", "method"}
        methods = set(results["methods"])
        assert methods == {"ttt": {STREAM}, "llama": {ONE_PASS, SLIDING_WINDOW}, "mamba2": {ONE_PASS}}[name]
        if name == "ttt":
            # streamed in chunks, the corpus perplexity is the token-weighted one-pass value of the same documents
            model, _ = common.load_model_and_tokenizer(folders["ttt"])
            total, count = 0.0, 0
            for document in sorted(data_folder.iterdir()):
                ids = common.encode(tokenizer, document.read_text(), add_eos=True)  # as ttt-train: text, EOS
                nll = one_pass_nll(model, torch.tensor(ids)).double()
                total, count = total + nll.sum().item(), count + len(nll)
            assert corpus["num_tokens"] == count
            assert math.isclose(corpus["perplexity"], math.exp(total / count), rel_tol=1e-5)


def test_the_default_corpus_and_the_recorded_validation_split(folders, tmp_path, capsys):
    status, out, _ = run_cli(["perplexity", "--model", folders["ttt"], "--max-documents", 2,
                              "--max-tokens-per-document", 64, "--no-progress"], capsys)
    summary = json.loads(out)
    assert status == 0 and summary["num_documents"] == 2 and summary["num_tokens"] == 2 * 63

    # a run folder of ttt-train (its newest checkpoint's trainer_state.json) selects the documents it held out
    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        (data / f"doc{i}.txt").write_text(f"text of document {i} " * 5)
    run = tmp_path / "run"
    for step, seed in ((5, 1), (20, 5)):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"step": step, "run": {"validation_fraction": 0.3, "seed": seed, "seq_len": 128, "data": [str(data)]}}))
    assert common.read_training_args(run)["seed"] == 5 and common.read_training_args(run / "checkpoint-5")["seed"] == 1
    args = Namespace(data=[str(data)], text_field="text", split="train", streaming=False, split_fraction=None,
                     seed=None, max_documents=None, min_tokens=2, max_tokens_per_document=None, bos=False,
                     no_eos=False)
    selection = common.DocumentSelection.from_args(args, run)
    assert (selection.validation_fraction, selection.seed) == (0.3, 5) and "training run" in selection.split_from
    model_tokenizer = common.load_model_and_tokenizer(folders["ttt"])[1]
    chosen = [d.name for d in common.tokenized_documents(selection, model_tokenizer)]
    _, validation = split_documents(iter_documents([str(data)]), 0.3, seed=5)
    assert chosen == [d.name for d in validation] and 0 < len(chosen) < 40
    # other documents than the run trained on, or --split-fraction 0: every document
    other = Namespace(**{**vars(args), "data": [str(data / "doc1.txt"), str(data / "doc2.txt")]})
    assert common.DocumentSelection.from_args(other, run).validation_fraction == 0
    args.split_fraction = 0.0
    assert len(common.tokenized_documents(common.DocumentSelection.from_args(args, run), model_tokenizer)) == 40
    # documents are tokenized as ttt-train does: the text, then the end-of-document token
    document = common.tokenized_documents(common.DocumentSelection.from_args(args, run), model_tokenizer)[0]
    assert document.input_ids[-1] == model_tokenizer.eos_token_id != document.input_ids[0]


def test_position_loss_for_several_models(folders, data_folder, tmp_path):
    import matplotlib.image

    output = tmp_path / "out" / "position_loss.csv"
    assert run_cli(["position-loss", "--model", folders["ttt"], "--label", "TTT", "--model", folders["llama"],
                    "--label", "Llama", "--model", folders["mamba2"], "--label", "Mamba2", "--data", data_folder,
                    "--min-tokens", 100, "--max-documents", 2, "--output", output, "--no-progress"]) == 0
    with output.open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["model", "bin_start", "bin_end", "tokens", "mean_loss"]
    assert {row["model"] for row in rows} == {"TTT", "Llama", "Mamba2"}
    for label in ("TTT", "Llama", "Mamba2"):
        bins = [row for row in rows if row["model"] == label]
        assert [int(row["bin_start"]) for row in bins][:4] == [1, 2, 4, 8]
        assert all(int(row["tokens"]) > 0 and 0 < float(row["mean_loss"]) < 20 for row in bins)
        assert int(bins[-1]["bin_end"]) > LLAMA_POSITIONS  # past the Llama's positions
    image = matplotlib.image.imread(output.with_suffix(".png"))
    assert image.ndim == 3 and image.shape[0] > 100
    summary = json.loads(output.with_suffix(".json").read_text())
    models = {model["label"]: model for model in summary["models"]}
    assert models["Llama"]["training_length"] == LLAMA_POSITIONS and "sliding window" in models["Llama"]["note"]
    assert models["Mamba2"]["training_length"] is None and models["TTT"]["note"] == ""

    # --bins N: at most N log-spaced bins, the same for every model
    output = tmp_path / "binned.csv"
    assert run_cli(["position-loss", "--model", folders["ttt"], "--model", folders["llama"], "--data", data_folder,
                    "--min-tokens", 100, "--max-documents", 2, "--bins", 5, "--output", output, "--no-progress"]) == 0
    with output.open() as file:
        rows = list(csv.DictReader(file))
    starts = {name: [row["bin_start"] for row in rows if row["model"] == name] for name in ("ttt", "llama")}
    assert starts["ttt"] == starts["llama"] and 2 <= len(starts["ttt"]) <= 5


def test_passkey_answers_are_scored_by_their_first_integer():
    assert score_passkey_answer(" 68241. The", 68241) is True
    assert score_passkey_answer("68241", 68241) is True
    assert score_passkey_answer(" 68242. The", 68241) is False
    assert score_passkey_answer(" 682410", 68241) is False
    assert score_passkey_answer(" 12 then 68241", 68241) is False
    assert score_passkey_answer(" the key", 68241) is False
    assert score_passkey_answer("", 68241) is False


def test_passkey_prompt(tokenizer):
    ids = passkey.passkey_prompt(tokenizer, 12345, 600, 0.5)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) <= 600 and len(ids) > 600 - 80  # short of the length by less than one filler passage
    assert passkey.passkey_prompt(tokenizer, 12345, 600, 0.5, add_bos=True)[0] == tokenizer.bos_token_id
    assert text.startswith(passkey.INTRO) and text.endswith(passkey.QUESTION)
    assert "The pass key is 12345. Remember it. 12345 is the pass key." in text
    before, after = text.split("The pass key is 12345.")
    assert abs(before.count("The grass is green.") - after.count("The grass is green.")) <= 1
    assert passkey.passkey_keys(0, 600, 0.5, 3) == passkey.passkey_keys(0, 600, 0.5, 3)
    assert all(10_000 <= key <= 99_999 for key in passkey.passkey_keys(1, 600, 0.5, 20))


def test_passkey_on_a_tiny_model(folders, tmp_path, monkeypatch):
    import matplotlib.image

    output = tmp_path / "passkey.json"
    argv = ["passkey", "--model", folders["ttt"], "--lengths", "300,450", "--depths", "0,1", "--trials", 1,
            "--max-new-tokens", 3, "--output", output, "--no-progress"]
    assert run_cli(argv) == 0
    results = json.loads(output.read_text())
    assert len(results["cells"]) == 4 and len(results["trials"]) == 4
    assert all(0 <= cell["accuracy"] <= 1 and cell["prompt_tokens"] <= cell["length"] for cell in results["cells"])
    with output.with_suffix(".csv").open() as file:
        assert list(next(csv.DictReader(file))) == list(passkey.CELL_COLUMNS)
    assert matplotlib.image.imread(output.with_suffix(".png")).ndim == 3

    # a model that always finds the key (planted through the decoding step): accuracy 1 in every cell
    def planted(model, tokenizer, prompt, max_new_tokens):
        key = tokenizer.decode(prompt).split("The pass key is ")[1][:5]
        return f" {key}. The"

    monkeypatch.setattr(passkey, "answer", planted)
    assert run_cli(argv) == 0
    results = json.loads(output.read_text())
    assert results["accuracy"] == 1.0

    # the likelihood scores: every trial has a decoy other than its key, positive NLLs, and gain = decoy − key;
    # the cells and the run hold the means of their trials
    for trial in results["trials"]:
        assert trial["decoy"] != trial["key"] and 10_000 <= trial["decoy"] <= 99_999
        assert trial["key_nll"] > 0 and trial["decoy_nll"] > 0
        assert trial["retrieval_gain"] == pytest.approx(trial["decoy_nll"] - trial["key_nll"])
    for cell in results["cells"]:
        cell_trials = [t for t in results["trials"] if (t["length"], t["depth"]) == (cell["length"], cell["depth"])]
        for field in ("key_nll", "decoy_nll", "retrieval_gain"):
            assert cell[field] == pytest.approx(sum(t[field] for t in cell_trials) / len(cell_trials))
    assert results["retrieval_gain"] == pytest.approx(
        sum(t["retrieval_gain"] for t in results["trials"]) / len(results["trials"]))


@pytest.mark.parametrize("name", ["ttt", "llama"])
def test_passkey_likelihood_is_the_log_probability_of_the_answer(folders, tokenizer, name):
    """`continuation_nll` is −log p(" {key}" | prompt) from one plain forward over prompt + answer, whichever way
    the model reads the text (the TTT model streams it in chunks; the Llama reads it in its sliding window when it
    is longer than its positions, which changes the numbers, so its case here fits in one pass)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders[name]).eval()
    # the Llama's prompt fits its 64 positions with the answer (one pass); the TTT model's is a real passkey prompt
    prompt = passkey.passkey_prompt(tokenizer, 12345, 300, 0.5) if name == "ttt" else \
        common.encode(tokenizer, passkey.QUESTION)
    answer = passkey.answer_ids(tokenizer, 12345)
    assert tokenizer.decode(answer) == " 12345"
    plan = scoring_plan(model, chunk_size=64)  # several chunks for the TTT model
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0].double()
    expected = -sum(float(F.log_softmax(logits[len(prompt) + i - 1], -1)[token]) for i, token in enumerate(answer))
    assert passkey.continuation_nll(model, plan, prompt, answer) == pytest.approx(expected, rel=1e-4)
    # the decoys of a cell are deterministic and never its keys
    keys = passkey.passkey_keys(0, 600, 0.5, 50)
    decoys = passkey.decoy_keys(0, 600, 0.5, keys)
    assert decoys == passkey.decoy_keys(0, 600, 0.5, keys) and all(d != k for d, k in zip(decoys, keys))


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(folders, data_folder, tmp_path, capsys):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((folders["llama"] / "config.json").read_text())
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"\0")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text("not json\n")
    output = tmp_path / "out.json"
    cases = {
        "does not exist": ["perplexity", "--model", tmp_path / "missing"],
        "is a file": ["perplexity", "--model", a_file],
        "no config.json": ["perplexity", "--model", not_a_model],
        "no usable tokenizer": ["perplexity", "--model", no_tokenizer],
        "does not exist (not a file": ["perplexity", "--model", folders["ttt"], "--data", tmp_path / "nope.txt"],
        "not a JSON object per line": ["perplexity", "--model", folders["ttt"], "--data", bad_jsonl],
        "split-fraction must be in": ["perplexity", "--model", folders["ttt"], "--split-fraction", 1.5],
        "at least 100000 tokens": ["perplexity", "--model", folders["ttt"], "--data", data_folder, "--min-tokens",
                                   100000],
        "--window 999 is longer": ["perplexity", "--model", folders["llama"], "--data", data_folder, "--window", 999],
        "shorter than the passkey prompt": ["passkey", "--model", folders["ttt"], "--lengths", 20],
        "--label for 2 --model": ["position-loss", "--model", folders["ttt"], "--model", folders["llama"],
                                  "--label", "one"],
    }
    for expected, argv in cases.items():
        status, out, err = run_cli([*argv, "--output", output, "--no-progress"], capsys)
        assert status == 2, (expected, err)
        assert err.startswith("ttt-eval: error:") and expected in err, (expected, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not output.exists() and not output.with_suffix(".png").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporaries left behind


def test_a_missing_subcommand_module_is_named(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "speed", "modeling_ttt.evaluation.not_installed_here")
    status, _, err = run_cli(["speed", "--model", "x"], capsys)
    assert status == 2 and "'speed' subcommand is not available" in err and "not_installed_here" in err


def test_the_console_script(folders, data_folder, tmp_path):
    script = Path(sys.executable).with_name("ttt-eval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "modeling_ttt.evaluation"]
    output = tmp_path / "ppl.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([*command, "perplexity", "--model", str(folders["llama"]), "--data", str(data_folder),
                           "--max-documents", "2", "--output", str(output), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(output.read_text())["num_documents"] == 2 and json.loads(done.stdout)["num_documents"] == 2


@pytest.mark.skipif(os.environ.get("TTT_EVAL_MULTIPROCESS") != "1",
                    reason="two processes (~30 s of start-up); set TTT_EVAL_MULTIPROCESS=1 to run")
def test_two_processes_give_the_one_process_results(folders, data_folder, tmp_path):
    """`accelerate launch` on the CPU (gloo): the documents are shared out and the results equal one process's."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert run_cli(["perplexity", "--model", folders["ttt"], "--data", data_folder, "--output", one,
                    "--no-progress"]) == 0
    done = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "modeling_ttt.evaluation",
                           "perplexity", "--model", str(folders["ttt"]), "--data", str(data_folder), "--output",
                           str(two), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert two["settings"]["num_processes"] == 2
    assert two["documents"] == one["documents"] and two["corpus"] == one["corpus"]
