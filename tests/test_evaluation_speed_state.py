"""`ttt-eval speed` and `ttt-eval state` on tiny models (CPU, a few tokens): the outputs, their rows, the inner-loop
probe's agreement with the cache, and one-line errors with exit status 2 for bad input."""

import argparse
import csv
import json
import math

import pytest
import torch

from conftest import tiny_model
from modeling_ttt.evaluation.cli import main
from modeling_ttt.evaluation import speed
from modeling_ttt.evaluation.speed import tensor_bytes
from modeling_ttt.evaluation.state import InnerLoopProbe, record_indices, stream_state_statistics
from modeling_ttt.train import baseline_config, count_parameters

VOCAB = 300  # the smallest byte-level BPE vocabulary with a few merges (256 bytes + 3 special tokens + merges)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny TTT-Linear and TTT-MLP folder with a BPE tokenizer, a tiny Llama folder and a small text corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_ttt.data import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("speed_state")
    docs = root / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(f"def add_{i}(x, y):\n    return x + y * {i}  # adds things\n" * 30)
    tokenizer = train_bpe_tokenizer([p.read_text() for p in sorted(docs.iterdir())], vocab_size=VOCAB,
                                    show_progress=False)
    paths = {"docs": str(docs)}
    for layer_type in ("linear", "mlp"):
        model = tiny_model(layer_type, "mamba", vocab_size=VOCAB, max_position_embeddings=32, ttt_impl="torch")
        paths[layer_type] = str(root / f"ttt-{layer_type}")
        model.save_pretrained(paths[layer_type])
        tokenizer.save_pretrained(paths[layer_type])
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4))
    paths["llama"] = str(root / "llama")
    llama.save_pretrained(paths["llama"])
    return paths


# -- speed -------------------------------------------------------------------------------------------------------


def test_speed_rows_files_and_cache_sizes(folders, tmp_path):
    output = tmp_path / "out" / "speed.json"
    status = main(["speed", "--model", folders["linear"], "--label", "ttt", "--model", folders["llama"], "--label",
                   "llama-folder", "--baseline", "mamba2", "--ttt-impl", "torch", "--lengths", "16,32", "--repeats",
                   "1", "--decode-tokens", "2", "--warmup", "1", "--output", str(output), "--no-progress"])
    assert status == 0
    for suffix in (".json", ".csv", ".png"):
        assert output.with_suffix(suffix).stat().st_size > 0
    results = json.loads(output.read_text())
    rows = results["results"]
    got = {(r["label"], r["ttt_impl"], r["length"]) for r in rows}
    assert got == {(label, impl, length) for label, impl in (("ttt", "torch"), ("llama-folder", ""), ("mamba2", ""))
                   for length in (16, 32)}
    assert len(rows) == 6
    for row in rows:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_peak_mib", "decode_peak_mib",
                    "cache_mib", "params"):
            assert row[key] > 0 and math.isfinite(row[key]), (key, row)
    assert results["memory_method"] and all(r["memory_method"] == results["memory_method"] for r in rows)
    with open(output.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == 6
    cache = {(r["label"], r["length"]): r["cache_mib"] for r in rows}
    assert cache["ttt", 16] == cache["ttt", 32]  # the TTT state has a fixed size
    assert cache["llama-folder", 32] > cache["llama-folder", 16]  # a KV cache grows with the context
    # the Mamba2 baseline is sized to the TTT model
    mamba = next(m for m in results["models"] if m["label"] == "mamba2")
    ttt = next(m for m in results["models"] if m["label"] == "ttt")
    assert abs(mamba["params"] - ttt["params"]) / ttt["params"] <= 0.1


@pytest.mark.parametrize("impl", ["triton", "nonsense"])
def test_speed_backend_that_cannot_run_here_is_an_error(folders, tmp_path, capsys, monkeypatch, impl):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the interpreter runs Triton kernels on the CPU)
    output = tmp_path / "speed.json"
    status = main(["speed", "--model", folders["linear"], "--ttt-impl", impl, "--lengths", "16", "--output",
                   str(output), "--no-progress", "--device", "cpu"])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and impl in error
    assert not list(tmp_path.iterdir())  # nothing written


def test_speed_bad_inputs(folders, tmp_path, capsys):
    assert main(["speed", "--output", str(tmp_path / "s.json")]) == 2  # nothing to measure
    assert main(["speed", "--baseline", "llama", "--output", str(tmp_path / "s.json")]) == 2  # no TTT to match
    assert main(["speed", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "s.json")]) == 2
    assert main(["speed", "--model", folders["linear"], "--lengths", "0", "--output", str(tmp_path / "s.json")]) == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_speed_baselines_are_sized_as_ttt_train_sizes_them(arch):
    from modeling_ttt import TTTConfig

    ttt = TTTConfig.from_preset("125m-linear")
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    args = parser.parse_args(["--preset", "125m-linear", "--baseline", arch, "--lengths", "64,4096"])
    spec = speed.model_specs(args, torch.device("cpu"), torch.float32, ["torch"])[1]
    trained, target, params, _ = baseline_config(arch, ttt, seq_len=4096 + args.warmup + args.decode_tokens)
    assert spec.arch == arch and spec.config.to_dict() == trained.to_dict()
    assert count_parameters(spec.config) == params and abs(params - target) / target < 0.02
    if arch == "llama":  # room for the longest prefill and its decode steps
        assert spec.config.max_position_embeddings >= 4096 + args.warmup + args.decode_tokens


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 4)
    assert tensor_bytes({"a": a, "view": a[2:], "list": [a, torch.zeros(3, dtype=torch.float64)]}) == 160 + 24


# -- state -------------------------------------------------------------------------------------------------------


def test_state_files_and_finite_values(folders, tmp_path):
    output = tmp_path / "state.json"
    status = main(["state", "--model", folders["mlp"], "--data", folders["docs"], "--tokens", "96", "--chunk-size",
                   "40", "--points", "6", "--output", str(output), "--no-progress"])
    assert status == 0
    for suffix in (".json", ".csv", ".png"):
        assert output.with_suffix(suffix).stat().st_size > 0
    results = json.loads(output.read_text())
    assert results["tokens"] == 96 and results["chunk_size"] == 40 // 8 * 8
    assert len(results["layers"]) == 2
    positions = results["layers"][0]["positions"]
    assert positions[0] == 0 and positions[-1] == 88
    for layer in results["layers"]:
        for name in ("loss_init", "loss_prev", "loss_after", "norm_W1", "norm_W2", "change_W1", "change_W2"):
            values = [v for per_head in layer[name] for v in per_head]
            assert len(values) == len(positions) * 4 and all(v is not None and math.isfinite(v) for v in values)
    with open(output.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(positions)
    assert all(math.isfinite(float(row[key])) for row in rows for key in ("loss_after", "norm_W2", "change_W1"))


def test_state_default_length_is_eight_training_lengths(folders, tmp_path):
    # max_position_embeddings=32, no training_args.json: 8 x 32 tokens of random ids
    output = tmp_path / "state.json"
    assert main(["state", "--model", folders["linear"], "--random-tokens", "--output", str(output),
                 "--no-progress"]) == 0
    results = json.loads(output.read_text())
    assert results["tokens"] == 256 and results["training_length_source"] == "max_position_embeddings"


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_probe_follows_the_cache_and_starts_at_the_learned_weights(layer_type):
    model = tiny_model(layer_type, "mamba", ttt_impl="torch")
    input_ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    metrics, probe, cache = stream_state_statistics(model, input_ids, chunk_size=24)
    for layer_idx, values in metrics.items():
        assert values["loss_init"].shape == (64 // 8, 1, 4)
        # the probe's own mini-batch steps end where the layer's op left the cache
        for cached, probed in zip(cache.layers[layer_idx].inner_state.weights, probe.last_weights[layer_idx]):
            torch.testing.assert_close(probed, cached, rtol=1e-4, atol=1e-5)
        # the first mini-batch starts from the learned weights: previous = initial, norm = ‖W1₀‖, no change
        layer = model.model.layers[layer_idx].seq_modeling_block
        torch.testing.assert_close(values["loss_prev"][0], values["loss_init"][0], rtol=0, atol=0)
        torch.testing.assert_close(values["norm_W1"][0, 0], layer.W1.detach().flatten(1).norm(dim=-1))
        assert values["change_W1"][0].abs().max() == 0


def test_inner_step_reduces_the_inner_loss():
    # TTT-Linear, base lr 4: a small enough step that one gradient step on the mini-batch descends its own loss
    model = tiny_model("linear", "transformer", ttt_base_lr=4.0, ttt_impl="torch")
    input_ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    metrics, _, _ = stream_state_statistics(model, input_ids, chunk_size=32)
    for values in metrics.values():
        assert values["loss_after"].mean() < values["loss_prev"].mean()


def test_probe_changes_nothing_and_detaches():
    model = tiny_model("linear", "mamba", ttt_impl="torch")
    input_ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids).logits
        with InnerLoopProbe(model) as probe:
            probed = model(input_ids).logits
        assert len(probe.records[0]) == 1
        after = model(input_ids).logits
    torch.testing.assert_close(probed, expected, rtol=0, atol=0)
    assert len(probe.records[0]) == 1  # the hooks are gone after the block
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_record_indices():
    assert record_indices(10, 4, every=3) == [0, 3, 6, 9]
    log_spaced = record_indices(1000, 8, every=None)
    assert log_spaced[0] == 0 and log_spaced[-1] == 999 and len(log_spaced) <= 8


def test_state_bad_inputs(folders, tmp_path, capsys):
    output = str(tmp_path / "state.json")
    assert main(["state", "--model", folders["llama"], "--random-tokens", "--output", output]) == 2  # not TTT
    assert "TTT" in capsys.readouterr().err
    assert main(["state", "--model", folders["linear"], "--random-tokens", "--tokens", "5", "--output", output]) == 2
    assert main(["state", "--model", folders["linear"], "--data", folders["docs"], "--single-document", "--tokens",
                 "100000", "--output", output]) == 2
    assert main(["state", "--preset", "125m-linear", "--output", output]) == 2  # no tokenizer for the data
    assert main(["state", "--model", folders["linear"], "--preset", "125m-linear", "--output", output]) == 2
    assert not list(tmp_path.iterdir())
