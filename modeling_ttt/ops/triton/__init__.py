"""Fused Triton kernels of the TTT inner loop (same signatures as `modeling_ttt.ops.torch_chunk`).

Importing this package needs `triton`; `modeling_ttt.ops.get_ttt_ops` imports it only when the Triton
implementation is asked for. On CPU the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`, set
before this package is imported), which the tests use.
"""

from .interface import MAX_HEAD_DIM, supports, ttt_linear, ttt_mlp

__all__ = ["ttt_linear", "ttt_mlp", "supports", "MAX_HEAD_DIM"]
