"""Score long token streams chunk by chunk with the recurrent cache: memory stays flat in the stream's length.

A TTT model's state has a fixed size, so a document of any length can be scored by feeding it in chunks and
carrying a [`TTTCache`] from one chunk to the next. The result is exactly what one forward over the whole
document gives (the chunk functions are exact at any split), without ever holding more than one chunk of
activations and logits:

```python
from modeling_ttt.streaming import score_stream

result = score_stream(model, token_ids, chunk_size=2048, position_buckets=[0, 1024, 4096, 16384, 65536])
result.perplexity, result.mean_nll, result.num_tokens
result.bucket_mean_nll  # loss vs. context length, per bucket of target positions
result.to_dict()        # JSON-ready summary for evaluation scripts
```

`TTTForCausalLM.stream(...)` is the same function as a method. Conventions:

* Token `t+1` is predicted from tokens `0..t`; its negative log-likelihood (natural log) is `token_nll[..., t]`.
  A document of `N` tokens therefore gives `N - 1` scores.
* The *position* of a score is the index of the predicted token (`1 .. N-1`), i.e. the number of tokens of
  context before it. `position_buckets` groups scores by that position (e.g. to plot loss vs. context length).
* A `[B, N]` input scores `B` documents of equal length side by side (one batched cache); totals add over rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import TTTCache
from .compat import resolve_cache

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency; keep the helper usable without it
    tqdm = None


@dataclass
class StreamScore:
    """Scores of a token stream (natural-log negative log-likelihoods).

    Attributes:
        total_nll: sum of the NLLs of all scored tokens (all rows).
        num_tokens: number of scored tokens (all rows): `B · (N - 1)`.
        token_nll: `[B, N - 1]` float32 per-token NLLs (`None` with `return_token_nll=False`).
        bucket_edges: `[start_0, start_1, …, end]` target-position edges of the buckets (empty without buckets);
            bucket `i` holds positions `start_i <= p < start_{i+1}`.
        bucket_nll: NLL sum per bucket; `bucket_count`: scored tokens per bucket.
        seconds: wall-clock time of the scoring loop.
    """

    total_nll: float
    num_tokens: int
    token_nll: torch.Tensor | None = None
    bucket_edges: list[int] = field(default_factory=list)
    bucket_nll: list[float] = field(default_factory=list)
    bucket_count: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_nll(self) -> float:
        """Average NLL per scored token (the usual LM loss, in nats)."""
        return self.total_nll / self.num_tokens if self.num_tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.num_tokens else float("nan")

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / math.log(2)

    @property
    def bucket_mean_nll(self) -> list[float]:
        return [s / c if c else float("nan") for s, c in zip(self.bucket_nll, self.bucket_count)]

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-token array)."""
        return {
            "num_tokens": self.num_tokens,
            "total_nll": self.total_nll,
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "seconds": self.seconds,
            "tokens_per_second": self.num_tokens / self.seconds if self.seconds > 0 else None,
            "buckets": [
                {"start": self.bucket_edges[i], "end": self.bucket_edges[i + 1], "count": self.bucket_count[i],
                 "mean_nll": self.bucket_mean_nll[i]}
                for i in range(len(self.bucket_count))
            ],
        }


def _bucket_edges(position_buckets: int | Sequence[int] | None, num_positions: int) -> list[int]:
    """Edges over target positions `1 .. num_positions - 1` (see the module docstring)."""
    if position_buckets is None:
        return []
    if isinstance(position_buckets, int):
        if position_buckets < 1:
            raise ValueError(f"position_buckets as an int is a bucket width and must be >= 1, got {position_buckets}.")
        edges = list(range(0, num_positions, position_buckets))
    else:
        edges = [int(e) for e in position_buckets]
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
            raise ValueError(f"position_buckets must be increasing non-negative starts, got {list(position_buckets)}.")
        edges = [e for e in edges if e < num_positions] or edges[:1]
    return edges + [max(num_positions, edges[-1] + 1)]


@torch.no_grad()
def score_stream(
    model,
    input_ids: torch.Tensor | Sequence[int],
    *,
    chunk_size: int = 2048,
    position_buckets: int | Sequence[int] | None = None,
    return_token_nll: bool = True,
    logits_chunk_size: int = 512,
    progress: bool = True,
    callback: Callable[[int, TTTCache], None] | None = None,
    cache: TTTCache | None = None,
    past_key_values: TTTCache | None = None,
) -> StreamScore:
    """Score a long token sequence chunk by chunk, carrying the recurrent cache.

    Args:
        model: a `TTTForCausalLM` (anything with `.model`, `.lm_head` and a TTT `.config`).
        input_ids: `[N]` or `[B, N]` token ids (tensor or list).
        chunk_size: tokens fed per forward. Any value gives the same scores; it only trades speed for memory.
        position_buckets: an int (bucket width) or a list of increasing bucket starts over target positions,
            e.g. `[0, 1024, 4096, 16384]`; `None` for no buckets.
        return_token_nll: keep the `[B, N-1]` per-token NLLs (4 bytes per token; the only output that grows with
            `N`).
        logits_chunk_size: positions whose logits are materialised at once (bounds the `[B, ·, vocab]` buffer).
        progress: show a tqdm progress bar (tokens).
        callback: called as `callback(tokens_done, cache)` after each chunk (e.g. to record memory).
        cache: a `TTTCache` to continue from (e.g. one that has read a prefix that is not scored); it is updated
            in place. `None` starts a fresh one. `past_key_values` is its older name (pass one of the two).

    Returns:
        A [`StreamScore`]: total / mean NLL, perplexity, token count, optional per-token NLLs and buckets.
    """
    if chunk_size < 1 or logits_chunk_size < 1:
        raise ValueError(f"chunk_size and logits_chunk_size must be >= 1, got {chunk_size}, {logits_chunk_size}.")
    device = model.lm_head.weight.device
    input_ids = torch.as_tensor(input_ids)
    if not (input_ids.dtype == torch.bool or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex):
        input_ids = input_ids.long()
    else:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype} (ids would be "
                         "truncated); convert with `.long()` if the values are whole numbers.")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N] or [B, N], got shape {tuple(input_ids.shape)}.")
    batch, length = input_ids.shape
    edges = _bucket_edges(position_buckets, length)
    bucket_nll = torch.zeros(max(len(edges) - 1, 0), dtype=torch.float64)
    bucket_count = torch.zeros(max(len(edges) - 1, 0), dtype=torch.long)
    edges_tensor = torch.tensor(edges, dtype=torch.long)
    token_nll = torch.empty(batch, max(length - 1, 0), dtype=torch.float32) if return_token_nll else None
    total_nll = torch.zeros((), dtype=torch.float64)

    cache = resolve_cache(cache, past_key_values)
    if cache is None:
        cache = TTTCache(model.config)
    elif not isinstance(cache, TTTCache):
        raise ValueError(f"cache must be a TTTCache, got {type(cache).__name__}.")
    bar = None
    if tqdm is not None:
        bar = tqdm(total=batch * length, unit="tok", unit_scale=True, desc="scoring", disable=not progress)
    start_time = time.perf_counter()
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        chunk = input_ids[:, start:stop].to(device)
        hidden = model.model(input_ids=chunk, cache=cache, use_cache=True).last_hidden_state
        # Position start+i predicts token start+i+1; the stream's last position predicts nothing.
        num_scored = min(stop, length - 1) - start
        for offset in range(0, num_scored, logits_chunk_size):
            end = min(offset + logits_chunk_size, num_scored)
            logits = model.lm_head(hidden[:, offset:end]).float()
            targets = input_ids[:, start + offset + 1 : start + end + 1].to(device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            nll = nll.view(batch, end - offset).cpu()
            total_nll += nll.double().sum()
            if token_nll is not None:
                token_nll[:, start + offset : start + end] = nll
            if len(edges) > 1:
                positions = torch.arange(start + offset + 1, start + end + 1)
                index = torch.bucketize(positions, edges_tensor, right=True) - 1
                inside = (index >= 0) & (index < len(edges) - 1)
                bucket_nll.index_add_(0, index[inside], nll.double().sum(0)[inside])
                bucket_count.index_add_(0, index[inside], torch.full_like(index[inside], batch))
        if bar is not None:
            bar.update(batch * (stop - start))
        if callback is not None:
            callback(stop, cache)
    if bar is not None:
        bar.close()
    return StreamScore(
        total_nll=float(total_nll),
        num_tokens=batch * max(length - 1, 0),
        token_nll=token_nll,
        bucket_edges=edges if len(edges) > 1 else [],
        bucket_nll=bucket_nll.tolist(),
        bucket_count=bucket_count.tolist(),
        seconds=time.perf_counter() - start_time,
    )


__all__ = ["StreamScore", "score_stream"]
