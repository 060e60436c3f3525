"""Per-token negative log-likelihoods of one document, for any causal LM, the way that model is meant to read it.

* A TTT model streams the document through its recurrent cache in chunks (`TTTForCausalLM.stream`): exact (the
  same scores as one forward over the whole document), memory flat in the document's length, no window.
* Any other model (Llama, Mamba2, ...) reads the document in one forward if it fits in the model's positions
  (`config.max_position_embeddings`; recurrent models such as Mamba2 have no limit), else in a sliding window:
  windows of `window` tokens, each starting `stride` tokens after the one before, in which only the tokens no
  earlier window scored are scored; the rest of the window is context. Every token is scored exactly once.

The scores are those of the predicted tokens `1 .. N-1` of an `N`-token document (`token_nll[i]` scores token
`i + 1`), in float32, natural log.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import EvaluationError, is_ttt_model, max_positions

#: How a document was read (recorded in the outputs).
STREAM, ONE_PASS, SLIDING_WINDOW = "stream", "one-pass", "sliding-window"


@dataclass(frozen=True)
class ScoringPlan:
    """How to score documents with one model: `method` for documents longer than `window` (`None`: unbounded)."""

    window: int | None
    stride: int | None
    chunk_size: int

    def method_for(self, model, length: int) -> str:
        if is_ttt_model(model):
            return STREAM
        return ONE_PASS if self.window is None or length <= self.window else SLIDING_WINDOW


def scoring_plan(model, window: int | None = None, stride: int | None = None, chunk_size: int = 2048
                 ) -> ScoringPlan:
    """The plan for `model`: `window` defaults to the model's positions, `stride` to half the window."""
    if chunk_size < 1:
        raise EvaluationError(f"--chunk-size must be >= 1, got {chunk_size}.")
    if is_ttt_model(model):
        return ScoringPlan(None, None, chunk_size)
    limit = max_positions(model)
    window = window or limit
    if window is not None:
        if window < 2:
            raise EvaluationError(f"--window must be >= 2, got {window}.")
        if limit is not None and window > limit:
            raise EvaluationError(f"--window {window} is longer than the model's {limit} positions "
                                  "(config.max_position_embeddings).")
        stride = stride or max(1, window // 2)
        if not 1 <= stride <= window - 1:
            raise EvaluationError(f"--stride must be in [1, window - 1] = [1, {window - 1}], got {stride}.")
    return ScoringPlan(window, stride, chunk_size)


def _logits_nll(model, input_ids: torch.Tensor, first_target: int) -> torch.Tensor:
    """NLLs of `input_ids[1:]` from one forward over `input_ids` (`[N]`), from target index `first_target` on."""
    device = model.get_input_embeddings().weight.device
    logits = model(input_ids=input_ids[None].to(device), use_cache=False).logits[0, first_target - 1 : -1]
    targets = input_ids[first_target:].to(device)
    return F.cross_entropy(logits.float(), targets, reduction="none").cpu()


@torch.no_grad()
def document_token_nll(model, input_ids: torch.Tensor, plan: ScoringPlan) -> tuple[torch.Tensor, str]:
    """`(token_nll [N-1] float32, method)` for one `[N]` document (see the module docstring)."""
    length = len(input_ids)
    method = plan.method_for(model, length)
    if length < 2:
        return torch.zeros(0), method
    if method == STREAM:
        score = model.stream(input_ids, chunk_size=plan.chunk_size, return_token_nll=True, progress=False)
        return score.token_nll[0], method
    if method == ONE_PASS:
        return _logits_nll(model, input_ids, 1), method
    pieces = []
    scored_until = 1  # targets before this index have been scored (token 0 is never a target)
    begin = 0
    while scored_until < length:
        end = min(begin + plan.window, length)
        # the window's tokens before `scored_until` are context only
        pieces.append(_logits_nll(model, input_ids[begin:end], scored_until - begin))
        scored_until = end
        begin += plan.stride
    return torch.cat(pieces), method


def describe_method(method: str, plan: ScoringPlan) -> str:
    if method == SLIDING_WINDOW:
        return f"sliding window {plan.window}, stride {plan.stride}"
    if method == STREAM:
        return f"streamed through the cache, chunks of {plan.chunk_size}"
    return "one forward"


__all__ = ["ONE_PASS", "SLIDING_WINDOW", "STREAM", "ScoringPlan", "describe_method", "document_token_nll",
           "scoring_plan"]
