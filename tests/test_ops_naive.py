"""The spec (`modeling_ttt/ops/naive.py`) against itself and every backend against the spec.

(a) the spec's primal form ≡ its dual form; (b) `torch_chunk.py`, the C++ decoding kernel and the Triton kernels ≡ the
spec; (c) `torch_chunk.ttt_sequential` (autograd inner gradients) ≡ the spec's primal form (analytic ones);
(d) gradients of the spec's dual form (autograd through it) ≡ the reference's, w.r.t. every input. Each over fresh
states, rows at different positions (mid-mini-batch, with pending sums G), right padding and chunk lengths
1, M−1, M and 2M+3. Triton runs under its CPU interpreter (`TRITON_INTERPRET=1`, see tests/test_triton.py).
"""

import pytest
import torch
from test_ops import map_tensors, ttt_sequential
from test_triton import SKIP_REASON, assert_close_scaled, make_case, run_with_grads

from modeling_ttt.ops import InnerState, cpu, naive, torch_chunk

NAIVE = {"linear": naive.ttt_linear, "mlp": naive.ttt_mlp}
REFERENCE = {"linear": torch_chunk.ttt_linear, "mlp": torch_chunk.ttt_mlp}
M = 8  # mini-batch size of every case (make_case's default)

CASES = {
    # name: (seen per row, num_tokens per row or None, chunk length)
    "fresh": ((0, 0), None, 2 * M + 3),
    "mid-mini-batch": ((3, 13), None, 2 * M + 3),
    "right-padding": ((5, 0), (2 * M + 3, 7), 2 * M + 3),
    "empty-row": ((7, 2), (0, 12), 12),
    "length-1": ((3, 7), None, 1),
    "length-M-1": ((3, 0), None, M - 1),
    "length-M": ((3, 0), None, M),
    "length-2M+3": ((6, 1), None, 2 * M + 3),
}
UNPADDED = [name for name, (_, num_tokens, _) in CASES.items() if num_tokens is None]


def case(layer_type, name, dtype=torch.float64, device="cpu"):
    seen, num_tokens, seq_len = CASES[name]
    inputs, state, num_tokens = make_case(layer_type, seq_len=seq_len, seen=seen, num_tokens=num_tokens, dtype=dtype)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    state = InnerState(tuple(map(move, state.weights)), tuple(map(move, state.grads)), move(state.seen))
    return map_tensors(move, inputs), state, move(num_tokens)


def tensors(out, state):
    return [out, *state.weights, *state.grads]


def assert_results_close(actual, expected, atol):
    (out, state), (expected_out, expected_state) = actual, expected
    assert out.dtype == expected_out.dtype and out.shape == expected_out.shape
    for a, e in zip(tensors(out, state), tensors(expected_out, expected_state)):
        torch.testing.assert_close(a, e, atol=atol, rtol=0)
    assert torch.equal(state.seen.cpu(), expected_state.seen.cpu())


def take(inputs, start, stop):
    return {k: (v[:, :, start:stop] if k in ("xq", "xk", "xv", "inner_lr") else v) for k, v in inputs.items()}


# -- (a) the spec's two forms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_spec_primal_form_equals_dual_form(layer_type, name):
    inputs, state, num_tokens = case(layer_type, name)
    dual = NAIVE[layer_type](**inputs, state=state, num_tokens=num_tokens, form="dual")
    primal = NAIVE[layer_type](**inputs, state=state, num_tokens=num_tokens, form="primal")
    assert_results_close(dual, primal, atol=1e-10)
    if num_tokens is not None:  # padded slots output zeros
        real = torch.arange(inputs["xq"].shape[2]).view(1, 1, -1) < num_tokens.view(-1, 1, 1)
        assert not dual[0].masked_select(~real.unsqueeze(-1)).any()


@pytest.mark.parametrize("form", ["dual", "primal", "reference"])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_non_finite_padding_changes_nothing(layer_type, form):
    """NaN/inf in padded slots (views and learning rates) change no output, state or gradient of either form of
    the spec (nor of the reference)."""
    inputs, state, num_tokens = case(layer_type, "right-padding")
    real = torch.arange(inputs["xq"].shape[2]).view(1, 1, -1) < num_tokens.view(-1, 1, 1)
    run = REFERENCE[layer_type] if form == "reference" else lambda **kw: NAIVE[layer_type](**kw, form=form)
    clean = run_with_grads(run, inputs, state, num_tokens, 0)
    for poison in (float("nan"), float("inf")):
        poisoned = dict(inputs, inner_lr=inputs["inner_lr"].masked_fill(~real, poison))
        poisoned.update({k: inputs[k].masked_fill(~real.unsqueeze(-1), poison) for k in ("xq", "xk", "xv")})
        result = run_with_grads(run, poisoned, state, num_tokens, 0)
        for a, e in zip(result[0], clean[0]):
            assert torch.isfinite(a).all() and torch.equal(a, e)
        for name, e in clean[2].items():
            if e is not None:
                assert torch.isfinite(result[2][name]).all() and torch.equal(result[2][name], e), name


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_spec_precision_rule(layer_type):
    """16-bit inputs: float32 arithmetic and state (state.py's "Precision"), outputs in the input dtype, and
    autocast changes nothing."""
    inputs, state, num_tokens = case(layer_type, "right-padding", dtype=torch.bfloat16)
    out, new_state = NAIVE[layer_type](**inputs, state=state, num_tokens=num_tokens)
    assert out.dtype == torch.bfloat16 and all(w.dtype == torch.float32 for w in tensors(out, new_state)[1:])
    upcast = map_tensors(lambda t: t.float(), inputs)
    state32 = InnerState(tuple(w.float() for w in state.weights), tuple(g.float() for g in state.grads), state.seen)
    expected_out, expected_state = NAIVE[layer_type](**upcast, state=state32, num_tokens=num_tokens)
    assert torch.equal(out, expected_out.to(torch.bfloat16))
    for a, e in zip(tensors(out, new_state)[1:], tensors(expected_out, expected_state)[1:]):
        assert torch.equal(a, e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(NAIVE[layer_type](**inputs, state=state, num_tokens=num_tokens)[0], out)
    with pytest.raises(ValueError, match="form"):
        NAIVE[layer_type](**inputs, state=state, form="chunked")
    with pytest.raises(ValueError, match="weights"):
        NAIVE["mlp" if layer_type == "linear" else "linear"](**inputs, state=state)


# -- (b) every backend against the spec ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_reference_matches_spec(layer_type, name):
    inputs, state, num_tokens = case(layer_type, name)
    expected = NAIVE[layer_type](**inputs, state=state, num_tokens=num_tokens)
    assert_results_close(REFERENCE[layer_type](**inputs, state=state, num_tokens=num_tokens), expected, atol=1e-10)


def test_cpu_decoding_kernel_matches_spec():
    """The C++ kernel (TTT-Linear one-token steps without autograd; TTT-MLP has none) across mini-batch ends
    reached by the two rows on different steps: every step and the final state, float64."""
    error = cpu.build_error()  # builds the kernel on the first call (~20 s), cached afterwards
    if error is not None:
        pytest.skip(f"the C++ kernel does not build here: {error}")
    inputs, state, _ = case("linear", "mid-mini-batch")
    expected_out, expected_state = naive.ttt_linear(**take(inputs, 0, 12), state=state)
    outputs = []
    with torch.no_grad():
        for t in range(12):
            step = take(inputs, t, t + 1)
            assert cpu.decodes(step["xq"], None)  # the kernel runs, not the reference
            out, state = cpu.ttt_linear(**step, state=state)
            outputs.append(out)
    assert_results_close((torch.cat(outputs, dim=2), state), (expected_out, expected_state), atol=1e-10)


requires_kernels = pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
TRITON_CASES = ["fresh", "right-padding", "empty-row", "length-M-1"]


def _triton(layer_type):
    from modeling_ttt.ops import triton as triton_ops  # needs triton; imported only when the kernels can run

    return {"linear": triton_ops.ttt_linear, "mlp": triton_ops.ttt_mlp}[layer_type]


def in_float64(inputs, state):
    """The same (float32) values in float64, for the spec."""
    up = lambda t: t.double()  # noqa: E731
    return map_tensors(up, inputs), InnerState(tuple(map(up, state.weights)), tuple(map(up, state.grads)),
                                               state.seen)


def _spec_in_float64(layer_type, inputs, state, num_tokens):
    inputs64, state64 = in_float64(inputs, state)
    return NAIVE[layer_type](**inputs64, state=state64, num_tokens=num_tokens)


@requires_kernels
@pytest.mark.parametrize("name", TRITON_CASES)
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_triton_chunk_kernels_match_spec(layer_type, name):
    """Values and final state of the chunk kernels (float32, 3×TF32 dots on a GPU) against the spec in float64."""
    from test_triton import DEVICE

    inputs, state, num_tokens = case(layer_type, name, dtype=torch.float32, device=DEVICE)
    out, new_state = _triton(layer_type)(**inputs, state=state, num_tokens=num_tokens)
    expected_out, expected_state = _spec_in_float64(layer_type, inputs, state, num_tokens)
    assert out.dtype == torch.float32 and torch.equal(new_state.seen, expected_state.seen)
    for i, (a, e) in enumerate(zip(tensors(out, new_state), tensors(expected_out, expected_state))):
        assert_close_scaled(a, e, 1e-4, f"result {i}")


@requires_kernels
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_triton_kernel_gradients_match_spec(layer_type):
    """Gradients w.r.t. every input through the chunk kernels' backward against autograd through the spec."""
    from test_triton import DEVICE

    inputs, state, num_tokens = case(layer_type, "right-padding", dtype=torch.float32, device=DEVICE)
    _, _, actual = run_with_grads(_triton(layer_type), inputs, state, num_tokens, 0)
    _, _, expected = run_with_grads(NAIVE[layer_type], *in_float64(inputs, state), num_tokens, 0)
    for name, e in expected.items():
        assert_close_scaled(actual[name], e, 1e-4, f"d/d {name}")


@requires_kernels
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_triton_decode_kernels_match_spec(layer_type):
    """One token per call without autograd (the primal-form decode kernels), rows at positions 5 and 2, the
    second row padded (`num_tokens` 0) on two steps: each step against the spec, float32 against float64."""
    from test_triton import DEVICE

    inputs, state, _ = case(layer_type, "length-2M+3", dtype=torch.float32, device=DEVICE)
    state = InnerState(state.weights, state.grads, torch.tensor([5, 2], device=DEVICE))
    expected_state = state
    with torch.no_grad():
        for t in range(6):
            step = take(inputs, t, t + 1)
            num_tokens = torch.tensor([1, 0 if t in (1, 2) else 1], device=DEVICE)
            out, state = _triton(layer_type)(**step, state=state, num_tokens=num_tokens)
            expected_out, expected_state = _spec_in_float64(layer_type, step, expected_state, num_tokens)
            expected_state = InnerState(tuple(w.float() for w in expected_state.weights),
                                        tuple(g.float() for g in expected_state.grads), expected_state.seen)
            for i, (a, e) in enumerate(zip(tensors(out, state), tensors(expected_out, expected_state))):
                assert_close_scaled(a, e, 1e-4, f"result {i} at step {t}")
    assert state.seen.tolist() == [11, 6]


# -- (c) the reference's autograd primal form against the spec's analytic one -------------------------------------


@pytest.mark.parametrize("name", UNPADDED)
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_sequential_reference_equals_spec_primal_form(layer_type, name):
    inputs, state, _ = case(layer_type, name)
    expected = NAIVE[layer_type](**inputs, state=state, form="primal")
    assert_results_close(ttt_sequential(layer_type, **inputs, state=state), expected, atol=1e-10)


# -- (d) gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_reference_gradients_match_spec(layer_type, name):
    """d(random linear function of outputs and final state) w.r.t. every input, state included, float64."""
    inputs, state, num_tokens = case(layer_type, name)
    spec_values, _, spec_grads = run_with_grads(NAIVE[layer_type], inputs, state, num_tokens, 0)
    ref_values, _, ref_grads = run_with_grads(REFERENCE[layer_type], inputs, state, num_tokens, 0)
    for a, e in zip(ref_values, spec_values):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0)
    for input_name, e in spec_grads.items():
        a = ref_grads[input_name]
        if a is None:  # the reference never reads G when every row starts on a mini-batch boundary (G = 0 there)
            assert input_name.startswith("state.grads") and not bool(state.seen.remainder(M).any()), input_name
            continue
        assert_close_scaled(a, e, 1e-10, f"d/d {input_name}")
