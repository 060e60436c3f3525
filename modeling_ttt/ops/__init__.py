"""Inner-loop math of TTT layers as pure functions over tensors (see `reference.py`, the spec)."""

from .reference import InnerState, ttt_linear, ttt_mlp, ttt_sequential

__all__ = ["InnerState", "ttt_linear", "ttt_mlp", "ttt_sequential"]
