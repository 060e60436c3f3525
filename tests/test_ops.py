"""The dual-form chunk ops against the token-by-token primal form (autograd gradients, Eq. 6/7 literally),
at any split, with nonzero initial states, rows at different positions and right padding."""

import dataclasses

import pytest
import torch

from modeling_ttt.ops import InnerLoopParams, InnerState, ttt_linear, ttt_mlp
from modeling_ttt.ops.torch_chunk import gelu_tanh, gelu_tanh_grad, layer_norm, layer_norm_l2_grad

OPS = {"linear": ttt_linear, "mlp": ttt_mlp}


def ttt_sequential(
    layer_type: str,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    params: InnerLoopParams,
    state: InnerState,
) -> tuple[torch.Tensor, InnerState]:
    """Primal form, one token at a time, literally as Eq. 6/7 reads (slow; a second spec for the tests).

    Materialises `W_i` for every token and takes gradients with autograd, so it shares no code with the dual
    form above beyond the LayerNorm forward."""
    batch, heads, seq_len, head_dim = xq.shape
    token_scale = params.token_scale
    mini_batch_size = token_scale.shape[0]
    ln_w, ln_b = params.ln_weight.view(1, heads, 1, head_dim), params.ln_bias.view(1, heads, 1, head_dim)
    weights = [w.clone() for w in state.weights]
    grads = [g.clone() for g in state.grads]
    seen = state.seen.clone()

    def inner_model(x, params):
        if layer_type == "linear":
            return x @ params[0] + params[1]
        return gelu_tanh(x @ params[0] + params[1]) @ params[2] + params[3]

    outputs = []
    for t in range(seq_len):
        position = seen % mini_batch_size  # [B]
        scale = token_scale[position].view(batch, 1, 1, 1)
        with torch.enable_grad():
            params = [w.detach().requires_grad_(True) for w in weights]
            z = inner_model(xk[:, :, t : t + 1], params)
            loss = 0.5 * (layer_norm(z, ln_w, ln_b) - (xv[:, :, t : t + 1] - xk[:, :, t : t + 1])).pow(2).sum()
            token_grads = torch.autograd.grad(loss, params)
        lr = inner_lr[:, :, t].view(batch, heads, 1, 1)
        grads = [g + lr * tg for g, tg in zip(grads, token_grads)]
        current = [w - scale * g for w, g in zip(weights, grads)]
        outputs.append(xq[:, :, t : t + 1] + layer_norm(inner_model(xq[:, :, t : t + 1], current), ln_w, ln_b))
        seen = seen + 1
        done = (seen % mini_batch_size == 0).view(batch, 1, 1, 1)
        weights = [torch.where(done, c, w) for c, w in zip(current, weights)]
        grads = [torch.where(done, torch.zeros_like(g), g) for g in grads]
    out = torch.cat(outputs, dim=2) if outputs else xq[:, :, :0]
    return out, InnerState(tuple(weights), tuple(grads), seen)



def make_problem(layer_type, batch=3, heads=2, seq_len=37, head_dim=8, mini_batch_size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    xq, xk, xv = randn(batch, heads, seq_len, head_dim), randn(batch, heads, seq_len, head_dim), randn(
        batch, heads, seq_len, head_dim)
    inner_lr = torch.rand(batch, heads, seq_len, generator=gen, dtype=torch.float64) * 0.5
    token_scale = torch.rand(mini_batch_size, generator=gen, dtype=torch.float64)
    ln_weight, ln_bias = randn(heads, head_dim), randn(heads, head_dim)
    if layer_type == "linear":
        shapes = [(head_dim, head_dim), (1, head_dim)]
    else:
        shapes = [(head_dim, 4 * head_dim), (1, 4 * head_dim), (4 * head_dim, head_dim), (1, head_dim)]
    weights = tuple(randn(heads, *s) * 0.3 for s in shapes)
    params = InnerLoopParams(token_scale, ln_weight, ln_bias)
    return dict(xq=xq, xk=xk, xv=xv, inner_lr=inner_lr, params=params), weights


def map_tensors(fn, inputs):
    """Op arguments (`xq, xk, xv, inner_lr, params`) with `fn` applied to every tensor, the bundle's included."""
    params = inputs["params"]
    params = dataclasses.replace(params, token_scale=fn(params.token_scale), ln_weight=fn(params.ln_weight),
                                 ln_bias=fn(params.ln_bias))
    return {k: (params if k == "params" else fn(v)) for k, v in inputs.items()}


def problem_tensors(problem):
    """Every tensor of a problem in the order the kernels take them: views, learning rates, the bundle's."""
    return [*(problem[k] for k in ("xq", "xk", "xv", "inner_lr")), *problem["params"].tensors()]


def sliced(problem, start, stop, rows=slice(None)):
    out = dict(problem)
    for key in ("xq", "xk", "xv", "inner_lr"):
        out[key] = problem[key][rows, :, start:stop]
    return out


def row_state(state, row):
    return InnerState(tuple(w[row : row + 1] for w in state.weights), tuple(g[row : row + 1] for g in state.grads),
                      state.seen[row : row + 1])


def assert_states_close(a, b, atol=1e-10):
    for x, y in zip((*a.weights, *a.grads), (*b.weights, *b.grads)):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert torch.equal(a.seen, b.seen)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_dual_form_equals_primal_form(layer_type):
    problem, weights = make_problem(layer_type)
    state = InnerState.initial(weights, 3)
    expected, expected_state = ttt_sequential(layer_type, **problem, state=state)
    out, new_state = OPS[layer_type](**problem, state=state)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert_states_close(new_state, expected_state)
    assert new_state.seen.tolist() == [37, 37, 37]


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("splits", [[1] * 20 + [17], [3, 5, 8, 1, 20], [15, 1, 1, 20], [8, 8, 21], [36, 1]])
def test_any_split_equals_one_call(layer_type, splits):
    problem, weights = make_problem(layer_type)
    state = InnerState.initial(weights, 3)
    whole, whole_state = OPS[layer_type](**problem, state=state)
    pieces, start = [], 0
    for size in splits:
        stop = min(start + size, 37)
        out, state = OPS[layer_type](**sliced(problem, start, stop), state=state)
        pieces.append(out)
        start = stop
    assert start == 37
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, atol=1e-10, rtol=0)
    assert_states_close(state, whole_state)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_rows_at_different_positions_with_right_padding(layer_type):
    """Each row continues from its own position; padded slots change nothing and output zeros."""
    problem, weights = make_problem(layer_type)
    state = InnerState.initial(weights, 3)
    first = torch.tensor([5, 11, 0])  # real tokens per row in the first chunk (chunk length 12)
    chunk = sliced(problem, 0, 12)
    real = torch.arange(12).view(1, 1, 12) < first.view(3, 1, 1)
    chunk["inner_lr"] = chunk["inner_lr"] * real
    out1, state1 = OPS[layer_type](**chunk, state=state, num_tokens=first)
    assert torch.all(out1[1:2, :, 11:] == 0) and torch.all(out1[0, :, 5:] == 0)
    out2, state2 = OPS[layer_type](**sliced(problem, 12, 32), state=state1)
    assert state2.seen.tolist() == [25, 31, 20]
    for row in range(3):
        n = int(first[row])
        ref1, ref_state1 = ttt_sequential(layer_type, **sliced(problem, 0, n, slice(row, row + 1)),
                                          state=row_state(state, row))
        torch.testing.assert_close(out1[row : row + 1, :, :n], ref1, atol=1e-10, rtol=0)
        assert_states_close(row_state(state1, row), ref_state1)
        ref2, ref_state2 = ttt_sequential(layer_type, **sliced(problem, 12, 32, slice(row, row + 1)),
                                          state=ref_state1)
        torch.testing.assert_close(out2[row : row + 1], ref2, atol=1e-10, rtol=0)
        assert_states_close(row_state(state2, row), ref_state2)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("first", [(5, 3, 0), (2, 2, 2)])
def test_decoding_rows_at_different_positions_values_and_gradients(layer_type, first):
    """One token per call (the decoding path) with rows at positions 5, 3 and 0 of their mini-batches, so that
    rows end their mini-batches on different calls (or all at position 2, ending them together): values and
    states equal the primal form row by row, and
    gradients (through the token scale, learning rates and initial weights) equal one dual-form call over the
    same tokens (the primal spec takes inner gradients with autograd on detached weights, so it has none)."""
    problem, weights = make_problem(layer_type, seq_len=24)
    weights = tuple(w.requires_grad_(True) for w in weights)
    problem["inner_lr"].requires_grad_(True)
    problem["params"].token_scale.requires_grad_(True)
    inputs = (*weights, problem["inner_lr"], problem["params"].token_scale)
    first = torch.tensor(first)

    def run(decode: bool):
        chunk = sliced(problem, 0, 8)
        chunk["inner_lr"] = chunk["inner_lr"] * (torch.arange(8).view(1, 1, 8) < first.view(3, 1, 1))
        _, state = OPS[layer_type](**chunk, state=InnerState.initial(weights, 3), num_tokens=first)
        start_state = state
        if decode:
            outs = []
            for t in range(8, 24):
                out, state = OPS[layer_type](**sliced(problem, t, t + 1), state=state)
                outs.append(out)
            out = torch.cat(outs, dim=2)
        else:
            out, state = OPS[layer_type](**sliced(problem, 8, 24), state=state)
        loss = out.square().sum() + sum(w.square().sum() for w in state.weights)
        return out, start_state, state, torch.autograd.grad(loss, inputs)

    out, start_state, state, grads = run(decode=True)
    for row in range(3):
        with torch.no_grad():
            ref, ref_state = ttt_sequential(layer_type, **sliced(problem, 8, 24, slice(row, row + 1)),
                                            state=row_state(start_state, row))
        torch.testing.assert_close(out[row : row + 1].detach(), ref, atol=1e-10, rtol=0)
        assert_states_close(row_state(state, row), ref_state)
    _, _, _, dual_grads = run(decode=False)
    for a, b in zip(grads, dual_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_checkpointed_groups_give_same_values_and_gradients(layer_type):
    problem, weights = make_problem(layer_type, seq_len=40)
    weights = tuple(w.requires_grad_(True) for w in weights)
    lr = problem["inner_lr"].requires_grad_(True)
    results = []
    for group in (0, 2):
        params = dataclasses.replace(problem["params"], checkpoint_group=group)
        out, state = OPS[layer_type](**dict(problem, params=params), state=InnerState.initial(weights, 3))
        loss = out.square().sum() + sum(w.square().sum() for w in state.weights)
        grads = torch.autograd.grad(loss, (*weights, lr))
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-12, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_layer_norm_l2_grad_matches_autograd():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 16, dtype=torch.float64, generator=gen).requires_grad_(True)
    target, weight, bias = (torch.randn(4, 16, dtype=torch.float64, generator=gen) for _ in range(3))
    loss = 0.5 * (layer_norm(z, weight, bias) - target).square().sum()
    (expected,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(layer_norm_l2_grad(z.detach(), target, weight, bias), expected, atol=1e-12, rtol=0)


def test_gelu_grad_matches_autograd():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64).requires_grad_(True)
    (expected,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    torch.testing.assert_close(gelu_tanh_grad(x.detach()), expected, atol=1e-12, rtol=0)


def test_bad_shapes_are_named():
    problem, weights = make_problem("linear")
    state = InnerState.initial(weights, 3)
    bad = dict(problem, inner_lr=problem["inner_lr"][:, :, :5])
    with pytest.raises(ValueError, match="inner_lr"):
        ttt_linear(**bad, state=state)
    with pytest.raises(ValueError, match="4 weights"):
        ttt_mlp(**problem, state=state)
    with pytest.raises(ValueError, match="num_tokens"):
        ttt_linear(**problem, state=state, num_tokens=torch.tensor([1, 2]))


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("start", [0, 5])
def test_inference_mode_matches_the_primal_form_and_leaves_inputs_alone(layer_type, start):
    """Without autograd the loop updates its own weight buffer in place: same numbers, and neither the state
    passed in nor the initial weights it was expanded from change (calling twice gives the same)."""
    problem, weights = make_problem(layer_type)
    originals = [w.clone() for w in weights]
    state = InnerState.initial(weights, 3)
    if start:
        _, state = OPS[layer_type](**sliced(problem, 0, start), state=state)
    before = [t.clone() for t in (*state.weights, *state.grads)]
    expected, expected_state = ttt_sequential(layer_type, **sliced(problem, start, 37), state=state)
    with torch.inference_mode():
        out, new_state = OPS[layer_type](**sliced(problem, start, 37), state=state)
        again, _ = OPS[layer_type](**sliced(problem, start, 37), state=state)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert_states_close(new_state, expected_state)
    assert torch.equal(again, out)
    for kept, now in zip(before, (*state.weights, *state.grads)):
        assert torch.equal(kept, now)
    for kept, now in zip(originals, weights):
        assert torch.equal(kept, now)
