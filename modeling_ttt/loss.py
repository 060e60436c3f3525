"""Causal-LM loss fused with the LM head: the cross-entropy of `hidden_states @ lm_head.weightᵀ` without ever
holding all `[tokens, vocab_size]` logits.

With a 32,000-token vocabulary the logits of a training step are the largest activations of a small model (and
their float32 softmax, its gradient and the shifted copy made by the usual loss come on top). Here the tokens go
through the head in chunks; each chunk's logits are turned into its loss *and* its gradient right away (the
gradient of a softmax cross-entropy is `softmax − one_hot`), and only the gradients with respect to the hidden
states and the head's weight are kept for backward. So the head costs the same three products as the unfused
loss (one forward, two backward) and no recomputation, and the memory is one chunk of logits.

Semantics are those of transformers' `ForCausalLMLoss`: labels shifted left by one inside (or `shift_labels`
given already shifted), `ignore_index` (-100) ignored, the sum divided by `num_items_in_batch` when it is given
(gradient accumulation), else the mean over the counted tokens; logits upcast to float32 before the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits held at once: chunk_tokens · vocab_size float32 values (32 MiB), large enough for efficient products
# (256 rows at a 32,000 vocabulary), small against the model's other activations.
_CHUNK_ELEMENTS = 1 << 23


def _chunk_tokens(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab_size)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weightᵀ` against `targets`, rows with `ignore_index` left out.

    Forward computes, chunk by chunk, the loss and (when a gradient is needed) the gradients of the *summed*
    loss with respect to `hidden` and `weight`; backward scales them by the incoming gradient. Under autocast the
    head's products run in the autocast dtype, as `nn.Linear` would, and the softmax in float32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        # hidden: [N, C]; weight: [V, C]; targets: [N]
        needs_hidden_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        counted = (targets != ignore_index).nonzero().squeeze(1)  # ignored rows never enter the products
        hidden_counted = hidden.index_select(0, counted)
        targets_counted = targets.index_select(0, counted)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden_counted = torch.empty_like(hidden_counted) if needs_hidden_grad else None
        grad_weight = None  # [V, C]: the first chunk's product, then the others added in place (no zero fill)
        chunk = _chunk_tokens(weight.shape[0])
        for start in range(0, hidden_counted.shape[0], chunk):
            h = hidden_counted[start : start + chunk]
            target = targets_counted[start : start + chunk].unsqueeze(1)
            logits = F.linear(h, weight).float()  # [n, V]
            target_logit = logits.gather(1, target)
            # log Σ exp(logits) computed over the logits' own buffer (no [n, V] temporary): subtract the row max,
            # exponentiate in place; what is left is the unnormalised softmax, which the gradient needs anyway
            row_max = logits.amax(dim=-1, keepdim=True)
            unnormalised = logits.sub_(row_max).exp_()
            normalizer = unnormalised.sum(dim=-1, keepdim=True)
            loss += (row_max + normalizer.log() - target_logit).sum()
            if not (needs_hidden_grad or needs_weight_grad):
                continue
            # ∂(Σ loss)/∂logits = softmax − one_hot, written over the logits (no second [n, V] buffer)
            grad_logits = unnormalised.div_(normalizer)
            grad_logits.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=grad_logits.dtype))
            if grad_logits.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
                grad_logits = grad_logits.to(weight.dtype)  # a 16-bit model without autocast: its dtype's products
            # (under autocast, mm casts to the autocast dtype by itself, as nn.Linear's backward products run)
            if needs_hidden_grad:
                grad_hidden_counted[start : start + chunk] = torch.mm(grad_logits, weight)
            if needs_weight_grad:
                product_in_place = (grad_logits.dtype == h.dtype == torch.float32
                                    and not torch.is_autocast_enabled(h.device.type))
                if grad_weight is None:
                    grad_weight = torch.mm(grad_logits.t(), h).float()
                elif product_in_place:
                    grad_weight.addmm_(grad_logits.t(), h)  # accumulated in place: no [V, C] temporary
                else:  # 16-bit products (autocast or a 16-bit model), summed over the chunks in float32
                    grad_weight.add_(torch.mm(grad_logits.t(), h))
        if needs_weight_grad and grad_weight is None:  # no counted token: a zero gradient
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        if needs_hidden_grad:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, counted, grad_hidden_counted.to(hidden.dtype))
        else:
            grad_hidden = None
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The saved gradients are this call's own buffers and backward runs once (no retain_graph use of the head
        # is supported through this path), so they are scaled in place.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(hidden_states @ weightᵀ, labels, ...)` without the `[B, T, V]` logits.

    Args:
        hidden_states: `[B, T, C]` final hidden states (after the last norm).
        weight: `[V, C]` LM head weight (no bias).
        labels: `[B, T]` next-token labels, shifted left by one here; `ignore_index` marks tokens not counted.
        num_items_in_batch: when given, the summed loss is divided by it (gradient accumulation); else the mean
            over counted tokens (NaN if none is counted, as `cross_entropy`'s mean).
        shift_labels: `[B, T]` labels already aligned with the positions (then `labels` is not read).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if not torch.is_grad_enabled():
        # a Function's `needs_input_grad` ignores no_grad: detached inputs keep it from computing the gradients
        hidden, weight = hidden.detach(), weight.detach()
    loss_sum = LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index)
    if num_items_in_batch is None:
        return loss_sum / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


class TiedEmbeddingFunction(torch.autograd.Function):
    """The input embeddings `weight[input_ids]` *and* the LM head's weight, for a model whose head is tied to its
    embedding: one autograd node for both uses of the one matrix.

    Why: with the usual `nn.Embedding` the embedding's gradient is a dense `[V, C]` zero-filled matrix with the
    tokens' rows added in, which autograd then adds to the head's own `[V, C]` gradient: per step one more fresh
    vocabulary-sized buffer (98 MiB at 32,000 × 768 in float32, whose first touch of every page costs more than the
    arithmetic), a zero fill and an extra pass. Here backward receives both gradients together and adds the tokens'
    rows into the head's gradient in place (`index_add_`). Same values as `nn.Embedding` without `max_norm`,
    `scale_grad_by_freq` or `sparse`: rows of `padding_idx` get no gradient from the embedding side."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, input_ids: torch.Tensor, padding_idx: int | None):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input_ids)
        ctx.padding_idx, ctx.weight_shape, ctx.weight_dtype = padding_idx, weight.shape, weight.dtype
        return F.embedding(input_ids, weight, padding_idx), weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_embeds: torch.Tensor | None, grad_head_weight: torch.Tensor | None):
        (input_ids,) = ctx.saved_tensors
        grad = grad_head_weight
        if grad_embeds is None:
            return grad, None, None
        ids = input_ids.reshape(-1)
        rows = grad_embeds.reshape(ids.shape[0], -1)
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((ids == ctx.padding_idx).unsqueeze(1), 0.0)
        if grad is None:
            grad = rows.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
        elif grad.requires_grad or grad._base is not None:  # a graph of the gradient, or a view: leave it alone
            grad = grad.clone()
        # (otherwise the head's gradient is a buffer of its own, from the fused loss or autograd's sum of several
        # uses: added to in place)
        return grad.index_add_(0, ids, rows.to(grad.dtype)), None, None


def is_plain_embedding(embedding: torch.nn.Module) -> bool:
    """An `nn.Embedding` itself (no subclass or adapter) without forward hooks, its own or every module's (a hook,
    e.g. transformers' `enable_input_require_grads`, must see the module called), and without the options that
    change its gradient: what [`TiedEmbeddingFunction`] computes exactly."""
    module = torch.nn.modules.module
    global_hooks = getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None)
    return (type(embedding) is torch.nn.Embedding and not global_hooks
            and not (embedding._forward_hooks or embedding._forward_pre_hooks)
            and not (embedding.sparse or embedding.scale_grad_by_freq or embedding.max_norm is not None))


def tied_embedding_and_head(embedding: torch.nn.Embedding, input_ids: torch.Tensor):
    """`(embedding(input_ids), weight)` through [`TiedEmbeddingFunction`], for a head tied to `embedding`."""
    return TiedEmbeddingFunction.apply(embedding.weight, input_ids, embedding.padding_idx)


__all__ = ["linear_cross_entropy", "LinearCrossEntropyFunction", "TiedEmbeddingFunction", "is_plain_embedding",
           "tied_embedding_and_head"]
