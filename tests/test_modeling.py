"""TTTForCausalLM as a transformers model: causality at every length, save/load, auto classes, training."""

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModel, AutoModelForCausalLM

from modeling_ttt import TTTForCausalLM, TTTModel
from modeling_ttt.compat import cache_of


def test_causal_at_every_length(variant):
    """logits(x[:, :t]) == logits(x)[:, :t] for every t, including 1 and lengths off the mini-batch grid."""
    model = tiny_model(*variant)
    input_ids = torch.randint(0, 97, (2, 27), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        for t in range(1, 28):
            prefix = model(input_ids[:, :t], use_cache=False).logits
            torch.testing.assert_close(prefix, full[:, :t], atol=1e-5, rtol=0, msg=f"prefix length {t}")


def test_future_tokens_do_not_leak(variant):
    model = tiny_model(*variant)
    a = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    b = a.clone()
    b[:, 11:] = (b[:, 11:] + 1) % 97
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :11], lb[:, :11], atol=1e-6, rtol=0)
    assert (la[:, 11:] - lb[:, 11:]).abs().max() > 1e-3


def test_save_pretrained_round_trip(tmp_path, variant):
    model = tiny_model(*variant)
    input_ids = torch.randint(0, 97, (2, 19))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TTTForCausalLM)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)
    # the non-persistent buffers are rebuilt, not left uninitialised
    block = loaded.model.layers[0].seq_modeling_block
    torch.testing.assert_close(block.token_idx, 1.0 / torch.arange(1, 9, dtype=torch.float32))


def test_untied_head_round_trip(tmp_path):
    model = tiny_model("mlp", "mamba", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_tied_head_shares_the_embedding():
    model = tiny_model("linear", "mamba")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_auto_classes():
    config = tiny_config("mlp", "transformer")
    assert isinstance(AutoModelForCausalLM.from_config(config), TTTForCausalLM)
    assert isinstance(AutoModel.from_config(config), TTTModel)


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    model = TTTForCausalLM(tiny_config("mlp", "mamba", hidden_size=64, initializer_range=0.05))
    block = model.model.layers[0].seq_modeling_block
    assert torch.all(block.learnable_token_idx == 0) and torch.all(block.learnable_ttt_lr_bias == 0)
    assert torch.all(block.b1 == 0) and torch.all(block.b2 == 0) and torch.all(block.ttt_norm_weight == 1)
    assert abs(block.W1.std().item() - 0.05) < 0.01 and abs(block.q_proj.weight.std().item() - 0.05) < 0.01
    assert abs(block.learnable_ttt_lr_weight.std().item() - 0.05) < 0.015
    # flax lecun-normal for depthwise convs: std ≈ 1/sqrt(kernel width) = 0.5
    assert 0.35 < block.conv_q.weight.std().item() < 0.65


def test_outputs_api():
    model = tiny_model("linear", "mamba")
    input_ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
        assert out.logits.shape == (2, 13, 97)
        assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 13, 32)
        last = model(input_ids, logits_to_keep=1).logits
        torch.testing.assert_close(last, out.logits[:, -1:], atol=1e-6, rtol=0)
        as_tuple = model(input_ids, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
        embeds = model.get_input_embeddings()(input_ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, out.logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids, inputs_embeds=embeds)


def test_loss_matches_shifted_cross_entropy():
    model = tiny_model("mlp", "transformer")
    input_ids = torch.randint(0, 97, (2, 21))
    labels = input_ids.clone()
    labels[0, :5] = -100
    out = model(input_ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_training_step_gives_finite_gradients_for_every_parameter(variant):
    model = tiny_model(*variant).train()
    input_ids = torch.randint(0, 97, (2, 21))
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    block = model.model.layers[0].seq_modeling_block
    for name in ("W1", "b1", "learnable_ttt_lr_weight", "learnable_ttt_lr_bias", "learnable_token_idx",
                 "ttt_norm_weight", "ttt_norm_bias"):
        assert getattr(block, name).grad.abs().sum() > 0, f"{name} gradient is zero"


def test_checkpointing_changes_nothing():
    """Inner-loop recomputation groups and block activation checkpointing give the same loss and gradients."""
    input_ids = torch.randint(0, 97, (2, 37))
    results = []
    for group, blocks in ((0, False), (2, False), (0, True)):
        model = tiny_model("mlp", "mamba", scan_checkpoint_group_size=group).train()
        if blocks:
            model.activation_checkpointing_enable()
        loss = model(input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_left_and_right_padding_equal_unpadded_rows(variant):
    model = tiny_model(*variant)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 97, (n,), generator=gen) for n in (19, 6, 1)]
    width = 19
    for side in ("left", "right"):
        input_ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            input_ids[i, span], mask[i, span] = row, 1
        with torch.no_grad():
            logits = model(input_ids, attention_mask=mask, use_cache=False).logits
            for i, row in enumerate(rows):
                alone = model(row[None], use_cache=False).logits[0]
                got = logits[i][mask[i].bool()]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=0, msg=f"{side} row {i}")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_padding_changes_nothing(variant, poison):
    """Padding is zeroed before it enters any product: NaN/inf embeddings at masked positions leave the real
    tokens' logits, the state and every gradient exactly as with finite padding (forward and backward)."""
    model = tiny_model(*variant).train()
    gen = torch.Generator().manual_seed(4)
    embeds = torch.randn(2, 21, model.config.hidden_size, generator=gen)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :5] = 0  # left padding inside the first mini-batch
    mask[1, 13:] = 0  # right padding
    runs = []
    for fill in (0.0, poison):
        poisoned = embeds.masked_fill(~mask.bool().unsqueeze(-1), fill).requires_grad_(True)
        model.zero_grad()
        out = model(inputs_embeds=poisoned, attention_mask=mask, use_cache=True)
        (out.logits * mask.unsqueeze(-1)).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        runs.append((out.logits, cache_of(out).layers[0].inner_state, grads, poisoned.grad))
    (logits, state, grads, input_grad), (p_logits, p_state, p_grads, p_input_grad) = runs
    assert torch.isfinite(p_logits).all() and torch.equal(p_logits, logits)
    assert all(torch.equal(a, b) for a, b in zip(p_state.weights + p_state.grads, state.weights + state.grads))
    for name in grads:
        assert torch.isfinite(p_grads[name]).all() and torch.equal(p_grads[name], grads[name]), name
    assert torch.equal(p_input_grad, input_grad) and not p_input_grad[~mask.bool()].any()


def test_bad_attention_mask_is_refused():
    model = tiny_model("linear", "transformer")
    input_ids = torch.randint(0, 97, (2, 9))
    with pytest.raises(ValueError, match="shape"):
        model(input_ids, attention_mask=torch.ones(3, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="only 0"):
        model(input_ids, attention_mask=torch.full((2, 9), 2))


def test_bf16_forward_runs_and_stays_close():
    model = tiny_model("linear", "mamba")
    input_ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        reference = model(input_ids).logits
        low = model.to(torch.bfloat16)(input_ids).logits.float()
    assert (low - reference).abs().max() < 0.1


def test_inference_follows_changes_to_the_qk_convs():
    """Without autograd the Mamba backbone keeps conv_q/conv_k stacked between calls: changing a conv parameter
    in place, or replacing the conv, must reach the next forward."""
    model = tiny_model("linear", "mamba")
    input_ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    layer = model.model.layers[0].seq_modeling_block
    with torch.no_grad():
        before = model(input_ids).logits
        layer.conv_k.weight.mul_(1.5)
        scaled = model(input_ids).logits
    with torch.enable_grad():
        expected = model(input_ids).logits.detach()  # never memoised
    torch.testing.assert_close(scaled, expected, atol=1e-6, rtol=0)
    assert (scaled - before).abs().max() > 1e-4
    replacement = torch.nn.Conv1d(layer.hidden_size, layer.hidden_size, kernel_size=layer.conv_q.kernel_size[0],
                                  groups=layer.hidden_size)
    layer.conv_q = replacement
    with torch.inference_mode():
        replaced = model(input_ids).logits
    with torch.enable_grad():
        expected = model(input_ids).logits.detach()
    torch.testing.assert_close(replaced, expected, atol=1e-6, rtol=0)


def test_the_backend_is_decided_once_per_forward(monkeypatch):
    """`TTTModel.forward` resolves the backend once and hands its op to every layer; no layer resolves again."""
    import modeling_ttt.layers
    import modeling_ttt.modeling_ttt

    model = tiny_model("linear", "mamba", num_hidden_layers=3)
    calls = []
    resolve = modeling_ttt.modeling_ttt.get_backend
    monkeypatch.setattr(modeling_ttt.modeling_ttt, "get_backend", lambda *a: calls.append(a) or resolve(*a))
    monkeypatch.setattr(modeling_ttt.layers, "get_ttt_ops", lambda *a: pytest.fail("a layer resolved the backend"))
    ids = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
        model(ids[:, :1], cache=cache)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 3


def test_the_model_and_layers_hold_no_kernel_backend_logic():
    """The C++ and Triton backends live under `ops/`: the HF classes and the layers only call the backend's op."""
    import inspect

    import modeling_ttt.layers
    import modeling_ttt.modeling_ttt

    for module in (modeling_ttt.modeling_ttt, modeling_ttt.layers):
        source = inspect.getsource(module)
        for name in ("modeling_ttt_cpu", "ops.cpu", "ops.triton", "import triton", "_global_forward_hooks",
                     "RemovableHandle", "cpp_kernels_apply", "fused_decode"):
            assert name not in source, (module.__name__, name)
