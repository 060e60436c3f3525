"""Inner-loop math of TTT layers as pure functions over tensors, and the choice of backend — the PyTorch ops, the
fused Triton kernels or the C++ CPU kernels (decoding, TTT-Linear's training scan) — made once per forward
(`get_backend`).

Rooms: `naive.py` the spec (primal and dual forms, plain loops; every backend is held to it), `state.py` the inner
state and the precision rule, `frame.py` the padding layout the chunk backends share, `torch_chunk.py` the PyTorch
backend (with `linear_scan.py`, its TTT-Linear training scan as one autograd function), `triton/` the fused GPU
kernels, `cpu/` the C++ kernels (decoding, the one-call model step, the training scan)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.utils import logging

from .state import InnerLoopParams, InnerState
from .torch_chunk import ttt_linear, ttt_mlp
try:  # the kernels: left out of the remote-code copy saved with a model (`modeling_ttt.hub`), which runs the
    # PyTorch ops only (then `cpu` is None, and "auto" resolves to "torch")
    from . import cpu  # (builds nothing at import)
    from .cpu import plan as cpu_plan
except ImportError:
    cpu = cpu_plan = None

#: Environment variable that overrides `config.ttt_impl` (for benchmarking): "torch", "triton", "cpp" or "auto".
TTT_IMPL_ENV = "TTT_IMPL"
#: The values of `TTTConfig.ttt_impl` (and of `TTT_IMPL`).
TTT_IMPLEMENTATIONS = ("torch", "triton", "cpp", "auto")
_REFERENCE_OPS = {"linear": ttt_linear, "mlp": ttt_mlp}
logger = logging.get_logger(__name__)


def triton_available() -> bool:
    """Whether the `triton` package can be imported (without importing it), and the kernels are here."""
    if cpu is None:  # the remote-code copy, without the kernel subpackages
        return False
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. a `triton` entry of None in sys.modules (import blocked)
        return False


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_ttt_impl(impl: str, device: torch.device | str) -> str:
    """`"torch"`, `"triton"` or `"cpp"` for a requested implementation on `device`.

    The `TTT_IMPL` environment variable, when set, replaces `impl`. `"auto"` picks Triton when the tensors are on
    a CUDA device and Triton is installed, the C++ decoding kernel (`modeling_ttt.ops.cpu`) on the CPU when it
    builds, else the PyTorch reference (`get_ttt_ops` also checks the head size). An explicit `"triton"` or
    `"cpp"` that cannot run raises `RuntimeError` saying why; it never falls back silently.

    Nothing is compiled here: `"cpp"` means the C++ kernels are not known to fail (no missing compiler, no failed
    attempt in this process); they are built where one first runs (`cpp_kernels_apply`).
    """
    requested = os.environ.get(TTT_IMPL_ENV) or impl
    if requested not in TTT_IMPLEMENTATIONS:
        source = f"environment variable {TTT_IMPL_ENV}" if os.environ.get(TTT_IMPL_ENV) else "ttt_impl"
        raise ValueError(f"{source} must be one of {TTT_IMPLEMENTATIONS}, got {requested!r}.")
    device = torch.device(device)
    if cpu is None and requested in ("cpp", "triton"):
        raise RuntimeError(f"ttt_impl={requested!r}: this copy of the TTT modeling code (saved with the model, loaded "
                           "with trust_remote_code) has the PyTorch ops only; pip install modeling-ttt for the "
                           "kernels, or use ttt_impl='torch' / 'auto'.")
    if requested == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpp" if device.type == "cpu" and _cpp_kernel_ready(warn=True) else "torch"
    if requested == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"ttt_impl='cpp' is a CPU kernel, but the tensors are on {device.type!r}; use "
                               "ttt_impl='auto' or 'torch'.")
        if not _cpp_kernel_ready(warn=False):
            raise _cpp_build_failure(cpu.known_build_error())
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("ttt_impl='triton' needs the `triton` package, which is not installed "
                               "(pip install 'modeling-ttt[triton]'), or use ttt_impl='torch' / 'auto'.")
        if device.type == "cpu" and not _triton_interpreter_on():
            raise RuntimeError("ttt_impl='triton' got tensors on the CPU: the Triton kernels need a CUDA device "
                               "(or TRITON_INTERPRET=1 for Triton's slow CPU interpreter); use ttt_impl='torch' "
                               "or 'auto' on CPU.")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"ttt_impl='triton' does not support tensors on {device.type!r} devices.")
    return requested


def _cpp_kernel_ready(warn: bool) -> bool:
    """The C++ kernels are built or may still build (known without building)."""
    if cpu is None:  # the remote-code copy, without the kernels: nothing to warn about
        return False
    error = cpu.known_build_error()
    if error is not None and warn:
        _warn_cpp_unavailable(error)
    return error is None


def _warn_cpp_unavailable(error: str) -> None:
    logger.warning_once(f"modeling_ttt: the C++ CPU kernels could not be built ({error}); decoding and training on "
                        "the CPU use the slower PyTorch reference. Set TTT_IMPL=torch to skip the attempt.")


def _cpp_build_failure(error: str | None) -> RuntimeError:
    return RuntimeError(f"ttt_impl='cpp': the C++ CPU kernels could not be built ({error}); they need a "
                        "C++ compiler and `ninja`. Use ttt_impl='torch' or 'auto'.")


def get_ttt_ops(impl: str, layer_type: str, device: torch.device | str, head_dim: int | None = None) -> Callable:
    """The inner-loop function (signature of `torch_chunk.ttt_linear` / `ttt_mlp`) for `layer_type` ("linear" or
    "mlp") with implementation `impl` ("torch", "triton", "cpp" or "auto", see `resolve_ttt_impl`) on `device`.

    With `head_dim` given, `"auto"` also falls back to the reference for head sizes the kernels do not handle
    (`modeling_ttt.ops.triton.MAX_HEAD_DIM`); an explicit `"triton"` raises `NotImplementedError` for them."""
    if layer_type not in _REFERENCE_OPS:
        raise ValueError(f"layer_type must be one of {tuple(_REFERENCE_OPS)}, got {layer_type!r}.")
    resolved = resolve_ttt_impl(impl, device)
    if resolved == "torch":
        return _REFERENCE_OPS[layer_type]
    if resolved == "cpp":
        if layer_type == "mlp":
            return cpu.ttt_mlp
        return cpu.ttt_linear if (os.environ.get(TTT_IMPL_ENV) or impl) == "cpp" else cpu.ttt_linear_or_reference
    from . import triton as triton_ops  # imported only here: `import triton` is slow and optional

    requested = os.environ.get(TTT_IMPL_ENV) or impl
    if requested == "auto" and head_dim is not None and not triton_ops.supports(layer_type, head_dim):
        return _REFERENCE_OPS[layer_type]
    return {"linear": triton_ops.ttt_linear, "mlp": triton_ops.ttt_mlp}[layer_type]


@dataclass(frozen=True)
class Backend:
    """What the layers and the model run for one forward, resolved once (`get_backend`).

    name: "torch", "triton" or "cpp".
    inner_loop: the chunk function of the layer type (the signature of `torch_chunk.ttt_linear` / `ttt_mlp`).
    model_step: `(model, hidden_states [B, 1, C], cache) -> hidden_states | None`, a one-token step through all
        blocks in one call, or None when the backend has none; it returns None itself where it cannot run (then
        the model runs its blocks).
    """

    name: str
    inner_loop: Callable
    model_step: Callable | None = None


def get_backend(impl: str, layer_type: str, device: torch.device | str, head_dim: int | None = None) -> Backend:
    """The backend for `ttt_impl=impl` on `device` (see `resolve_ttt_impl`, `get_ttt_ops`)."""
    inner_loop = get_ttt_ops(impl, layer_type, device, head_dim)
    name = resolve_ttt_impl(impl, device)
    model_step = cpu_plan.decode_step if name == "cpp" and layer_type == "linear" else None
    return Backend(name, inner_loop, model_step)


__all__ = ["Backend", "InnerLoopParams", "InnerState", "TTT_IMPLEMENTATIONS", "TTT_IMPL_ENV", "get_backend",
           "get_ttt_ops", "resolve_ttt_impl", "triton_available", "ttt_linear", "ttt_mlp"]
