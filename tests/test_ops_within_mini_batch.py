"""The reference ops' path for chunks that stay inside every row's current mini-batch (decoding: `T = 1`, short
prompts, rows at different positions, right padding, rows that finish their mini-batch in the chunk) against the
token-by-token primal form."""

import pytest
import torch

from modeling_ttt.ops import InnerLoopParams, InnerState, ttt_linear, ttt_mlp
from test_ops import ttt_sequential

OPS = {"linear": ttt_linear, "mlp": ttt_mlp}
BATCH, HEADS, HEAD_DIM, MINI_BATCH = 3, 2, 8, 8


def problem(layer_type, seq_len, seed):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    shape = (BATCH, HEADS, seq_len, HEAD_DIM)
    inputs = dict(xq=randn(*shape), xk=randn(*shape), xv=randn(*shape),
                  inner_lr=torch.rand(BATCH, HEADS, seq_len, generator=gen, dtype=torch.float64) * 0.5)
    params = InnerLoopParams(token_scale=torch.rand(MINI_BATCH, generator=gen, dtype=torch.float64),
                             ln_weight=randn(HEADS, HEAD_DIM), ln_bias=randn(HEADS, HEAD_DIM))
    hidden = HEAD_DIM if layer_type == "linear" else 4 * HEAD_DIM
    shapes = [(HEAD_DIM, hidden), (1, hidden)] + ([] if layer_type == "linear" else [(hidden, HEAD_DIM), (1, HEAD_DIM)])
    weights = tuple(randn(HEADS, *s) * 0.3 for s in shapes)
    return inputs, params, weights


def take(inputs, start, stop, row=slice(None)):
    return {k: v[row, :, start:stop] for k, v in inputs.items()}


def one_row(state, row):
    pick = lambda t: t[row : row + 1]  # noqa: E731
    return InnerState(tuple(map(pick, state.weights)), tuple(map(pick, state.grads)), pick(state.seen))


def assert_close(a: InnerState, b: InnerState):
    for x, y in zip((*a.weights, *a.grads), (*b.weights, *b.grads)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)
    assert torch.equal(a.seen, b.seen)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("first, second", [
    ([3, 7, 0], [5, 1, 4]),  # rows 0 and 1 finish their mini-batch exactly; row 2 stays inside
    ([1, 2, 3], [1, 1, 1]),  # one-token decode steps at three different positions
    ([7, 7, 7], [1, 1, 1]),  # every row finishes its mini-batch with the step
    ([0, 8, 5], [2, 0, 3]),  # a row with no token in the chunk
])
def test_rows_inside_their_mini_batch_match_the_primal_form(layer_type, first, second):
    inputs, params, weights = problem(layer_type, 16, seed=sum(first) + 10 * sum(second))
    op = OPS[layer_type]
    state = InnerState.initial(weights, BATCH)
    states, outputs = [state], []
    for start, counts in ((0, first), (8, second)):
        width = max(max(counts), 1)
        counts = torch.tensor(counts)
        chunk = take(inputs, start, start + width)
        real = torch.arange(width).view(1, 1, width) < counts.view(BATCH, 1, 1)
        chunk["inner_lr"] = chunk["inner_lr"] * real
        out, state = op(**chunk, params=params, state=state, num_tokens=counts)
        assert torch.all(out.masked_select(~real.unsqueeze(-1)) == 0)
        outputs.append(out)
        states.append(state)
    for row in range(BATCH):
        reference = one_row(states[0], row)
        for step, (start, counts) in enumerate(((0, first), (8, second))):
            n = counts[row]
            expected, reference = ttt_sequential(layer_type, **take(inputs, start, start + n, slice(row, row + 1)),
                                                 params=params, state=reference)
            torch.testing.assert_close(outputs[step][row : row + 1, :, :n], expected, atol=1e-10, rtol=0)
            assert_close(one_row(states[step + 1], row), reference)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_decode_steps_keep_gradients(layer_type):
    """The path is differentiable like the general one (short training sequences take it too)."""
    inputs, params, weights = problem(layer_type, 5, seed=3)
    weights = tuple(w.requires_grad_(True) for w in weights)
    out, state = OPS[layer_type](**inputs, params=params, state=InnerState.initial(weights, BATCH))
    grads = torch.autograd.grad(out.square().sum() + sum(g.square().sum() for g in state.grads), weights)
    reference_out, reference_state = ttt_sequential(layer_type, **inputs, params=params,
                                                    state=InnerState.initial(weights, BATCH))
    torch.testing.assert_close(out, reference_out, atol=1e-10, rtol=0)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
