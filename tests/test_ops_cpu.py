"""The C++ CPU decoding kernel (`modeling_ttt.ops.cpu`) against the PyTorch reference: one token per call at every
position of the mini-batch, rows at different positions, float64 and float32; the inputs are never written; what
it does not handle (autograd, chunks, padding) goes to the reference; whole models decode the same tokens."""

import pytest
import torch
from conftest import tiny_model
from test_ops import assert_states_close, make_problem, map_tensors, problem_tensors, sliced

from modeling_ttt.compat import cache_of
from modeling_ttt.ops import InnerState, cpu, torch_chunk
from modeling_ttt.ops.cpu import plan as cpu_plan

pytestmark = pytest.mark.skipif(cpu.build_error() is not None,
                                reason=f"the C++ kernel does not build here: {cpu.build_error()}")


def decode_both(problem, state, start, stop):
    """Feed tokens start..stop one at a time through the reference and through the kernel."""
    ref_state, cpp_state, ref_out, cpp_out = state, state, [], []
    for t in range(start, stop):
        step = sliced(problem, t, t + 1)
        out, ref_state = torch_chunk.ttt_linear(**step, state=ref_state)
        ref_out.append(out)
        assert cpu.decodes(step["xq"], None)
        out, cpp_state = cpu.ttt_linear(**step, state=cpp_state)
        cpp_out.append(out)
    return torch.cat(ref_out, dim=2), ref_state, torch.cat(cpp_out, dim=2), cpp_state


@pytest.mark.parametrize("first", [(0, 0, 0), (5, 3, 0), (7, 7, 7)])
def test_kernel_equals_the_reference_token_by_token(first):
    """Rows start at positions `first` of their mini-batches (8 tokens), then 20 tokens are decoded: every
    position, mini-batch ends together or on different steps; float64 agrees to rounding."""
    problem, weights = make_problem("linear", seq_len=28)
    chunk = sliced(problem, 0, 8)
    num_tokens = torch.tensor(first)
    chunk["inner_lr"] = chunk["inner_lr"] * (torch.arange(8).view(1, 1, 8) < num_tokens.view(3, 1, 1))
    with torch.no_grad():
        _, state = torch_chunk.ttt_linear(**chunk, state=InnerState.initial(weights, 3), num_tokens=num_tokens)
        ref_out, ref_state, cpp_out, cpp_state = decode_both(problem, state, 8, 28)
    torch.testing.assert_close(cpp_out, ref_out, atol=1e-12, rtol=0)
    assert_states_close(cpp_state, ref_state, atol=1e-12)


def test_float32_stays_close_and_inputs_are_untouched():
    problem, weights = make_problem("linear", seq_len=20)
    problem = map_tensors(lambda t: t.float(), problem)
    state = InnerState.initial(tuple(w.float() for w in weights), 3)
    kept = [t.clone() for t in (*state.weights, *state.grads, *problem_tensors(problem))]
    with torch.inference_mode():
        ref_out, ref_state, cpp_out, cpp_state = decode_both(problem, state, 0, 20)
    torch.testing.assert_close(cpp_out, ref_out, atol=2e-5, rtol=1e-5)
    for a, b in zip((*cpp_state.weights, *cpp_state.grads), (*ref_state.weights, *ref_state.grads)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    for before, now in zip(kept, (*state.weights, *state.grads, *problem_tensors(problem))):
        assert torch.equal(before, now)


def test_what_the_kernel_does_not_take_goes_to_the_reference():
    """Chunks, padding, autograd and other dtypes give exactly the reference's results (same code)."""
    problem, weights = make_problem("linear", seq_len=12)
    state = InnerState.initial(weights, 3)
    chunk = sliced(problem, 0, 12)
    assert not cpu.decodes(chunk["xq"], None)
    assert not cpu.decodes(sliced(problem, 0, 1)["xq"], torch.tensor([1, 1, 1]))
    assert not cpu.decodes(sliced(problem, 0, 1)["xq"].half(), None)
    lr = problem["inner_lr"].clone().requires_grad_(True)
    step = dict(sliced(problem, 0, 1), inner_lr=lr[:, :, :1])
    assert not cpu.decodes(step["xq"], None, step["inner_lr"])
    out, _ = cpu.ttt_linear(**step, state=state)
    expected, _ = torch_chunk.ttt_linear(**step, state=state)
    assert torch.equal(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), lr)
    assert grad.abs().sum() > 0
    out, new_state = cpu.ttt_linear(**chunk, state=state)
    expected, expected_state = torch_chunk.ttt_linear(**chunk, state=state)
    assert torch.equal(out, expected)
    assert_states_close(new_state, expected_state, atol=0)


def test_bad_inputs_are_named():
    problem, weights = make_problem("linear", seq_len=1)
    state = InnerState.initial(weights, 3)
    op = torch.ops.modeling_ttt_cpu.ttt_linear_decode
    args = problem_tensors(problem)
    with pytest.raises(ValueError, match="share one dtype"):
        op(*args[:3], args[3].float(), *args[4:], *state.weights, *state.grads, state.seen, 1e-6)
    with pytest.raises(ValueError, match=r"seen must be int64 \[B\]"):
        op(*args, *state.weights, *state.grads, state.seen[:2], 1e-6)
    with pytest.raises(ValueError, match=r"W and G_W must be \[B, H, d, d\]"):
        op(*args, state.weights[0][:2], state.weights[1], *state.grads, state.seen, 1e-6)


def test_bad_inputs_of_the_block_kernels_are_named():
    """The block and model-step kernels name what is wrong with their lists and shapes."""
    model = tiny_model("linear", "mamba")
    block = model.model.layers[0]
    x = torch.randn(2, 1, model.config.hidden_size)
    with torch.no_grad():
        params = cpu_plan.block_arguments(block, x.dtype)
        cache = cache_of(model(torch.randint(0, 10, (2, 3)), use_cache=True))
    state = cache.layers[0].inner_state
    inner = [*state.weights, *state.grads, state.seen]
    blocks = torch.ops.modeling_ttt_cpu.ttt_linear_decode_blocks
    with pytest.raises(ValueError, match="params must hold 26 tensors per block"):
        blocks(x, params[:-1], [None, None], inner, [0.1, 1e-6, 1e-6, 1e-6])
    with pytest.raises(ValueError, match=r"inner_states must hold \(W, b, G_W, G_b, seen\) per block"):
        blocks(x, params, [None, None], inner[:4], [0.1, 1e-6, 1e-6, 1e-6])
    with pytest.raises(ValueError, match="conv_states must hold 2 entries per block"):
        blocks(x, params, [None], inner, [0.1, 1e-6, 1e-6, 1e-6])
    with pytest.raises(ValueError, match=r"conv state must be \[B, K-1, C\]"):
        blocks(x, params, [torch.zeros(2, 1, model.config.hidden_size), None], inner, [0.1, 1e-6, 1e-6, 1e-6])
    with pytest.raises(ValueError, match=r"h must be \[B, 1, C\]"):
        blocks(x.expand(2, 2, -1), params, [None, None], inner, [0.1, 1e-6, 1e-6, 1e-6])


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_models_decode_the_same_tokens(backbone):
    """Greedy generation of a left-padded batch (rows at different positions) with ttt_impl="cpp" and "torch":
    same tokens, logits within float32 rounding."""
    model = tiny_model("linear", backbone)
    input_ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :6] = 0
    attention_mask[1, :3] = 0
    results = {}
    for impl in ("torch", "cpp"):
        model.config.ttt_impl = impl
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=40, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        results[impl] = (out.sequences, torch.stack(out.logits))
    assert torch.equal(results["cpp"][0], results["torch"][0])
    torch.testing.assert_close(results["cpp"][1], results["torch"][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_layer_step_with_the_inner_step_kernel_equals_torch(backbone):
    """TTTLinear's one-token step with ttt_impl="cpp" (the module path of an adapted model: the inner step as the
    `ttt_linear_decode` kernel) against ttt_impl="torch", float64, rows at positions that end their mini-batches on
    different steps; the conv and inner states must match too."""
    import copy

    from modeling_ttt.cache import TTTCacheLayer

    model = tiny_model("linear", backbone).double()
    layer = model.model.layers[0].seq_modeling_block
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in layer.parameters():  # nonzero biases, token offsets, LN affine
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        hidden = torch.randn(3, 20, layer.hidden_size, generator=gen, dtype=torch.float64)
        state = TTTCacheLayer()
        layer.config.ttt_impl = "torch"
        layer(hidden[:, :7], state, num_tokens=torch.tensor([7, 2, 5]))  # right padding: rows at 7, 2, 5
        fused_state = copy.deepcopy(state)
        for t in range(7, 20):
            layer.config.ttt_impl = "torch"
            expected = layer(hidden[:, t : t + 1], state)
            layer.config.ttt_impl = "cpp"
            got = layer(hidden[:, t : t + 1], fused_state)
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=0, msg=f"token {t}")
    assert_states_close(fused_state.inner_state, state.inner_state, atol=1e-12)
    assert fused_state.conv_states.keys() == state.conv_states.keys()
    for name in state.conv_states:
        assert torch.equal(fused_state.conv_states[name], state.conv_states[name])


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
@pytest.mark.parametrize("rows, intermediate_size", [(3, 64), (2, 38), (10, 64)], ids=["gemv", "gemv-tails", "gemm"])
def test_fused_block_step_equals_the_module_path(backbone, rows, intermediate_size, monkeypatch):
    """A whole block's one-token step as one kernel (projections included) against the module-by-module path,
    float64, rows at different positions: outputs, conv states and inner states. The kernel's own matrix-vector
    products serve up to 8 rows (with widths that are not multiples of its 4 rows / 8 lanes: 38), BLAS more."""
    import copy

    model = tiny_model("linear", backbone, intermediate_size=intermediate_size, num_hidden_layers=1).double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        prompt = torch.randint(0, model.config.vocab_size, (rows, 7), generator=gen)
        mask = (torch.arange(7) >= 7 - torch.tensor([7, 2, 5, 1, 6, 3, 7, 4, 2, 5][:rows]).unsqueeze(1)).long()
        cache = cache_of(model(prompt, attention_mask=mask, use_cache=True))  # rows at different positions
        module_cache = copy.deepcopy(cache)
        tokens = torch.randint(0, model.config.vocab_size, (rows, 13), generator=gen)
        for t in range(13):
            got = model(tokens[:, t : t + 1], cache=cache).logits
            assert cpu_plan.current_plan(model.model) is not None  # the one call ran
            with monkeypatch.context() as patch:  # the module-by-module path
                patch.setattr(cpu_plan, "decode_step", lambda model, hidden_states, cache: None)
                expected = model(tokens[:, t : t + 1], cache=module_cache).logits
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=0, msg=f"token {t}")
    state, module_state = cache.layers[0], module_cache.layers[0]
    assert_states_close(state.inner_state, module_state.inner_state, atol=1e-12)
    for name in module_state.conv_states:
        torch.testing.assert_close(state.conv_states[name], module_state.conv_states[name], atol=1e-12, rtol=0)


def test_fused_block_step_steps_aside_for_adapters_and_hooks():
    """A replaced projection (as PEFT does), a projection bias or a forward hook keeps the module-by-module path."""
    model = tiny_model("linear", "mamba")
    block = model.model.layers[0]
    x = torch.randn(2, 1, block.config.hidden_size)
    with torch.no_grad():
        assert cpu_plan.block_arguments(block, x.dtype) is not None
        assert cpu_plan.block_arguments(block, torch.float64) is None  # weights are float32
        handle = block.mlp.up_proj.register_forward_hook(lambda *args: None)
        assert cpu_plan.block_arguments(block, x.dtype) is None
        handle.remove()
        assert cpu_plan.block_arguments(block, x.dtype) is not None

        class Adapter(torch.nn.Linear):
            pass

        original = block.seq_modeling_block.q_proj
        block.seq_modeling_block.q_proj = Adapter(original.in_features, original.out_features, bias=False)
        assert cpu_plan.block_arguments(block, x.dtype) is None
        block.seq_modeling_block.q_proj = original
        cache = cache_of(model(torch.randint(0, 10, (2, 3)), use_cache=True))
        assert cpu_plan.decode_step(model.model, x, cache) is not None
    assert cpu_plan.decode_step(model.model, x, cache) is None  # autograd on


def decode_steps(model, cache, tokens, mask=None):
    """Logits of feeding `tokens` [B, T] one column at a time through `cache`."""
    logits = []
    for t in range(tokens.shape[1]):
        out = model(tokens[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def prefilled(model, gen, batch=3):
    """A cache after a left-padded prompt: rows at different positions of their mini-batches."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, 11), generator=gen)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return cache_of(model(prompt, attention_mask=mask, use_cache=True))


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_fused_model_step_equals_block_by_block(backbone, monkeypatch):
    """All blocks in one C++ call (`plan.DecodePlan`) against the blocks one by one, float64, rows at different
    positions of their mini-batches, across mini-batch ends: logits and every layer's state."""
    import copy

    model = tiny_model("linear", backbone).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
        cache = prefilled(model, gen)
        blockwise_cache = copy.deepcopy(cache)
        tokens = torch.randint(0, model.config.vocab_size, (3, 19), generator=gen)
        fused = decode_steps(model, cache, tokens)
        assert cpu_plan.current_plan(model.model) is not None  # the plan ran
        with monkeypatch.context() as patch:
            patch.setattr(cpu_plan, "decode_step", lambda model, hidden_states, cache: None)
            blockwise = decode_steps(model, blockwise_cache, tokens)
    torch.testing.assert_close(fused, blockwise, atol=1e-12, rtol=0)
    for got, expected in zip(cache.layers, blockwise_cache.layers):
        assert_states_close(got.inner_state, expected.inner_state, atol=1e-12)
        assert got.conv_states.keys() == expected.conv_states.keys()
        for name in got.conv_states:
            torch.testing.assert_close(got.conv_states[name], expected.conv_states[name], atol=1e-12, rtol=0)
    assert cache.num_positions == blockwise_cache.num_positions


def test_fused_model_step_follows_changes_to_the_model(monkeypatch):
    """The plan is kept between steps only while it is current: a hook registered on any submodule runs (and the
    results stay those of the module path), a replaced module or parameter is used, an in-place change or a
    dtype change of the parameters is seen, and an instance-level `forward` (accelerate's hooks) is honoured."""
    import copy
    import functools

    model = tiny_model("linear", "mamba")
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.config.vocab_size, (3, 1), generator=gen)

    def one_step(model, cache):
        return model(tokens, cache=cache, use_cache=True).logits

    def blockwise(model, cache):
        with monkeypatch.context() as patch:
            patch.setattr(cpu_plan, "decode_step", lambda model, hidden_states, cache: None)
            return one_step(model, cache)

    def check(model, cache, plan_used):
        """One step with whatever path the model picks, against the block-by-block path from the same state."""
        reference_cache = copy.deepcopy(cache)
        got = one_step(model, cache)
        torch.testing.assert_close(got, blockwise(model, reference_cache), atol=1e-5, rtol=1e-5)
        assert (cpu_plan.current_plan(model.model) is not None) == plan_used
        return got

    with torch.no_grad():
        cache = prefilled(model, gen)
        check(model, cache, plan_used=True)
        plan = cpu_plan.current_plan(model.model)
        check(model, cache, plan_used=True)
        assert cpu_plan.current_plan(model.model) is plan  # kept while nothing changed

        up_proj = model.model.layers[1].mlp.up_proj
        calls = []
        handle = up_proj.register_forward_hook(lambda *args: calls.append(1))
        check(model, cache, plan_used=False)
        assert len(calls) == 2  # the model's step and the reference step both ran the module
        handle.remove()
        check(model, cache, plan_used=True)

        layer = model.model.layers[0].seq_modeling_block

        class Adapter(torch.nn.Linear):
            def forward(self, x):
                return super().forward(x) * 1.5

        original = layer.v_proj
        layer.v_proj = Adapter(original.in_features, original.out_features, bias=False)
        layer.v_proj.weight.copy_(original.weight)
        before = check(model, cache, plan_used=False)
        layer.v_proj = original
        check(model, cache, plan_used=True)

        old = one_step(model, copy.deepcopy(cache))
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # in place: the plan sees it
        assert not torch.allclose(check(model, copy.deepcopy(cache), plan_used=True), old)
        o_proj = model.model.layers[0].seq_modeling_block.o_proj
        o_proj.weight = torch.nn.Parameter(o_proj.weight * -1.0)  # replaced: a new plan holds the new one
        check(model, cache, plan_used=True)
        assert cpu_plan.current_plan(model.model) is not plan

        seq_norm = model.model.layers[1].seq_norm
        seq_norm.forward = functools.partial(type(seq_norm).forward, seq_norm)  # as accelerate's add_hook_to_module
        check(model, cache, plan_used=False)
        del seq_norm.forward
        check(model, cache, plan_used=True)

        model.double()
        check(model, cache.to(dtype=torch.float64), plan_used=True)
    assert before.shape == (3, 1, model.config.vocab_size)


def test_a_loaded_model_still_decodes_with_the_plan(tmp_path):
    """`from_pretrained` (from transformers 5.25 on, with the `kernels` library installed, it kernelizes every model
    it loads unless `USE_HUB_KERNELS=0`) leaves a TTT model's blocks plain: greedy decoding of the loaded model runs
    the one-call C++ plan and gives the tokens of the model it was saved from."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("linear", "mamba", ttt_impl="auto")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert loaded.generate(prompt, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
    assert cpu_plan.current_plan(loaded.model) is not None  # the plan ran for the loaded model
