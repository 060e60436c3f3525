"""ttt-train (modeling_ttt.train): packing layout, the split, real tiny runs (in this process and as subprocesses),
exact resume after SIGKILL, 2-process DDP against 1 process, Llama / Mamba2 baselines, bad input."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from modeling_ttt import train as train_cli
from modeling_ttt.data import Document, TokenStream, packed_row, row_batch, split_documents, tokenize_documents

#: Small standard-library modules: always present, real code, a few hundred to a few thousand tokens each.
CORPUS_FILES = ("bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py", "shlex.py", "sched.py",
                "queue.py", "copy.py", "heapq.py", "textwrap.py", "json/encoder.py", "json/decoder.py",
                "json/scanner.py", "json/__init__.py", "this.py")
#: Runs use packed rows (the TTT state resets at each document start) unless a test asks for plain rows.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
)


def numpy_stream(pieces):
    """A TokenStream of documents given as token lists (each already ending with its end-of-document token)."""
    import numpy as np

    tokens = np.concatenate([np.asarray(piece, dtype=np.int32) for piece in pieces])
    starts = np.concatenate([np.eye(1, len(piece), dtype=bool)[0] for piece in pieces])
    return TokenStream(tokens, starts, len(pieces))


# ----------------------------------------------------------------------------------------------------------------
# Data layout
# ----------------------------------------------------------------------------------------------------------------


def test_packed_rows_restart_positions_at_documents_and_rows_and_mask_crossing_targets():
    # documents of 5, 7 and 6 tokens (ids 10.., 20.., 30..), rows of 8 tokens
    stream = numpy_stream([list(range(10, 15)), list(range(20, 27)), list(range(30, 36))])
    rows = [packed_row(stream, index, 8) for index in range(2)]
    assert rows[0]["input_ids"].tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[0]["labels"].tolist() == [-100, 11, 12, 13, 14, -100, 21, 22]
    # the second document continues in row 1 as a new sequence (positions from 0 at the row start)
    assert rows[1]["input_ids"].tolist() == [23, 24, 25, 26, 30, 31, 32, 33]
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert rows[1]["labels"].tolist() == [-100, 24, 25, 26, -100, 31, 32, 33]
    # the incomplete tail (2 tokens) is dropped
    with pytest.raises(IndexError):
        packed_row(stream, 2, 8)
    plain = packed_row(stream, 0, 8, packing=False)
    assert plain["position_ids"].tolist() == list(range(8)) and plain["labels"].tolist() == plain["input_ids"].tolist()
    batch = row_batch(stream, [1, 0], 8)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["position_ids"][1].tolist() == rows[0]["position_ids"].tolist()


def test_tokenize_documents_puts_eos_after_each_document():
    from modeling_ttt.data import train_bpe_tokenizer

    documents = [Document("a", "def f(x):\n    return x\n"), Document("b", "import os\n")]
    tokenizer = train_bpe_tokenizer([d.text for d in documents], vocab_size=300, show_progress=False)
    stream = tokenize_documents(documents, tokenizer)
    eos = tokenizer.eos_token_id
    first = tokenizer(documents[0].text, add_special_tokens=False)["input_ids"]
    assert stream.tokens.tolist()[:len(first) + 1] == first + [eos] and stream.tokens[-1] == eos
    assert stream.starts.nonzero()[0].tolist() == [0, len(first) + 1] and stream.num_documents == 2


def test_split_is_deterministic_by_document_and_independent_of_order():
    documents = [Document(f"doc{i}.py", f"x = {i}\n") for i in range(200)]
    train, validation = split_documents(documents, 0.2, seed=0)
    again = split_documents(list(reversed(documents)), 0.2, seed=0)
    assert sorted(d.name for d in again[1]) == sorted(d.name for d in validation)
    assert 20 <= len(validation) <= 60 and len(train) + len(validation) == 200
    assert {d.name for d in split_documents(documents, 0.2, seed=1)[1]} != {d.name for d in validation}


def test_batch_order_two_processes_read_the_rows_of_one():
    one = train_cli.BatchOrder(rows=50, global_batch=8, batch_size=8, rank=0, seed=3)
    two = [train_cli.BatchOrder(rows=50, global_batch=8, batch_size=4, rank=rank, seed=3) for rank in (0, 1)]
    for micro in range(14):  # crosses an epoch (6 batches per epoch)
        assert one.indices(micro) == two[0].indices(micro) + two[1].indices(micro)
    assert sorted(one.indices(0) + one.indices(1) + one.indices(2)) != list(range(24))  # shuffled


def test_schedules_follow_the_official_recipe():
    lr, min_lr = 3e-3, 1e-5
    values = [train_cli.lr_multiplier(step, 10, 100, lr, min_lr) * lr for step in range(100)]
    assert values[0] == pytest.approx(lr / 10) and values[9] == pytest.approx(lr)
    assert values[10] == pytest.approx(lr) and values[-1] == pytest.approx(min_lr, rel=0.1)
    assert train_cli.lr_multiplier(100, 10, 100, lr, min_lr) * lr == pytest.approx(min_lr)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert train_cli.ttt_base_lr_at(0, 10, 0.1) == pytest.approx(0.01)
    assert train_cli.ttt_base_lr_at(5, 10, 0.1) == pytest.approx(0.055)
    assert train_cli.ttt_base_lr_at(50, 10, 0.1) == pytest.approx(0.1)


def test_baseline_sizing_matches_the_ttt_parameter_count():
    config = tiny_config(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=2)
    for arch in ("llama", "mamba2"):
        _, target, params, _ = train_cli.baseline_config(arch, config, seq_len=32)
        assert abs(params - target) / target < 0.1, (arch, params, target)


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        shutil.copy(root / name, folder / name.replace("/", "_"))
    return folder


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    tiny_config(hidden_size=32, num_attention_heads=2).to_json_file(path)
    return path


def run_args(corpus, config, output_dir, *extra, packing=True):
    args = ["--config", str(config), "--data", str(corpus), "--vocab-size", "320", "--seq-len", "32",
            "--validation-fraction", "0.25", "--eval-tokens", "128", "--lr", "1e-2", "--warmup-steps", "2",
            "--seed", "0", "--output-dir", str(output_dir), *extra]
    return args if packing else args + ["--no-packing"]


def run_main(args):
    """`ttt-train` in this process. Accelerate keeps one state per process, so a Trainer or Accelerator made by an
    earlier test (another mixed precision, say) would be refused: start from a fresh state, as a new process does."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return train_cli.main(args)


def read_metrics(output_dir):
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    return lines, steps


def cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "modeling_ttt.train", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def reference(corpus, tiny_json, tmp_path_factory):
    """An uninterrupted 8-step run with batch 4 (in this process): every step's loss, for the other runs."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run_main(run_args(corpus, tiny_json, output_dir, "--batch-size", "4", "--max-steps", "8",
                                   "--save-every", "3", "--eval-every", "4")) == 0
    return output_dir


def test_tiny_run_learns_and_logs_every_step(reference):
    lines, steps = read_metrics(reference)
    assert lines[0]["event"] == "start" and lines[0]["world_size"] == 1 and lines[0]["vocab_size"] == 320
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert [s["tokens"] for s in steps] == [4 * 32 * k for k in range(1, 9)]
    for record in steps:
        assert set(record) >= {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"}
        assert torch.isfinite(torch.tensor([record["loss"], record["grad_norm"]])).all()
    evals = {line["step"]: line for line in lines if "val_loss" in line}
    assert sorted(evals) == [0, 4, 8]
    assert evals[8]["val_loss"] < evals[0]["val_loss"] - 0.15  # the loss falls within 8 steps
    assert evals[0]["val_ppl"] == pytest.approx(2.718281828 ** evals[0]["val_loss"], rel=1e-6)
    assert sum(s["loss"] for s in steps[-2:]) < sum(s["loss"] for s in steps[:2])
    assert steps[0]["lr"] == pytest.approx(1e-2 / 2) and steps[1]["lr"] == pytest.approx(1e-2)
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]


def test_final_folder_loads_with_auto_classes(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(reference)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    assert type(model).__name__ == "TTTForCausalLM" and model.config.vocab_size == len(tokenizer) == 320
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert (reference / "README.md").read_text().count("ttt-train") >= 1
    assert json.loads((reference / "config.json").read_text())["auto_map"]  # remote code for the Hub
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_exact_resume_after_sigkill(reference, corpus, tiny_json, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(corpus, tiny_json, output_dir, "--batch-size", "4", "--max-steps", "8", "--save-every", "3",
                    "--eval-every", "4")
    process = cli(args + ["--debug-step-delay", "0.5"])
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (output_dir / "checkpoint-3").is_dir() and (output_dir / "metrics.jsonl").exists():
            if any(record["step"] >= 4 for record in read_metrics(output_dir)[1]):
                break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (output_dir / "checkpoint-8").exists()
    assert run_main(args + ["--resume"]) == 0
    lines, steps = read_metrics(output_dir)
    _, expected = read_metrics(reference)
    assert [s["step"] for s in steps] == list(range(1, 9))  # each step once
    assert [s["loss"] for s in steps] == [s["loss"] for s in expected]  # bitwise: fp32, same data, same state
    assert [s["grad_norm"] for s in steps] == pytest.approx([s["grad_norm"] for s in expected], rel=1e-6)
    assert [line["event"] for line in lines if "event" in line] == ["start", "resume"]
    assert [line for line in lines if line.get("event") == "resume"][0]["resumed_from"] == 3


def test_two_process_ddp_equals_one_process(reference, corpus, tiny_json, tmp_path):
    output_dir = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "modeling_ttt.train"]
    args = run_args(corpus, tiny_json, output_dir, "--batch-size", "2", "--max-steps", "8", "--save-every", "3",
                    "--eval-every", "4")
    result = subprocess.run(launch + args, env=dict(ENV, ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines, steps = read_metrics(output_dir)
    assert lines[0]["world_size"] == 2  # `accelerate launch --cpu` would silently start one process
    _, expected = read_metrics(reference)
    assert [s["tokens"] for s in steps] == [s["tokens"] for s in expected]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in expected], rel=1e-5, abs=1e-5)
    evals = [line["val_loss"] for line in lines if "val_loss" in line]
    assert evals == pytest.approx([line["val_loss"] for line in read_metrics(reference)[0] if "val_loss" in line],
                                  rel=1e-5)


def test_activation_checkpointing_gives_the_same_losses(reference, corpus, tiny_json, tmp_path):
    output_dir = tmp_path / "checkpointed"
    assert run_main(run_args(corpus, tiny_json, output_dir, "--batch-size", "4", "--max-steps", "3",
                                   "--eval-every", "0", "--activation-checkpointing",
                                   "--set", "scan_checkpoint_group_size=2")) == 0
    _, steps = read_metrics(output_dir)
    _, expected = read_metrics(reference)  # the same warm-up, so the first 3 steps match
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in expected[:3]], rel=1e-5)


def test_ttt_mlp_inner_lr_warms_up_and_the_saved_config_holds_the_target(corpus, tiny_json, tmp_path):
    output_dir = tmp_path / "mlp"
    assert run_main(run_args(corpus, tiny_json, output_dir, "--batch-size", "4", "--max-steps", "3",
                                   "--eval-every", "0", "--save-every", "1", "--report-to", "tensorboard",
                                   "--set", "ttt_layer_type=mlp", "--set", "ttt_base_lr=0.1", packing=False)) == 0
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))  # the Accelerate tracker wrote too
    _, steps = read_metrics(output_dir)
    assert [s["ttt_base_lr"] for s in steps] == pytest.approx([0.01, 0.055, 0.1])  # over the 2 warm-up steps
    for folder in (output_dir, output_dir / "checkpoint-1", output_dir / "checkpoint-2"):
        assert json.loads((folder / "config.json").read_text())["ttt_base_lr"] == 0.1


@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_baseline_runs_save_loadable_folders(arch, corpus, tiny_json, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = tmp_path / arch
    assert run_main(run_args(corpus, tiny_json, output_dir, "--arch", arch, "--batch-size", "4",
                                   "--max-steps", "3", "--eval-every", "0")) == 0
    out = capsys.readouterr().out
    assert f"{arch}: " in out and "parameters" in out
    lines, steps = read_metrics(output_dir)
    assert lines[0]["arch"] == arch and [s["step"] for s in steps] == [1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.config.model_type == arch and model.config.vocab_size == len(AutoTokenizer.from_pretrained(output_dir))


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------------------------


def bad_input_cases(corpus, tiny_json, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    other = tmp_path / "other.json"
    tiny_config(hidden_size=64, num_attention_heads=2).to_json_file(other)
    return {
        "missing data": (["--data", str(tmp_path / "nope")], "does not exist"),
        "empty data": (["--data", str(empty)], "No text"),
        "seq-len too long": (["--seq-len", "100000"], "fewer than one"),
        "unknown preset": (["--config", "125m-lineer"], "did you mean 125m-linear"),
        "unknown --set key": (["--set", "hiden_size=64"], "did you mean hidden_size"),
        "bad --set value": (["--set", "mini_batch_size=1.5"], "mini_batch_size must be"),
        "resume without checkpoint": (["--resume"], "no complete checkpoint"),
        **({} if importlib.util.find_spec("aim") else {
            "tracker not installed": (["--report-to", "aim"], "--report-to aim: not available here")}),
    }


def test_bad_inputs_are_one_line_errors_before_any_compute(corpus, tiny_json, tmp_path, capsys):
    for label, (extra, message) in bad_input_cases(corpus, tiny_json, tmp_path).items():
        output_dir = tmp_path / label.replace(" ", "_")
        args = run_args(corpus, tiny_json, output_dir, "--max-steps", "2")
        # later flags win in argparse
        assert run_main(args + extra) == 2, label
        err = capsys.readouterr().err.strip()
        assert err.startswith("ttt-train: error: ") and "\n" not in err and message in err, (label, err)
        assert not output_dir.exists(), label


def test_existing_run_and_other_config_are_refused(reference, corpus, tiny_json, tmp_path, capsys):
    other = tmp_path / "other.json"
    tiny_config(hidden_size=64, num_attention_heads=2).to_json_file(other)
    before = sorted(p.name for p in reference.iterdir())
    cases = [
        (run_args(corpus, tiny_json, reference, "--batch-size", "4", "--max-steps", "8"), "already holds a run"),
        (run_args(corpus, other, reference, "--batch-size", "4", "--max-steps", "8", "--resume"), "hidden_size"),
        (run_args(corpus, tiny_json, reference, "--batch-size", "2", "--max-steps", "8", "--resume"),
         "global_batch_size"),
    ]
    for args, message in cases:
        assert run_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert sorted(p.name for p in reference.iterdir()) == before


def test_bad_input_in_a_subprocess_exits_2_without_traceback(corpus, tiny_json, tmp_path):
    output_dir = tmp_path / "run"
    process = cli(run_args(corpus, tiny_json, output_dir, "--set", "ttt_layer_type=conv"))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("ttt-train: error: --set ttt_layer_type=conv")
    assert not output_dir.exists()
