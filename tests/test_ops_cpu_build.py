"""When and how the C++ CPU kernels are built (`modeling_ttt/ops/cpu/__init__.py`): only where one runs, in a
folder keyed by everything that makes builds differ, and a build that cannot finish never hangs or breaks decoding.

Each case runs in a fresh process with its own `TORCH_EXTENSIONS_DIR` (the build is once per process) and a
timeout, so a regression to a hang fails instead of stalling the suite."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
HAVE_TOOLS = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None

DECODE = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from modeling_ttt.ops import cpu
model = tiny_model("linear", "mamba", ttt_impl={impl!r})
out = model.generate(torch.randint(1, 97, (1, 5)), max_new_tokens=3, do_sample=False, pad_token_id=0)
print("tokens", out.shape[1], "build_error", cpu.build_error())
"""


def run(script: str, extensions: Path, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), **env}
    environment.pop("TTT_IMPL", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_prefill_and_ttt_mlp_training_compile_nothing(tmp_path):
    """Only a one-token step without autograd or TTT-Linear under autograd runs a C++ kernel (and builds them)."""
    script = f"""
        import sys, torch
        sys.path.insert(0, {TESTS!r})
        from conftest import tiny_model
        from modeling_ttt.ops import cpu
        for layer_type in ("linear", "mlp"):
            model = tiny_model(layer_type, "mamba").train()
            ids = torch.randint(1, 97, (2, 21))
            if layer_type == "mlp":  # TTT-MLP has no training kernel
                model(ids, labels=ids).loss.backward()
                model(ids[:, :1], labels=ids[:, :1]).loss.backward()  # one token, but with autograd
            model.eval()
            with torch.no_grad():
                model(ids, use_cache=True)  # a prefill
                model(ids, use_cache=False)
        print("build attempted:", cpu._build_result is not cpu._NOT_TRIED)
    """
    extensions = tmp_path / "extensions"
    result = run(script, extensions, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "build attempted: False" in result.stdout
    assert not extensions.exists() or not any(extensions.iterdir())
    assert "compiling" not in result.stderr


@pytest.mark.parametrize("cxx", ["/nonexistent/c++"])
def test_a_build_that_cannot_start_is_one_line_then_auto_decodes_with_the_reference(tmp_path, cxx):
    extensions = tmp_path / "extensions"
    auto = run(DECODE.format(tests=TESTS, impl="auto"), extensions, timeout=120, CXX=cxx)
    assert auto.returncode == 0, auto.stderr
    assert "tokens 8 build_error no C++ compiler" in auto.stdout
    warnings = [line for line in auto.stderr.splitlines() if "could not be built" in line]
    assert len(warnings) == 1 and "no C++ compiler: `/nonexistent/c++` is not on PATH" in warnings[0]
    strict = run(DECODE.format(tests=TESTS, impl="cpp"), extensions, timeout=120, CXX=cxx)
    assert strict.returncode != 0
    assert "RuntimeError: ttt_impl='cpp': the C++ CPU kernels could not be built (no C++ compiler" \
        in strict.stderr


@pytest.mark.skipif(not HAVE_TOOLS, reason="needs a C++ compiler and ninja")
def test_a_compile_error_is_one_line(tmp_path):
    broken = tmp_path / "ttt_decode.cpp"
    broken.write_text("#error this source does not compile\n")
    script = f"""
        from modeling_ttt.ops import cpu
        cpu._SOURCE = {str(broken)!r}
        print(repr(cpu.build_error()))
    """
    result = run(script, tmp_path / "extensions", timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith(f"'compiling {broken} failed: ") and "error: #error this source does not compile" \
        in message and "\\n" not in message


@pytest.mark.skipif(not HAVE_TOOLS, reason="needs a C++ compiler and ninja")
def test_a_build_killed_part_way_does_not_block_the_next(tmp_path):
    """SIGKILL during the build leaves torch's `lock` file behind (torch alone would then wait forever); the next
    process builds and decodes within its timeout."""
    extensions = tmp_path / "extensions"
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    environment.pop("TTT_IMPL", None)
    first = subprocess.Popen([sys.executable, "-c", DECODE.format(tests=TESTS, impl="auto")], env=environment,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(extensions.glob("*/lock")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert list(extensions.glob("*/lock")), "the first build never started"
    time.sleep(1.0)  # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)  # the whole group: python, ninja and the compiler
    first.wait()
    assert list(extensions.glob("*/lock"))  # left behind
    second = run(DECODE.format(tests=TESTS, impl="auto"), extensions, timeout=240)
    assert second.returncode == 0, second.stderr
    assert "tokens 8 build_error None" in second.stdout
