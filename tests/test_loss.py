"""The LM head fused with the cross-entropy (`modeling_ttt.loss`) against transformers' `ForCausalLMLoss` on the
full logits: value and gradients, ignore_index, num_items_in_batch, shift_labels, chunking, autocast; and the
model's forward choosing between the two."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_ttt import TTTConfig, TTTForCausalLM
from modeling_ttt import loss as loss_module
from modeling_ttt.loss import linear_cross_entropy


class _CountProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _inputs(batch=2, seq_len=37, hidden=24, vocab=301, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, seq_len, hidden, generator=generator, dtype=dtype).requires_grad_()
    weight = (0.3 * torch.randn(vocab, hidden, generator=generator, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return hidden_states, weight, labels


def _reference(hidden_states, weight, labels, **kwargs):
    logits = hidden_states @ weight.t()
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0], **kwargs)


def _value_and_grads(fn, hidden_states, weight, labels, **kwargs):
    h, w = hidden_states.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _assert_same(fused, reference, atol=1e-5, rtol=1e-5):
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("chunk_elements", [301 * 5, 1 << 23])  # 5 tokens per chunk (several, one ragged), one
def test_matches_for_causal_lm_loss(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", chunk_elements)
    hidden_states, weight, labels = _inputs()
    labels[0, :5] = -100
    labels[1, 20] = -100
    fused = _value_and_grads(linear_cross_entropy, hidden_states, weight, labels)
    reference = _value_and_grads(_reference, hidden_states, weight, labels)
    assert 4.0 < float(reference[0]) < 12.0  # a real loss, not a trivial one
    _assert_same(fused, reference)
    assert torch.count_nonzero(fused[1][:, -1]) == 0  # the last position predicts nothing
    assert torch.count_nonzero(fused[1][0, :4]) == 0  # positions whose next label is ignored get no gradient


def test_num_items_in_batch_sums_then_divides():
    hidden_states, weight, labels = _inputs(seed=1)
    labels[1, :10] = -100
    for num_items in (torch.tensor(17), 50):
        fused = _value_and_grads(linear_cross_entropy, hidden_states, weight, labels, num_items_in_batch=num_items)
        reference = _value_and_grads(_reference, hidden_states, weight, labels, num_items_in_batch=num_items)
        _assert_same(fused, reference)
    counted = int((labels[:, 1:] != -100).sum())
    mean = linear_cross_entropy(hidden_states, weight, labels)
    summed = linear_cross_entropy(hidden_states, weight, labels, num_items_in_batch=1)
    torch.testing.assert_close(summed / counted, mean)


def test_shift_labels_and_custom_ignore_index():
    hidden_states, weight, labels = _inputs(seed=2)
    shift_labels = labels.clone()
    shift_labels[:, ::3] = 7  # token 7 ignored here
    kwargs = {"shift_labels": shift_labels, "ignore_index": 7}
    fused = _value_and_grads(linear_cross_entropy, hidden_states, weight, None, **kwargs)
    reference = _value_and_grads(_reference, hidden_states, weight, None, **kwargs)
    _assert_same(fused, reference)


def test_backward_scales_by_the_incoming_gradient():
    hidden_states, weight, labels = _inputs(seed=3)
    fused = _value_and_grads(lambda h, w, y: 2.5 * linear_cross_entropy(h, w, y), hidden_states, weight, labels)
    reference = _value_and_grads(lambda h, w, y: 2.5 * _reference(h, w, y), hidden_states, weight, labels)
    _assert_same(fused, reference)


def test_all_ignored_is_nan_like_cross_entropy():
    hidden_states, weight, labels = _inputs(seed=4)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(hidden_states, weight, labels))
    assert torch.isnan(_reference(hidden_states, weight, labels))


def test_no_grad_and_frozen_head():
    hidden_states, weight, labels = _inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden_states, weight, labels),
                                   _reference(hidden_states, weight, labels))
    with torch.no_grad(), _CountProducts() as products:  # without autograd: the logits' product only
        linear_cross_entropy(hidden_states, weight, labels)
    assert products.count == 1
    with _CountProducts() as products:  # with it: and the two gradient products, in the forward
        linear_cross_entropy(hidden_states, weight, labels)
    assert products.count == 3
    h = hidden_states.detach().clone().requires_grad_()
    linear_cross_entropy(h, weight.detach(), labels).backward()
    h_ref = hidden_states.detach().clone().requires_grad_()
    _reference(h_ref, weight.detach(), labels).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_reference():
    hidden_states, weight, labels = _inputs(seed=6, hidden=64, vocab=512)
    with torch.autocast("cpu", torch.bfloat16):
        fused = _value_and_grads(linear_cross_entropy, hidden_states, weight, labels)
        reference = _value_and_grads(_reference, hidden_states, weight, labels)
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32
    _assert_same(fused, reference, atol=2e-3, rtol=2e-2)


def _tiny_model():
    config = TTTConfig.from_preset("125m-linear", num_hidden_layers=2, hidden_size=48, num_attention_heads=4,
                                   intermediate_size=64, vocab_size=97, mini_batch_size=4)
    torch.manual_seed(0)
    return TTTForCausalLM(config)


def test_model_forward_uses_fused_loss_in_training():
    model = _tiny_model()
    input_ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, :3] = -100

    def loss_and_grads(return_logits):
        model.zero_grad(set_to_none=True)
        out = model(input_ids, labels=labels, use_cache=False, return_logits=return_logits)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    fused, fused_grads = loss_and_grads(None)
    assert fused.logits is None
    full, full_grads = loss_and_grads(True)
    assert full.logits.shape == (2, 11, 97)
    torch.testing.assert_close(fused.loss, full.loss, atol=1e-6, rtol=1e-6)
    assert len(fused_grads) == len(full_grads)
    for got, want in zip(fused_grads, full_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    model.eval()  # evaluation (e.g. Trainer.prediction_step) gets the logits by default
    with torch.no_grad():
        evaluated = model(input_ids, labels=labels, use_cache=False)
        forced = model(input_ids, labels=labels, use_cache=False, return_logits=False)
    assert evaluated.logits.shape == (2, 11, 97) and forced.logits is None
    torch.testing.assert_close(evaluated.loss, fused.loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(forced.loss, fused.loss.detach(), atol=1e-6, rtol=1e-6)


def test_a_wrapped_head_takes_the_usual_loss():
    """An adapter on the head (PEFT LoRA on lm_head) is more than `lm_head.weight`: the fused loss must not read the
    weight alone, or the adapter would be silently left out of the loss."""
    peft = pytest.importorskip("peft")
    model = _tiny_model()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    peft_model.train()
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    out = peft_model(input_ids=input_ids, labels=input_ids, use_cache=False)
    logits = peft_model(input_ids=input_ids, use_cache=False).logits
    expected = ForCausalLMLoss(logits, input_ids, vocab_size=97)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    with peft_model.disable_adapter():
        plain = peft_model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    assert abs(float(plain.detach()) - float(expected.detach())) > 1e-4  # the adapter changes the loss: the check above can fail


@pytest.mark.parametrize("padding_idx", [None, 5])
def test_tied_embedding_and_head_take_one_node_with_the_same_gradients(monkeypatch, padding_idx):
    """With the head tied to the embedding (the presets), training takes both from `TiedEmbeddingFunction` (one
    node; the embedding's rows are added into the head's gradient instead of a dense zero-filled `[V, C]` of its own):
    same loss and gradients as the embedding module plus the usual loss, `padding_idx` rows included (no gradient
    from the embedding side, as `nn.Embedding`). A hook on the embedding module takes the module path (it must fire)."""
    model = _tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.model.embed_tokens.padding_idx = padding_idx
    calls = []
    original = loss_module.TiedEmbeddingFunction

    class Counted(original):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return original.forward(ctx, *args)

    monkeypatch.setattr(loss_module, "TiedEmbeddingFunction", Counted)
    input_ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    input_ids[:, 4] = 5  # the padding row, when there is one, is read too

    def loss_and_grads(return_logits):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=input_ids, use_cache=False, return_logits=return_logits).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    model.train()
    tied_loss, tied = loss_and_grads(None)
    assert calls == [1]
    full_loss, full = loss_and_grads(True)
    assert calls == [1]
    torch.testing.assert_close(tied_loss, full_loss, atol=1e-6, rtol=1e-6)
    for name, grad in full.items():
        torch.testing.assert_close(tied[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    if padding_idx is not None:  # only the head's gradient reaches the padding row
        head_only = model.model.embed_tokens.weight.grad  # from the last (full-logits) run
        torch.testing.assert_close(tied["model.embed_tokens.weight"][padding_idx], head_only[padding_idx])

    fired = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *args: fired.append(1))
    hooked_loss, hooked = loss_and_grads(None)
    handle.remove()
    assert fired == [1] and calls == [1]
    torch.testing.assert_close(hooked_loss, tied_loss)
    for name, grad in tied.items():
        torch.testing.assert_close(hooked[name], grad, atol=1e-6, rtol=1e-6, msg=name)
