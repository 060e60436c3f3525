"""C++ CPU kernels for decoding (`ttt_decode.cpp`), used under `ttt_impl="cpp"` (and `"auto"` on the CPU):

* `ttt_linear` here: [`modeling_ttt.ops.reference.ttt_linear`] with its one-token steps (no autograd) run by the
  `ttt_linear_decode` kernel; everything else (prefill, training, padding, other dtypes) is the reference itself.
  TTT-MLP has no kernel (`ttt_mlp` is the reference's).
* `torch.ops.modeling_ttt_cpu.ttt_linear_decode_blocks`: consecutive TTT-Linear blocks' one-token step,
  projections included — every block in one call (`TTTModel.fused_decode_plan`, taken when all blocks are the plain
  modules without hooks), or one block (`TTTBlock.fused_decode_step`, when the plan cannot run). For up to 8 rows
  its projections are its own matrix-vector loops, one parallel loop per group of products that share an input
  (BLAS above 8 rows, where a GEMM reuses each weight);
  `ttt_linear_decode_layer`: the layer step between its projections
  (`TTTLinear.fused_decode_step`, e.g. with PEFT adapters on the projections); `rms_norm` and `conv_step` for the
  RMSNorms and causal convs.

Why: decoding a small model on a CPU spends more time launching PyTorch's small kernels (~50 per layer and token)
than computing them; each C++ kernel does the same arithmetic in one call. `tests/test_ops_cpu.py` holds them to
the reference.

The kernels are compiled on first use with `torch.utils.cpp_extension` (a C++ compiler and `ninja` are needed;
about 15 s, once per machine: torch caches the build under `~/.cache/torch_extensions`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys

import torch
from transformers.utils import logging

from .. import reference
from ..reference import LAYER_NORM_EPS, InnerState

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ttt_decode.cpp")
_DTYPES = (torch.float32, torch.float64)
logger = logging.get_logger(__name__)


def _build_name() -> str:
    """The build is tuned for this CPU (`-march=native`), so its cached name says which CPU: a home directory
    shared by different machines then never loads a build made for another instruction set."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    digest = hashlib.sha1(f"{platform.machine()} {platform.processor()} {flags}".encode()).hexdigest()[:10]
    return f"modeling_ttt_cpu_{digest}"


@functools.lru_cache(maxsize=1)
def build_error() -> str | None:
    """Build and load the kernel once per process; `None` when it is ready, else why it is not."""
    try:
        from torch.utils import cpp_extension

        name = _build_name()
        built = os.path.join(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so")
        if not os.path.exists(built):
            logger.warning_once("modeling_ttt: compiling the C++ CPU decoding kernel (once per machine, ~15 s).")
        # tuned for this CPU where the flag is known to work (x86-64 gcc/clang); plain -O3 elsewhere
        flags = ["-O3", "-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-O3"]
        # OpenMP (the runtime torch itself uses on Linux): without it at::parallel_for runs on one thread
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        cpp_extension.load(name=name, sources=[_SOURCE], extra_cflags=flags + openmp, extra_ldflags=openmp,
                           is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: reported by the callers
        return f"{type(error).__name__}: {error}".strip()
    return None


def decodes(xq: torch.Tensor, num_tokens: torch.Tensor | None, *tensors: torch.Tensor) -> bool:
    """Whether a `ttt_linear` call is one the kernel handles: one token per row, CPU, float32/64 outside autocast,
    and no autograd through any of `tensors` (the other inputs)."""
    if xq.dim() != 4 or xq.shape[2] != 1 or num_tokens is not None or xq.shape[0] == 0:
        return False
    if xq.device.type != "cpu" or xq.dtype not in _DTYPES or torch.is_autocast_enabled("cpu"):
        return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in (xq, *tensors))


def ttt_linear(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    token_scale: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    state: InnerState,
    num_tokens: torch.Tensor | None = None,
    checkpoint_group: int = 0,
) -> tuple[torch.Tensor, InnerState]:
    """[`modeling_ttt.ops.reference.ttt_linear`], with decoding steps run by the C++ kernel."""
    if not decodes(xq, num_tokens, xk, xv, inner_lr, token_scale, ln_weight, ln_bias, *state.weights, *state.grads):
        return reference.ttt_linear(xq, xk, xv, inner_lr, token_scale, ln_weight, ln_bias, state, num_tokens,
                                    checkpoint_group)
    error = build_error()
    if error is not None:
        raise RuntimeError(f"The C++ CPU decoding kernel of modeling_ttt could not be built ({error}); use "
                           "ttt_impl='torch' (or 'auto', which then uses the PyTorch reference).")
    outputs = torch.ops.modeling_ttt_cpu.ttt_linear_decode(xq, xk, xv, inner_lr, token_scale, ln_weight, ln_bias,
                                                           *state.weights, *state.grads, state.seen, LAYER_NORM_EPS)
    return outputs[0], state_after(state, outputs[1:])


def state_after(state: InnerState, kernel_state: list[torch.Tensor]) -> InnerState:
    """The inner state after one decoded token, from the tail every kernel here returns: `[G_W, G_b]`, plus
    `[W0, b0]` when some row ended its mini-batch (otherwise `W0, b0` are unchanged and shared with `state`)."""
    weights = tuple(kernel_state[2:]) or state.weights
    return InnerState(weights, tuple(kernel_state[:2]), state.seen + 1)


ttt_mlp = reference.ttt_mlp  # TTT-MLP decodes with the reference

__all__ = ["ttt_linear", "ttt_mlp", "build_error", "decodes", "state_after"]
