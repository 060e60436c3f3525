"""Inner-loop math of TTT layers as pure functions over tensors (see `reference.py`, the spec), and the choice
between the reference, the fused Triton kernels and the C++ CPU decoding kernels (`get_ttt_ops`).
The spec proper is `naive.py` (primal and dual forms, plain loops): every backend, reference.py too, is held to it."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
from transformers.utils import logging

from .reference import InnerState, ttt_linear, ttt_mlp, ttt_sequential
from . import cpu  # (builds nothing at import)

#: Environment variable that overrides `config.ttt_impl` (for benchmarking): "torch", "triton", "cpp" or "auto".
TTT_IMPL_ENV = "TTT_IMPL"
_IMPLEMENTATIONS = ("torch", "triton", "cpp", "auto")
_REFERENCE_OPS = {"linear": ttt_linear, "mlp": ttt_mlp}
logger = logging.get_logger(__name__)


def triton_available() -> bool:
    """Whether the `triton` package can be imported (without importing it)."""
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
    if requested not in _IMPLEMENTATIONS:
        source = f"environment variable {TTT_IMPL_ENV}" if os.environ.get(TTT_IMPL_ENV) else "ttt_impl"
        raise ValueError(f"{source} must be one of {_IMPLEMENTATIONS}, got {requested!r}.")
    device = torch.device(device)
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
    error = cpu.known_build_error()
    if error is not None and warn:
        _warn_cpp_unavailable(error)
    return error is None


def _warn_cpp_unavailable(error: str) -> None:
    logger.warning_once(f"modeling_ttt: the C++ CPU decoding kernels could not be built ({error}); decoding on the "
                        "CPU uses the slower PyTorch reference. Set TTT_IMPL=torch to skip the attempt.")


def _cpp_build_failure(error: str | None) -> RuntimeError:
    return RuntimeError(f"ttt_impl='cpp': the C++ CPU decoding kernels could not be built ({error}); they need a "
                        "C++ compiler and `ninja`. Use ttt_impl='torch' or 'auto'.")


def cpp_kernels_apply(impl: str, *tensors: torch.Tensor) -> bool:
    """Whether the C++ CPU kernels (`modeling_ttt.ops.cpu`: the decoding step, RMSNorm, the causal-conv step)
    run for these tensors: `impl` resolves to "cpp", the tensors are float32/64 on the CPU, and no autograd
    runs through them. Layers ask on every token, so the resolution is remembered per environment."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled("cpu"):  # autocast decides each op's dtype; the kernels keep their inputs'
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if not _resolves_to_cpp(impl, os.environ.get(TTT_IMPL_ENV)):
        return False
    error = cpu.build_error()  # a kernel is about to run: build it now (once per process)
    if error is None:
        return True
    if (os.environ.get(TTT_IMPL_ENV) or impl) == "cpp":
        raise _cpp_build_failure(error)
    _warn_cpp_unavailable(error)
    return False


@functools.lru_cache(maxsize=16)
def _resolves_to_cpp(impl: str, environment: str | None) -> bool:
    return resolve_ttt_impl(impl, "cpu") == "cpp"


def get_ttt_ops(impl: str, layer_type: str, device: torch.device | str, head_dim: int | None = None) -> Callable:
    """The inner-loop function (signature of `reference.ttt_linear` / `ttt_mlp`) for `layer_type` ("linear" or
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


__all__ = ["InnerState", "ttt_linear", "ttt_mlp", "ttt_sequential", "get_ttt_ops", "resolve_ttt_impl", "cpp_kernels_apply",
           "triton_available", "TTT_IMPL_ENV"]
