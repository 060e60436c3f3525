"""TTT-Linear's training scan (`modeling_ttt/ops/linear_scan.py`: one autograd function, hand-written backward),
in its PyTorch loops and its C++ kernels (`ops/cpu/ttt_scan.cpp`), against autograd through the spec
(`ops/naive.py`): outputs, final state and the gradient w.r.t. every input, for fresh rows, rows mid-mini-batch
(pending sums G read at the first mini-batch), right padding (rows ending their last mini-batch early), scan
checkpointing, the generic head size and the kernels' specialised one (64); and in a model, that the kernels ran."""

import functools
import shutil

import pytest
import torch
from test_ops_naive import case
from test_triton import assert_close_scaled, make_case, run_with_grads

from modeling_ttt.ops import cpu, naive, torch_chunk

HAVE_TOOLS = shutil.which("ninja") is not None and cpu.known_build_error() is None
requires_kernels = pytest.mark.skipif(not HAVE_TOOLS, reason="needs a C++ compiler and ninja")

SCANS = {
    "loops": torch_chunk.ttt_linear,
    "kernels": functools.partial(torch_chunk.ttt_linear, scan_kernels=True),
}


def scan(name):
    if name == "kernels":
        if not HAVE_TOOLS:
            pytest.skip("needs a C++ compiler and ninja")
        assert cpu.build_error() is None
    return SCANS[name]


def assert_matches_spec(fn, inputs, state, num_tokens, group=0, tol=1e-10):
    values, seen, grads = run_with_grads(fn, inputs, state, num_tokens, group)
    spec_values, spec_seen, spec_grads = run_with_grads(naive.ttt_linear, inputs, state, num_tokens, 0)
    for a, e in zip(values, spec_values):
        torch.testing.assert_close(a, e, atol=tol, rtol=0)
    assert torch.equal(seen, spec_seen)
    for name, e in spec_grads.items():
        a = grads[name]
        if a is None:  # G is never read when every row starts on a mini-batch boundary (G = 0 there)
            assert name.startswith("state.grads") and not bool(state.seen.remainder(8).any()), name
            continue
        assert_close_scaled(a, e, tol, f"d/d {name}")


@pytest.mark.parametrize("name", ["fresh", "mid-mini-batch", "right-padding", "length-2M+3"])
@pytest.mark.parametrize("implementation", list(SCANS))
def test_scan_matches_spec_values_and_gradients(implementation, name):
    inputs, state, num_tokens = case("linear", name)  # float64, head size 16, M = 8, chunks over 2 mini-batches
    assert_matches_spec(scan(implementation), inputs, state, num_tokens)


@pytest.mark.parametrize("name", ["mid-mini-batch", "right-padding"])
@pytest.mark.parametrize("implementation", list(SCANS))
def test_scan_with_checkpointed_groups_matches_spec(implementation, name):
    """One mini-batch per group: the later groups start from a carried `G` (zero, or pending for padded rows)."""
    inputs, state, num_tokens = case("linear", name)
    assert_matches_spec(scan(implementation), inputs, state, num_tokens, group=1)


@pytest.mark.parametrize("implementation", list(SCANS))
def test_scan_at_head_size_64_float32_matches_spec(implementation):
    """The kernels' compile-time head size 64 (every preset's), float32 against the float64 spec, rows mid-mini-batch
    and padded, 4 mini-batches of 16."""
    inputs, state, num_tokens = make_case("linear", batch=2, heads=3, seq_len=61, head_dim=64, mini_batch_size=16,
                                          seen=(5, 0), num_tokens=(61, 40))
    values, _, grads = run_with_grads(scan(implementation), inputs, state, num_tokens, 0)
    as64 = lambda t: t.double()  # noqa: E731
    inputs64 = {k: (v if k == "params" else as64(v)) for k, v in inputs.items()}
    params = inputs["params"]
    inputs64["params"] = type(params)(*(as64(t) for t in params.tensors()))
    state64 = type(state)(tuple(map(as64, state.weights)), tuple(map(as64, state.grads)), state.seen)
    spec_values, _, spec_grads = run_with_grads(naive.ttt_linear, inputs64, state64, num_tokens, 0)
    for a, e in zip(values, spec_values):
        assert_close_scaled(a, e, 1e-4, "values")
    for name, e in spec_grads.items():
        assert_close_scaled(grads[name], e, 1e-4, f"d/d {name}")


@requires_kernels
def test_training_a_model_on_the_cpu_runs_the_kernels_with_the_same_loss_and_gradients():
    """`ttt_impl="auto"` on the CPU (the default) trains TTT-Linear through the C++ scan — both kernels show up in
    the profile — with the loss and every parameter's gradient of `ttt_impl="torch"`."""
    from conftest import tiny_model

    ids = torch.randint(1, 97, (2, 37), generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ("torch", "auto"):
        model = tiny_model("linear", "mamba", ttt_impl=impl).train()
        with torch.profiler.profile() as profile:
            loss = model(ids, labels=ids).loss
            loss.backward()
        names = {event.name for event in profile.events()}
        ran = {"forward": "modeling_ttt_cpu::ttt_linear_scan_forward" in names,
               "backward": "modeling_ttt_cpu::ttt_linear_scan_backward" in names}
        results[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ran)
    assert results["auto"][2] == {"forward": True, "backward": True}
    assert results["torch"][2] == {"forward": False, "backward": False}
    torch.testing.assert_close(results["auto"][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["torch"][1].items():
        assert_close_scaled(results["auto"][1][name], grad, 1e-4, name)


@requires_kernels
def test_the_kernels_name_bad_inputs():
    assert cpu.build_error() is None
    half = torch.zeros(1, 1, 2, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="ttt_linear_scan: float32 or float64 tensors only"):
        torch.ops.modeling_ttt_cpu.ttt_linear_scan_forward(
            torch.zeros(1, 3, 2, dtype=torch.float16), None, half, half, torch.zeros(1, 1, 2, 2, dtype=torch.float16),
            torch.zeros(1, 1, 2, 2, dtype=torch.float16), torch.zeros(1, 1, 2, dtype=torch.float16),
            torch.zeros(1, 2, dtype=torch.float16), torch.zeros(2, dtype=torch.float16), 1.0, None, False, 1e-6)
    x = torch.zeros(1, 1, 2, 3)
    with pytest.raises(RuntimeError, match="ttt_linear_scan: contiguous tensors only"):
        torch.ops.modeling_ttt_cpu.ttt_linear_scan_forward(
            torch.zeros(1, 3, 2), None, x, x, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2).transpose(2, 3),
            torch.zeros(1, 1, 2), torch.zeros(1, 2), torch.zeros(2), 1.0, None, False, 1e-6)
