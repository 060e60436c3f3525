"""Recurrent cache of a TTT model: each layer's inner-model state and causal-conv states. It stores; it computes
nothing (the layers read it before and write it after their ops call).

Its size depends on the batch and the config, never on the number of tokens seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from .ops import InnerState


@dataclass
class TTTCacheLayer:
    """State of one TTT block. `inner_state` is `None` until the first forward fills it."""

    inner_state: InnerState | None = None
    conv_states: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, K-1, C]

    def tensors(self) -> list[torch.Tensor]:
        if self.inner_state is None:
            return list(self.conv_states.values())
        state = self.inner_state
        return [*state.weights, *state.grads, state.seen, *self.conv_states.values()]

    def map(self, fn) -> None:
        """Apply `fn` to every stored tensor along its batch axis (axis 0)."""
        if self.inner_state is not None:
            state = self.inner_state
            self.inner_state = InnerState(
                tuple(fn(w) for w in state.weights), tuple(fn(g) for g in state.grads), fn(state.seen)
            )
        self.conv_states = {name: fn(t) for name, t in self.conv_states.items()}


class TTTCache(Cache):
    """`past_key_values` of [`TTTForCausalLM`]: per layer the inner weights `W₀` (+ biases), the pending gradient
    sums of the unfinished mini-batch, each row's token counter and the conv states.

    Create it empty (`TTTCache(config)`); the first forward fills it for that batch. Memory does not grow with
    the number of tokens.

    Two counters: `seen_tokens()` is the number of *real* tokens each row has consumed (what the math uses);
    `get_seq_length()` is the number of positions (columns of the, possibly padded, input) fed so far, which is
    how `generate()` slices the inputs and the attention mask when it continues from this cache.
    """

    is_compileable = False

    def __init__(self, config):
        super().__init__(layers=[TTTCacheLayer() for _ in range(config.num_hidden_layers)])
        self.config_signature = _config_signature(config)
        self.num_rows: int | None = None
        self.num_positions = 0  # columns fed so far, padding included (see `get_seq_length`)

    # -- what the model uses ----------------------------------------------------------------------------------

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise a clear error when this cache cannot continue for `config` and this batch."""
        signature = _config_signature(config)
        if signature != self.config_signature:
            differing = [k for k in signature if signature[k] != self.config_signature.get(k)]
            raise ValueError(
                "This TTTCache was built for another model config (differs in: " + ", ".join(differing) + ")."
            )
        if self.is_initialized and self.num_rows != batch_size:
            raise ValueError(
                f"This TTTCache holds state for a batch of {self.num_rows} rows, but the input has {batch_size} rows."
                " Use a new cache, or `batch_select_indices` / `batch_repeat_interleave` to reshape it."
            )

    def advance(self, batch_size: int, num_positions: int) -> None:
        """After a forward of `num_positions` columns over `batch_size` rows (the layers have stored their states)."""
        self.num_rows = batch_size
        self.num_positions += num_positions

    @property
    def is_initialized(self) -> bool:
        return self.layers[0].inner_state is not None

    def seen_tokens(self) -> torch.Tensor | None:
        """[B] tokens consumed by each row, or None before the first forward."""
        return self.layers[0].inner_state.seen if self.is_initialized else None

    # -- transformers Cache API --------------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions fed so far, padding included: the width of the attention mask that covers the past. Equal
        to the token count when there is no padding; `seen_tokens()` has the real tokens per row."""
        return self.num_positions

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the state has a fixed size

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.is_initialized

    @property
    def max_batch_size(self) -> int | None:
        return self.num_rows

    @property
    def batch_size(self) -> int | None:
        """Rows the state holds (None before the first forward)."""
        return self.num_rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row `i` of the new state is row `beam_idx[i]` of the old one."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.map(lambda t: t.index_select(0, indices.to(t.device)))
        if self.is_initialized:
            self.num_rows = int(indices.numel())

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.map(lambda t: t.repeat_interleave(repeats, dim=0))
        if self.num_rows is not None:
            self.num_rows *= repeats

    def reset(self) -> None:
        for layer in self.layers:
            layer.inner_state = None
            layer.conv_states = {}
        self.num_rows = None
        self.num_positions = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "A TTT cache cannot be cropped: its state is a model updated by every token, and earlier states are not "
            "kept. Re-run the prefix instead."
        )

    def activate_past_recording(self, *args, **kwargs) -> None:
        """Speculative decoding's hook (transformers ≥ 5.25) to record states to roll back to: a TTT cache keeps
        none (`TTTForCausalLM.generate` refuses those modes first; this guards other callers)."""
        raise ValueError(
            "A TTT cache cannot record past states to roll back to (assisted / prompt-lookup decoding): its state is "
            "a model updated by every token. Decode without a draft model."
        )

    def to(self, device=None, dtype=None) -> "TTTCache":
        """Move the state; `dtype` applies to floating tensors only (the token counters stay int64)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        for layer in self.layers:
            layer.map(move)
        return self

    def nbytes(self) -> int:
        """Bytes held by the state (constant in the number of tokens)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"TTTCache(layers={len(self.layers)}, batch_size={self.num_rows}, positions={self.num_positions}, "
                f"seen={self.seen_tokens().tolist() if self.is_initialized else None})")


def _config_signature(config) -> dict:
    return {
        name: getattr(config, name)
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "ttt_layer_type", "mini_batch_size",
                     "pre_conv", "share_qk", "conv_kernel")
    }
