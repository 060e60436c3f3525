"""The Triton kernels against the PyTorch reference (itself checked against the primal form in test_ops.py):
outputs, final state and gradients w.r.t. every input, for both layer types, with partial last mini-batches,
rows starting mid-mini-batch (nonzero pending sums), right padding and recomputed backward segments; then a
whole tiny model (logits, loss gradients, greedy generation); and the `ttt_impl` dispatch.

Without a CUDA device the kernels run on the CPU under Triton's interpreter, which must be on before `triton` is
first imported — and importing `modeling_ttt` (conftest.py does) already imports it through torch/transformers,
so setting the variable here would be too late. Run `TRITON_INTERPRET=1 python -m pytest tests` (as CI does);
without it these kernel tests are skipped on a CPU-only machine. Shapes are small: the interpreter is slow.
"""

import os

import pytest
import torch
from test_ops import map_tensors

from modeling_ttt import TTTConfig
from modeling_ttt.ops import InnerLoopParams, InnerState, get_ttt_ops, resolve_ttt_impl, triton_available
from modeling_ttt.ops import torch_chunk

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _kernels_usable() -> str | None:
    """None when the Triton kernels can run here, else the reason to skip."""
    if not triton_available():
        return "triton is not installed"
    if DEVICE == "cpu" and not INTERPRET:
        return "no CUDA device: run pytest with TRITON_INTERPRET=1 to test the kernels on Triton's CPU interpreter"
    from modeling_ttt.ops.triton.interface import interpreter_mismatch

    return interpreter_mismatch()


SKIP_REASON = _kernels_usable()
requires_kernels = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))

REFERENCE = {"linear": torch_chunk.ttt_linear, "mlp": torch_chunk.ttt_mlp}


def make_case(layer_type, batch=2, heads=2, seq_len=19, head_dim=16, mini_batch_size=8, seen=(0, 0),
              num_tokens=None, seed=0, dtype=torch.float32):
    """Inputs of one ops call and a nonzero initial state (pending sums only for rows mid-mini-batch)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(DEVICE)

    inputs = dict(
        xq=randn(batch, heads, seq_len, head_dim), xk=randn(batch, heads, seq_len, head_dim),
        xv=randn(batch, heads, seq_len, head_dim),
        inner_lr=(torch.rand(batch, heads, seq_len, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE),
        params=InnerLoopParams(
            token_scale=(torch.rand(mini_batch_size, generator=gen, dtype=torch.float64) + 0.1).to(dtype).to(DEVICE),
            ln_weight=1.0 + randn(heads, head_dim, std=0.3), ln_bias=randn(heads, head_dim, std=0.3),
        ),
    )
    if layer_type == "linear":
        shapes = [(head_dim, head_dim), (1, head_dim)]
    else:
        shapes = [(head_dim, 4 * head_dim), (1, 4 * head_dim), (4 * head_dim, head_dim), (1, head_dim)]
    seen = torch.tensor(seen, device=DEVICE)
    mid = (seen % mini_batch_size > 0).view(batch, 1, 1, 1)
    weights = tuple(randn(batch, heads, *s, std=0.3) for s in shapes)
    grads = tuple(randn(batch, heads, *s, std=0.05) * mid for s in shapes)
    if num_tokens is not None:
        num_tokens = torch.tensor(num_tokens, device=DEVICE)
        real = torch.arange(seq_len, device=DEVICE).view(1, 1, -1) < num_tokens.view(-1, 1, 1)
        inputs["inner_lr"] = inputs["inner_lr"] * real  # padded tokens have a zero learning rate
    return inputs, InnerState(weights, grads, seen), num_tokens


def run_with_grads(fn, inputs, state, num_tokens, checkpoint_group, seed=1):
    """Outputs, final state and the gradients of a random linear function of both w.r.t. every input (the
    bundle's tensors by their field names)."""
    views = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if k != "params"}
    params = inputs["params"]
    bundle = {name: getattr(params, name).detach().clone().requires_grad_(True)
              for name in ("token_scale", "ln_weight", "ln_bias")}
    leaves = {**views, **bundle}
    weights = [w.detach().clone().requires_grad_(True) for w in state.weights]
    grads = [g.detach().clone().requires_grad_(True) for g in state.grads]
    out, new_state = fn(**views, params=InnerLoopParams(**bundle, checkpoint_group=checkpoint_group),
                        state=InnerState(tuple(weights), tuple(grads), state.seen.clone()), num_tokens=num_tokens)
    gen = torch.Generator().manual_seed(seed)
    results = (out, *new_state.weights, *new_state.grads)
    probes = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r) for r in results]
    loss = sum((r.double() * p.double()).sum() for r, p in zip(results, probes))
    names = [*leaves, *(f"state.weights[{i}]" for i in range(len(weights))),
             *(f"state.grads[{i}]" for i in range(len(grads)))]
    gradients = torch.autograd.grad(loss, [*leaves.values(), *weights, *grads], allow_unused=True)
    return [r.detach() for r in results], new_state.seen, dict(zip(names, gradients))


def assert_close_scaled(actual, expected, tol, name):
    """|actual − expected| ≤ tol · max(1, max|expected|): gradients here reach magnitudes of a few hundred."""
    scale = max(1.0, expected.abs().max().item())
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol * scale, f"{name}: max error {error:.3g} > {tol} × {scale:.3g}"


CASES = {
    # name: (seq_len, head_dim, mini_batch_size, seen, num_tokens, checkpoint_group)
    "fresh-partial-last": (19, 16, 8, (0, 0), None, 0),
    "mid-minibatch-padded": (19, 16, 8, (3, 0), (19, 11), 0),
    "recompute-segments": (40, 16, 8, (6, 13), (33, 40), 3),
    "odd-sizes": (23, 12, 6, (2, 5), (23, 4), 2),
}


@requires_kernels
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_chunk_kernels_match_reference(layer_type, case):
    seq_len, head_dim, mini_batch_size, seen, num_tokens, group = CASES[case]
    inputs, state, num_tokens = make_case(layer_type, seq_len=seq_len, head_dim=head_dim,
                                          mini_batch_size=mini_batch_size, seen=seen, num_tokens=num_tokens)
    triton_fn = get_ttt_ops("triton", layer_type, DEVICE)
    expected, expected_seen, expected_grads = run_with_grads(REFERENCE[layer_type], inputs, state, num_tokens, group)
    actual, actual_seen, actual_grads = run_with_grads(triton_fn, inputs, state, num_tokens, group)
    assert torch.equal(actual_seen, expected_seen)
    names = ["out", *(f"new_state[{i}]" for i in range(len(actual) - 1))]
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close_scaled(a, e, 1e-4, name)
    for name, e in expected_grads.items():
        a = actual_grads[name]
        if e is None:  # the reference does not read G when no row starts mid-mini-batch; neither do the kernels
            assert a is None or not a.any(), name
            continue
        assert a is not None, f"no gradient for {name}"
        assert_close_scaled(a, e, 1e-4, f"d/d {name}")


@requires_kernels
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_any_split_equals_one_reference_call(layer_type):
    """Prefill in pieces (including single tokens, i.e. decoding) carries the state exactly."""
    inputs, state, _ = make_case(layer_type, seq_len=21, seen=(0, 5))
    expected, expected_state = REFERENCE[layer_type](**inputs, state=state)
    triton_fn = get_ttt_ops("triton", layer_type, DEVICE)
    pieces, start = [], 0
    for size in (6, 1, 1, 13):
        chunk = {k: (v[:, :, start : start + size] if k in ("xq", "xk", "xv", "inner_lr") else v)
                 for k, v in inputs.items()}
        out, state = triton_fn(**chunk, state=state)
        pieces.append(out)
        start += size
    assert_close_scaled(torch.cat(pieces, dim=2), expected, 1e-4, "out")
    for a, e in zip((*state.weights, *state.grads), (*expected_state.weights, *expected_state.grads)):
        assert_close_scaled(a, e, 1e-4, "state")
    assert torch.equal(state.seen, expected_state.seen)


@requires_kernels
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_decode_kernel_steps_match_reference(layer_type):
    """Token-by-token decoding (the primal-form kernel) across a mini-batch end, one row padded at some steps
    (`num_tokens` 0: its state must not move); and a single token with gradients (the chunk kernels)."""
    inputs, state, _ = make_case(layer_type, seq_len=6, seen=(5, 2))
    triton_fn = get_ttt_ops("triton", layer_type, DEVICE)
    expected_state = state
    for t in range(6):
        token = {k: (v[:, :, t : t + 1] if k in ("xq", "xk", "xv", "inner_lr") else v) for k, v in inputs.items()}
        num_tokens = torch.tensor([1, 0 if t in (1, 2) else 1], device=DEVICE)
        token["inner_lr"] = token["inner_lr"] * num_tokens.view(-1, 1, 1)
        out, state = triton_fn(**token, state=state, num_tokens=num_tokens)
        expected, expected_state = REFERENCE[layer_type](**token, state=expected_state, num_tokens=num_tokens)
        assert_close_scaled(out, expected, 1e-4, f"out at step {t}")
        for a, e in zip((*state.weights, *state.grads), (*expected_state.weights, *expected_state.grads)):
            assert_close_scaled(a, e, 1e-4, f"state at step {t}")
        assert torch.equal(state.seen, expected_state.seen)
    assert state.seen.tolist() == [11, 6]

    token = {k: (v[:, :, :1] if k in ("xq", "xk", "xv", "inner_lr") else v) for k, v in inputs.items()}
    actual = run_with_grads(triton_fn, token, state, None, 0)
    expected = run_with_grads(REFERENCE[layer_type], token, state, None, 0)
    for a, e in zip(actual[0], expected[0]):
        assert_close_scaled(a, e, 1e-4, "single-token output")
    for name, e in expected[2].items():
        if e is not None:
            assert_close_scaled(actual[2][name], e, 1e-4, f"single-token d/d {name}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_non_finite_values_at_padding_change_nothing(layer_type, impl):
    """Every backend zeroes padded slots before they enter a product: NaN/inf there leave the outputs, the state
    and the gradients of the real tokens as they are with zeros."""
    if impl == "triton" and SKIP_REASON is not None:
        pytest.skip(str(SKIP_REASON))
    inputs, state, num_tokens = make_case(layer_type, seen=(3, 0), num_tokens=(14, 9))
    real = (torch.arange(19, device=DEVICE).view(1, 1, -1, 1) < num_tokens.view(-1, 1, 1, 1))
    fn = get_ttt_ops(impl, layer_type, DEVICE)
    clean = run_with_grads(fn, inputs, state, num_tokens, 0)
    for poison in (float("nan"), float("inf")):
        poisoned = {k: (v.masked_fill(~real, poison) if k in ("xq", "xk", "xv") else v) for k, v in inputs.items()}
        result = run_with_grads(fn, poisoned, state, num_tokens, 0)
        for a, e in zip(result[0], clean[0]):
            assert torch.isfinite(a).all() and torch.equal(a, e)
        for name, e in clean[2].items():
            if e is not None:
                assert torch.isfinite(result[2][name]).all() and torch.equal(result[2][name], e), name


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    """16-bit inputs: the kernel computes in fp32, so it is as close to the fp32 reference on the same (rounded)
    inputs as the 16-bit output rounding allows; the state comes out in float32, as the reference keeps it."""
    inputs, state, num_tokens = make_case("linear", seen=(3, 0), num_tokens=(19, 11), dtype=dtype)
    out, new_state = get_ttt_ops("triton", "linear", DEVICE)(**inputs, state=state, num_tokens=num_tokens)
    assert out.dtype == dtype and new_state.weights[0].dtype == torch.float32
    ref_out, ref_state = torch_chunk.ttt_linear(**inputs, state=state, num_tokens=num_tokens)  # 16-bit in, too
    assert ref_out.dtype == dtype and ref_state.weights[0].dtype == torch.float32
    upcast = map_tensors(lambda t: t.float(), inputs)
    state32 = InnerState(tuple(w.float() for w in state.weights), tuple(g.float() for g in state.grads), state.seen)
    expected, expected_state = torch_chunk.ttt_linear(**upcast, state=state32, num_tokens=num_tokens)
    assert_close_scaled(out.float(), expected, 1e-2, "out")
    assert_close_scaled(new_state.weights[0].float(), expected_state.weights[0], 1e-2, "W")


# -- the whole model ---------------------------------------------------------------------------------------------


@requires_kernels
def test_tiny_model_triton_equals_torch(variant, monkeypatch):
    """Same logits, loss gradients and greedy generation (left-padded batch) with ttt_impl="triton" as "torch"."""
    from conftest import tiny_model

    from modeling_ttt.ops.triton import interface

    monkeypatch.delenv("TTT_IMPL", raising=False)
    calls = []
    chunk = interface._chunk
    monkeypatch.setattr(interface, "_chunk", lambda *args: calls.append(args[0]) or chunk(*args))
    model = tiny_model(*variant).to(DEVICE)
    input_ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    results = {}
    for impl in ("torch", "triton"):
        model.config.ttt_impl = impl
        model.zero_grad()
        output = model(input_ids, labels=input_ids)
        output.loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results[impl] = (output.logits.detach(), output.loss.detach(), grads)
    logits, loss, grads = results["triton"]
    torch.testing.assert_close(logits, results["torch"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, results["torch"][1], atol=1e-5, rtol=1e-5)
    assert grads.keys() == results["torch"][2].keys()
    for name, grad in grads.items():
        assert_close_scaled(grad, results["torch"][2][name], 1e-4, name)

    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding: rows sit at different positions of their mini-batch
    generated = {}
    with torch.no_grad():
        for impl in ("torch", "triton"):
            model.config.ttt_impl = impl
            generated[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                                             do_sample=False, pad_token_id=0)
    assert torch.equal(generated["triton"], generated["torch"])
    assert calls and set(calls) == {variant[0]}  # the kernels did run


# -- dispatch -----------------------------------------------------------------------------------------------------


def test_default_impl_is_auto():
    assert TTTConfig().ttt_impl == "auto"


def test_auto_on_cpu_uses_the_cpp_decoding_kernel_when_it_builds(monkeypatch):
    monkeypatch.delenv("TTT_IMPL", raising=False)
    assert get_ttt_ops("torch", "linear", "cpu") is torch_chunk.ttt_linear
    assert get_ttt_ops("auto", "mlp", "cpu") is torch_chunk.ttt_mlp  # TTT-MLP decodes with the reference
    monkeypatch.setattr("modeling_ttt.ops._cpp_kernel_ready", lambda warn: True)
    assert resolve_ttt_impl("auto", "cpu") == "cpp"
    with pytest.raises(RuntimeError, match="ttt_impl='cpp' is a CPU kernel"):
        resolve_ttt_impl("cpp", "cuda")
    monkeypatch.setattr("modeling_ttt.ops._cpp_kernel_ready", lambda warn: False)  # e.g. no C++ compiler
    assert resolve_ttt_impl("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="could not be built"):
        resolve_ttt_impl("cpp", "cpu")


def test_env_var_overrides_the_config(monkeypatch):
    monkeypatch.setenv("TTT_IMPL", "torch")
    assert resolve_ttt_impl("triton", "cpu") == "torch"
    monkeypatch.setenv("TTT_IMPL", "cuda")
    with pytest.raises(ValueError, match="TTT_IMPL"):
        resolve_ttt_impl("auto", "cpu")


def test_triton_without_a_usable_backend_is_an_error(monkeypatch):
    monkeypatch.delenv("TTT_IMPL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if triton_available():
        with pytest.raises(RuntimeError, match="CUDA device"):
            get_ttt_ops("triton", "linear", "cpu")
    monkeypatch.setattr("modeling_ttt.ops.triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton"):
        get_ttt_ops("triton", "linear", "cuda")
    assert resolve_ttt_impl("auto", "cuda") == "torch"


@requires_kernels
def test_head_sizes_beyond_the_kernels(monkeypatch):
    """"auto" keeps the reference for heads the kernels do not take; an explicit "triton" says so."""
    from modeling_ttt.ops import triton as triton_ops

    monkeypatch.delenv("TTT_IMPL", raising=False)
    too_big = triton_ops.MAX_HEAD_DIM["mlp"] + 2
    monkeypatch.setattr("modeling_ttt.ops.resolve_ttt_impl", lambda impl, device: "triton")  # as on a GPU
    assert get_ttt_ops("auto", "mlp", DEVICE, head_dim=too_big) is torch_chunk.ttt_mlp
    assert get_ttt_ops("auto", "mlp", DEVICE, head_dim=64) is triton_ops.ttt_mlp
    inputs, state, _ = make_case("mlp", batch=1, heads=1, seq_len=2, head_dim=too_big, seen=(0,))
    with pytest.raises(NotImplementedError, match="head_dim <= 64"):
        get_ttt_ops("triton", "mlp", DEVICE, head_dim=too_big)(**inputs, state=state)


def test_model_with_triton_on_cpu_raises_without_interpreter(monkeypatch):
    from conftest import tiny_model

    monkeypatch.delenv("TTT_IMPL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr("modeling_ttt.ops.triton_available", lambda: True)
    model = tiny_model("linear", "transformer", ttt_impl="triton")
    with pytest.raises(RuntimeError, match="ttt_impl='triton'"):
        model(torch.randint(0, 97, (1, 5)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_kernel_benchmark_exits_cleanly_without_gpu(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "eval" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
