"""C++ CPU kernels for decoding (`ttt_decode.cpp`) and for training TTT-Linear (`ttt_scan.cpp`), used under
`ttt_impl="cpp"` (and `"auto"` on the CPU):

* `ttt_linear` here: [`modeling_ttt.ops.torch_chunk.ttt_linear`] with its one-token steps (no autograd) run by the
  `ttt_linear_decode` kernel, and under autograd its scan over whole mini-batches (`linear_scan.py`) run by the
  `ttt_linear_scan_forward` / `_backward` kernels; everything else (prefill, padding, other dtypes) is the
  reference itself. TTT-MLP has no kernel (`ttt_mlp` is the reference's).
* `plan.decode_step`: a whole model's one-token step, every TTT-Linear block with its projections, norms and convs
  in one call (`ttt_linear_decode_blocks`), when the blocks are the plain modules without hooks. For up to 8 rows
  its projections are its own matrix-vector loops, one parallel loop per group of products that share an input
  (BLAS above 8 rows, where a GEMM reuses each weight).

Why: decoding a small model on a CPU is bound by memory and by the number of PyTorch kernel launches (~50 per layer
and token), not by arithmetic; each kernel does the same arithmetic in one call. The training scan likewise is ~20
small products and LayerNorm passes per mini-batch in PyTorch; the kernel keeps each row's weights and adjoints in
the core's caches. `tests/test_ops_cpu.py` and `tests/test_ops_linear_scan.py` hold them to the reference, the spec
and the module path.

The kernels are compiled with `torch.utils.cpp_extension` at the first step that runs one (a one-token CPU step
without autograd, or a TTT-Linear forward under autograd on the CPU; a C++ compiler and `ninja` are needed), once
per machine and build key (`build_name`): torch caches the build under `~/.cache/torch_extensions` (or
`TORCH_EXTENSIONS_DIR`). Concurrent processes wait for one build; a build that cannot finish (killed part-way, no
compiler, a compile error, another process building for longer than `BUILD_WAIT_SECONDS`) is reported in one line,
and `ttt_impl="auto"` then decodes and trains with the reference.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time

import torch
from transformers.utils import logging

from .. import torch_chunk
from ..state import LAYER_NORM_EPS, InnerLoopParams, InnerState

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised between processes
    fcntl = None

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ttt_decode.cpp")
_SCAN_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ttt_scan.cpp")
_HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lanes.h")  # included by both sources


def _sources() -> tuple[str, str]:
    """The compiled sources (read at call time: tests swap `_SOURCE`)."""
    return _SOURCE, _SCAN_SOURCE


#: The per-block parameters of `ttt_linear_decode_blocks`, in the order of `BlockParam` in ttt_decode.cpp (the
#: loaded kernels are checked against this; `plan.block_arguments` gathers them).
BLOCK_PARAMETERS = (
    "pre_norm_weight", "pre_conv_weight", "pre_conv_bias", "seq_norm_weight", "q", "k", "v", "g", "o",
    "lr_weight", "lr_bias", "conv_q_weight", "conv_q_bias", "conv_k_weight", "conv_k_bias", "rope", "token_idx",
    "learnable_token_idx", "ttt_norm_weight", "ttt_norm_bias", "post_norm_weight", "post_norm_bias",
    "ffn_norm_weight", "gate", "up", "down",
)
_DTYPES = (torch.float32, torch.float64)
#: How long a process waits for another one that is building the same kernels before it gives up (seconds).
BUILD_WAIT_SECONDS = 300.0
logger = logging.get_logger(__name__)


def _compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) of the build."""
    # tuned for this CPU where the flag is known to work (x86-64 gcc/clang); plain -O3 elsewhere
    flags = ["-O3", "-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-O3"]
    # OpenMP (the runtime torch itself uses on Linux): without it at::parallel_for runs on one thread
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return flags + openmp, openmp


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def build_name() -> str:
    """The extension's name, which is also its build folder under torch's extensions directory
    (`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions/<python>_<device>/`). It is keyed by everything
    that makes two builds differ — the CPU it is tuned for (`-march=native`), torch's version, the Python ABI, the
    compiler and its flags, and the source — so virtualenvs and machines sharing a home directory never rebuild or
    load each other's builds. The source file's location and torch's are in the key too: torch's build file
    records both paths, so two checkouts (or virtualenvs) sharing one folder would rebuild it on every switch."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        cpu_flags = ""
    digest = hashlib.sha1()
    for path in (*_sources(), _HEADER):
        with open(path, "rb") as source:
            digest.update(source.read())
    source_hash = digest.hexdigest()
    key = [platform.machine(), platform.processor(), cpu_flags, torch.__version__, sys.implementation.cache_tag,
           sysconfig.get_config_var("EXT_SUFFIX") or "", _compiler(), repr(_compile_flags()), source_hash,
           *map(os.path.realpath, _sources()), os.path.realpath(os.path.dirname(torch.__file__))]
    return "modeling_ttt_cpu_" + hashlib.sha1("\n".join(key).encode()).hexdigest()[:12]


def _missing_tools() -> str | None:
    """Why a build cannot even start (no compiler, no ninja), checked without building."""
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler: `{_compiler()}` is not on PATH (set CXX to use another)"
    try:
        subprocess.run(["ninja", "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "`ninja` is not installed or does not run (pip install ninja)"
    return None


@contextlib.contextmanager
def _build_lock(directory: str):
    """Hold `directory/build.flock` while building: other processes wait for it (at most BUILD_WAIT_SECONDS), and
    the operating system releases it when its holder dies, so a killed build never blocks later ones. Raises
    TimeoutError when another process keeps building for longer than that."""
    os.makedirs(directory, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(os.path.join(directory, "build.flock"), "a") as handle:
        deadline = time.monotonic() + BUILD_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building the C++ kernels in {directory} for "
                                       f"over {BUILD_WAIT_SECONDS:.0f} s") from None
                time.sleep(0.2)
        try:
            # torch's own `lock` file is only ever held by a build inside this flock: one that exists now was left
            # by a build that was killed (torch would wait for it forever)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, "lock"))
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_NOT_TRIED = "not tried"
_build_result: str | None = _NOT_TRIED  # what `build_error` found in this process


def build_error() -> str | None:
    """Build (first time on this machine) and load the kernels, once per process; `None` when they are ready,
    else why they are not, in one line. Called only where a kernel is about to run (a one-token CPU step without
    autograd, a TTT-Linear training forward), never at import or for a prefill."""
    global _build_result
    if _build_result is _NOT_TRIED:
        _build_result = _build()
    return _build_result


def _build() -> str | None:
    missing = _missing_tools()
    if missing is not None:
        return missing
    try:
        from torch.utils import cpp_extension

        name = build_name()
        directory = cpp_extension._get_build_directory(name, verbose=False)
        library = os.path.join(directory, f"{name}.so")
        cflags, ldflags = _compile_flags()
        with _build_lock(directory):
            if not os.path.exists(library):
                logger.warning_once(f"modeling_ttt: compiling the C++ CPU kernels (first decoding or training step "
                                    f"on this machine; usually 15-60 s, then cached in {directory}).")
            cpp_extension.load(name=name, sources=list(_sources()), extra_cflags=cflags, extra_ldflags=ldflags,
                               build_directory=directory, is_python_module=False, verbose=False)
        names = tuple(torch.ops.modeling_ttt_cpu.block_parameter_names())
        if names != BLOCK_PARAMETERS:
            return f"the kernels' block parameters {names} differ from BLOCK_PARAMETERS {BLOCK_PARAMETERS}"
    except Exception as error:  # a failed build, a timeout: reported by the callers in one line
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        compiler_error = next((line for line in lines if "error:" in line), None)  # the compiler's own words
        if compiler_error is not None:
            source = next((path for path in _sources() if path in compiler_error), _sources()[0])
            return f"compiling {source} failed: {compiler_error}"
        return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
    return None


def known_build_error() -> str | None:
    """What `build_error` would say, when that is known without building: missing tools, or an attempt of this
    process that failed. `None` when the kernels are built or may still build."""
    if _build_result is not _NOT_TRIED:
        return _build_result
    return _missing_tools_cached()


@functools.lru_cache(maxsize=1)
def _missing_tools_cached() -> str | None:
    return _missing_tools()


def decodes(xq: torch.Tensor, num_tokens: torch.Tensor | None, *tensors: torch.Tensor) -> bool:
    """Whether a `ttt_linear` call is one the kernel handles: one token per row, CPU, float32/64 outside autocast,
    and no autograd through any of `tensors` (the other inputs)."""
    if xq.dim() != 4 or xq.shape[2] != 1 or num_tokens is not None or xq.shape[0] == 0:
        return False
    if xq.device.type != "cpu" or xq.dtype not in _DTYPES or torch.is_autocast_enabled("cpu"):
        return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in (xq, *tensors))


def trains(xq: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether a `ttt_linear` call runs the C++ training scan (`ttt_scan.cpp`): CPU tensors, autograd through
    `xq` or any of `tensors` (the other inputs). (Chunks inside one mini-batch never reach the scan.)"""
    return (xq.device.type == "cpu" and xq.is_floating_point() and torch.is_grad_enabled()
            and any(t.requires_grad for t in (xq, *tensors)))


def ttt_linear(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    inner_lr: torch.Tensor,
    params: InnerLoopParams,
    state: InnerState,
    num_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, InnerState]:
    """[`modeling_ttt.ops.torch_chunk.ttt_linear`], with decoding steps and the training scan run by the C++
    kernels (`ttt_impl="cpp"`: a kernel that cannot be built is a `RuntimeError`)."""
    others = (xk, xv, inner_lr, *params.tensors(), *state.weights, *state.grads)
    decoding, training = decodes(xq, num_tokens, *others), trains(xq, *others)
    if not (decoding or training):
        return torch_chunk.ttt_linear(xq, xk, xv, inner_lr, params, state, num_tokens)
    error = build_error()
    if error is not None:
        raise RuntimeError(f"The C++ CPU kernels of modeling_ttt could not be built ({error}); use "
                           "ttt_impl='torch' (or 'auto', which then uses the PyTorch reference).")
    if training:
        return torch_chunk.ttt_linear(xq, xk, xv, inner_lr, params, state, num_tokens, scan_kernels=True)
    return _decode(xq, xk, xv, inner_lr, params, state)


def ttt_linear_or_reference(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState,
                            num_tokens=None) -> tuple[torch.Tensor, InnerState]:
    """`ttt_linear` for `ttt_impl="auto"`: a kernel that cannot be built leaves the step to the reference (with
    one warning)."""
    others = (xk, xv, inner_lr, *params.tensors(), *state.weights, *state.grads)
    if decodes(xq, num_tokens, *others) and build_error() is None:
        return _decode(xq, xk, xv, inner_lr, params, state)
    if trains(xq, *others) and build_error() is None:
        return torch_chunk.ttt_linear(xq, xk, xv, inner_lr, params, state, num_tokens, scan_kernels=True)
    if _build_result is not None and _build_result is not _NOT_TRIED:  # an attempt failed
        from .. import _warn_cpp_unavailable

        _warn_cpp_unavailable(_build_result)
    return torch_chunk.ttt_linear(xq, xk, xv, inner_lr, params, state, num_tokens)


def _decode(xq, xk, xv, inner_lr, params: InnerLoopParams, state: InnerState):
    outputs = torch.ops.modeling_ttt_cpu.ttt_linear_decode(xq, xk, xv, inner_lr, *params.tensors(), *state.weights,
                                                           *state.grads, state.seen, LAYER_NORM_EPS)
    return outputs[0], state_after(state, outputs[1:])


def state_after(state: InnerState, kernel_state: list[torch.Tensor]) -> InnerState:
    """The inner state after one decoded token, from the tail every kernel here returns: `[G_W, G_b]`, plus
    `[W0, b0]` when some row ended its mini-batch (otherwise `W0, b0` are unchanged and shared with `state`)."""
    weights = tuple(kernel_state[2:]) or state.weights
    return InnerState(weights, tuple(kernel_state[:2]), state.seen + 1)


ttt_mlp = torch_chunk.ttt_mlp  # TTT-MLP decodes with the reference

__all__ = ["ttt_linear", "ttt_linear_or_reference", "ttt_mlp", "build_error", "known_build_error", "build_name",
           "decodes", "trains", "state_after"]
