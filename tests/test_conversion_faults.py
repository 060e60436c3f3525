"""Bad input and faults given to the converters: never a hang, never a silently different model, never partial output.

`CORPUS` is a table of bad inputs, each with the exit status and a phrase of the one-line error that the CLI must give,
and the exception type the library raises. Every case runs the real CLI in its own interpreter under a timeout (so a
regression to a hang fails its test instead of stalling CI), and `find` must then show that it left nothing behind:
no temporary, no parent folder created, no input changed. The scenarios after the table kill a conversion part-way
(SIGKILL, SIGTERM), and check which leftovers of earlier runs count as stale.

The inputs are the small upstream fixtures of `fixtures/ttt_jax/` (see its README), edited.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import modeling_ttt.conversion.jax
from modeling_ttt import hub
from modeling_ttt.conversion.jax import ConversionError, convert_hf_to_jax, convert_jax_checkpoint, main, main_to_jax
from modeling_ttt.conversion.msgpack_checkpoint import (
    CheckpointFormatError,
    KeyPath,
    encode_value,
    read_streaming_checkpoint,
    write_streaming_checkpoint,
)
from modeling_ttt.conversion.outputs import OutputError

FIXTURES = Path(__file__).parent / "fixtures" / "ttt_jax"
CHECKPOINT = FIXTURES / "ttt_linear" / "streaming_params"  # float32, hidden size 64
JAX_CONFIG = FIXTURES / "ttt_linear" / "config.json"
FINAL_NORM = ("model", "ln_f", "kernel")  # a [64] float32 tensor of the fixture
SEQ_NORM = ("model", "h", "0", "seq_norm", "kernel")  # another one
# Longest a converter process may take (they take seconds); past it the process is killed and the case fails.
PROCESS_TIMEOUT = 120
# Fault processes run this many at a time: the CI machine has two cores, and each process mostly imports torch.
PARALLEL = 2

# ------------------------------------------------------------------------------------------------ running the CLIs

ENTRY_POINTS = {"ttt-convert-jax": "main", "ttt-convert-to-jax": "main_to_jax"}


def _command(cli: str, args: Sequence[str], setup: str = "") -> list[str]:
    """A fresh interpreter running `cli` on `args`, after `setup` (Python code that instruments the run)."""
    program = f"import sys\nfrom modeling_ttt.conversion import jax\n{setup}\nsys.exit(jax.{ENTRY_POINTS[cli]}(sys.argv[1:]))"
    return [sys.executable, "-c", program, *args, "--quiet"]


def _limit_file_size(limit: int) -> Callable[[], None]:
    def limit_in_child() -> None:
        # With SIGXFSZ ignored, a write past the limit fails with EFBIG, as a write to a full disk fails with ENOSPC,
        # instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


@dataclass(frozen=True)
class Finished:
    returncode: int | None  # None: killed after PROCESS_TIMEOUT
    stdout: str
    stderr: str


def _run_all(commands: Mapping[str, tuple[list[str], Callable[[], None] | None]]) -> dict[str, Finished]:
    """Run the commands `PARALLEL` at a time, each killed after `PROCESS_TIMEOUT` seconds.

    Started from the main thread with no other thread around, so `preexec_fn` is safe. Output goes to files rather
    than pipes, so a chatty process cannot block on a full pipe.
    """
    waiting = list(commands.items())
    running: dict[str, tuple[subprocess.Popen[bytes], float, Any, Any]] = {}
    finished: dict[str, Finished] = {}
    while waiting or running:
        while waiting and len(running) < PARALLEL:
            name, (argv, preexec_fn) = waiting.pop(0)
            stdout, stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, preexec_fn=preexec_fn)
            running[name] = (process, time.monotonic() + PROCESS_TIMEOUT, stdout, stderr)
        time.sleep(0.05)
        for name, (process, deadline, stdout, stderr) in list(running.items()):
            timed_out = process.poll() is None and time.monotonic() >= deadline
            if process.returncode is None and not timed_out:
                continue
            if timed_out:
                process.kill()
                process.wait()
            texts = []
            for stream in (stdout, stderr):
                stream.seek(0)
                texts.append(stream.read().decode(errors="replace"))
                stream.close()
            finished[name] = Finished(None if timed_out else process.returncode, *texts)
            del running[name]
    return finished


def _tree(folder: Path) -> list[str]:
    """What `find` lists under `folder`: every entry with its type, and for files their size and mtime, for links
    their target (a folder's own mtime is left out: making and removing a temporary inside it changes it)."""
    listing = subprocess.run(
        ["find", str(folder), "-mindepth", "1",
         "(", "-type", "d", "-printf", "%P/\\n", ")", "-o", "-printf", "%P %y %s %T@ %l\\n"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return sorted(listing.splitlines())


def _assert_one_line_error(finished: Finished, exit_code: int, *phrases: str) -> str:
    assert finished.returncode is not None, f"timed out after {PROCESS_TIMEOUT} s: {finished.stderr[-2000:]}"
    assert "Traceback" not in finished.stderr, finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), finished.stderr
    assert finished.returncode == exit_code, (finished.returncode, finished.stderr)
    assert "wrote" not in finished.stdout
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------------- inputs


def _records(tensors: Mapping[KeyPath, np.ndarray], raw: Mapping[KeyPath, bytes] = {}) -> bytes:
    """A streaming checkpoint of `tensors`, with the value bytes of the keys in `raw` replaced as given."""
    return b"".join(
        msgpack.packb([list(key), raw[key] if key in raw else encode_value(tensors[key])], use_bin_type=True)
        for key in sorted(tensors)
    )


def _checkpoint(folder: Path, edit: Callable[[dict[KeyPath, np.ndarray]], Any] = lambda t: None,
                raw: Mapping[KeyPath, bytes] = {}) -> Path:
    tensors = read_streaming_checkpoint(CHECKPOINT)
    edit(tensors)
    path = folder / "in" / "streaming_params"
    path.parent.mkdir()
    path.write_bytes(_records(tensors, raw))
    return path


def _nested_chunks(depth: int) -> bytes:
    """A flax chunked array whose single chunk is a chunked array, `depth` levels down to a [64] float32 array.

    Packed by hand: msgpack's own packer refuses to nest this deep, while its unpacker (limit 1024) reads it.
    """
    value = msgpack.packb(msgpack.unpackb(encode_value(np.ones(64, np.float32))), use_bin_type=True)
    head = b"".join(msgpack.packb(item) for item in ("__msgpack_chunked_array__", True, "shape", [64], "chunks"))
    for _ in range(depth):
        value = b"\x83" + head + b"\x91" + value  # a 3-entry map, whose "chunks" is a 1-element array
    return value


def _foreign_byte_order() -> bytes:
    """The value bytes of a [64] float32 array stored big-endian, under a dtype name flax never writes (">f4")."""
    payload = msgpack.packb([[64], ">f4", np.ones(64, ">f4").tobytes()], use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(1, payload), use_bin_type=True)


def _jax_args(checkpoint: Path, folder: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--jax-config", str(JAX_CONFIG), "--output", str(folder / "new" / "model"),
            *extra]


def _model(folder: Path, source: Path, edit: Callable[[dict[str, torch.Tensor]], Any] | None = None,
           weights: bytes | None = None) -> Path:
    """A copy of the model folder `source` under `folder`, its weights edited or replaced by raw bytes."""
    model = folder / "in" / "model"
    model.mkdir(parents=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(source / name, model / name)
    if weights is not None:
        (model / "model.safetensors").write_bytes(weights)
    else:
        tensors = load_file(source / "model.safetensors")
        if edit is not None:
            edit(tensors)
        save_file(tensors, model / "model.safetensors")
    return model


def _to_jax_args(model: Path, folder: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--output", str(folder / "new" / "streaming_params"), *extra]


def _nan_and_inf(tensors: dict[KeyPath, np.ndarray]) -> None:
    tensors[FINAL_NORM][3] = np.nan
    tensors[SEQ_NORM][0] = -np.inf


def _integer_and_bool(tensors: dict[KeyPath, np.ndarray]) -> None:
    tensors[FINAL_NORM] = np.ones(64, np.int32)
    tensors[SEQ_NORM] = np.ones(64, bool)


def _symlinked_output(folder: Path) -> list[str]:
    (folder / "real").mkdir()
    (folder / "link").symlink_to("real")
    return ["--checkpoint", str(CHECKPOINT), "--jax-config", str(JAX_CONFIG), "--output", str(folder / "link")]


def _config_under_a_file(folder: Path, model: Path) -> list[str]:
    (folder / "a_file").write_text("not a folder")
    return _to_jax_args(model, folder, "--jax-config-output", str(folder / "a_file" / "config.json"))


def _dangling_config_link(folder: Path, model: Path) -> list[str]:
    (folder / "config_link.json").symlink_to("nowhere.json")
    return _to_jax_args(model, folder, "--jax-config-output", str(folder / "config_link.json"))


# ---------------------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class BadInput:
    """One bad input: how to make it, and how the converter must refuse it.

    Attributes:
        cli: the console script.
        make: writes the input under the case's folder (given the folder and a good model folder to start from) and
            returns the CLI arguments; outputs go to a `new/` folder that must not be created.
        error: the exception the library raises (checked in-process too, unless the fault is made in the process
            by `file_size_limit` or `instrument`).
        phrases: parts of the one-line error message.
        exit_code: the CLI's exit status.
        file_size_limit: RLIMIT_FSIZE for the process, to simulate a full disk.
        instrument: Python code run in the process before the CLI, to make a fault there.
    """

    cli: str
    make: Callable[[Path, Path], list[str]]
    error: type[BaseException]
    phrases: tuple[str, ...]
    exit_code: int = 2
    file_size_limit: int | None = None
    instrument: str = ""


# Makes the rename of the second output (config.json) into place fail once, as an I/O error would.
FAIL_SECOND_RENAME = """
import errno, os
rename = os.rename
failed = []
def failing_rename(source, destination):
    if os.path.basename(destination) == "config.json" and not failed:
        failed.append(destination)
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    rename(source, destination)
os.rename = failing_rename
"""


def _previous_checkpoint(folder: Path, model: Path) -> list[str]:
    (folder / "out").mkdir()
    (folder / "out" / "streaming_params").write_bytes(b"previous checkpoint")
    return ["--model", str(model), "--output", str(folder / "out" / "streaming_params"), "--overwrite",
            "--jax-config-output", str(folder / "new" / "config.json")]


CORPUS: dict[str, BadInput] = {
    # ttt-convert-jax: bad records
    "record_with_non_numeric_dtype": BadInput(
        "ttt-convert-jax",
        lambda f, m: _jax_args(_checkpoint(f, raw={FINAL_NORM: encode_value(np.zeros(64, "datetime64[s]"))}), f),
        CheckpointFormatError, ('"model", "ln_f", "kernel"', "datetime64[s]", "not a numeric dtype"),
    ),
    "record_with_foreign_byte_order": BadInput(
        "ttt-convert-jax",
        lambda f, m: _jax_args(_checkpoint(f, raw={FINAL_NORM: _foreign_byte_order()}), f),
        CheckpointFormatError, ('"model", "ln_f", "kernel"', "byte order"),
    ),
    "chunks_nested_400_deep": BadInput(
        "ttt-convert-jax",
        lambda f, m: _jax_args(_checkpoint(f, raw={FINAL_NORM: _nested_chunks(400)}), f),
        CheckpointFormatError, ('"model", "ln_f", "kernel"', "chunk 0 of a chunked array is a chunked array itself"),
    ),
    # ttt-convert-jax: values that would silently give another model
    "jax_nan_and_inf_weights": BadInput(
        "ttt-convert-jax",
        lambda f, m: _jax_args(_checkpoint(f, _nan_and_inf), f),
        ConversionError, ("2 tensor(s) hold NaN or infinite values", '"model", "ln_f", "kernel"', "(1 of 64 values)",
                          '"seq_norm", "kernel"', "--allow-non-finite"),
    ),
    "jax_integer_and_bool_weights": BadInput(
        "ttt-convert-jax",
        lambda f, m: _jax_args(_checkpoint(f, _integer_and_bool), f),
        ConversionError, ("2 tensor(s) are not floating point", '"ln_f", "kernel"] (int32)',
                          '"seq_norm", "kernel"] (bool)', "--allow-non-float"),
    ),
    "jax_weights_overflow_float16": BadInput(
        "ttt-convert-jax",
        lambda f, m: _jax_args(_checkpoint(f, lambda t: t[FINAL_NORM].__setitem__(0, 1e30)), f, "--dtype", "float16"),
        ConversionError, ("beyond the range of float16", '"model", "ln_f", "kernel"', "--dtype"),
    ),
    # ttt-convert-jax: outputs
    "jax_disk_full": BadInput(
        "ttt-convert-jax",
        lambda f, m: _jax_args(CHECKPOINT, f),
        OutputError, ("cannot write", "new/model", "File too large"), file_size_limit=100_000,
    ),
    "jax_output_is_a_symlink": BadInput(
        "ttt-convert-jax",
        lambda f, m: _symlinked_output(f),
        OutputError, ("symbolic link", "refusing to write through it", "--overwrite to replace the link itself"),
    ),
    # ttt-convert-to-jax: bad weights
    "truncated_safetensors": BadInput(
        "ttt-convert-to-jax",
        lambda f, m: _to_jax_args(_model(f, m, weights=(m / "model.safetensors").read_bytes()[:100_000]), f),
        ConversionError, ("model.safetensors", "not a valid safetensors file"),
    ),
    "hf_nan_weights": BadInput(
        "ttt-convert-to-jax",
        lambda f, m: _to_jax_args(_model(f, m, lambda t: t["model.norm.weight"].__setitem__(5, float("nan"))), f),
        ConversionError, ("1 tensor(s) hold NaN or infinite values", "model.norm.weight (1 of 64 values)",
                          "--allow-non-finite"),
    ),
    # (An integer tensor in a model folder meets the same check: test_opt_in_flags_convert_what_is_refused_by_default.)
    # ttt-convert-to-jax: outputs
    "to_jax_disk_full": BadInput(
        "ttt-convert-to-jax",
        lambda f, m: _to_jax_args(m, f),
        OutputError, ("cannot write", "new/streaming_params", "File too large"), file_size_limit=100_000,
    ),
    # A dangling link is the dangerous one: writing through it creates its target, wherever that is. (A link to an
    # existing file is refused the same way; --overwrite replaces the link: test_overwrite_replaces_a_symlink...)
    "symlinked_jax_config_output": BadInput(
        "ttt-convert-to-jax",
        _dangling_config_link,
        OutputError, ("config_link.json is a symbolic link (to nowhere.json)", "refusing to write through it",
                      "--overwrite to replace the link itself"),
    ),
    "jax_config_output_under_a_file": BadInput(  # the second output cannot be written: the first must not be either
        "ttt-convert-to-jax",
        _config_under_a_file,
        OutputError, ("cannot create", "a_file/config.json", "a_file exists and is not a directory"),
    ),
    "both_outputs_one_path": BadInput(
        "ttt-convert-to-jax",
        lambda f, m: _to_jax_args(m, f, "--jax-config-output", str(f / "new" / "streaming_params")),
        OutputError, ("two outputs of this run are the same path",),
    ),
    # The second output fails as it is renamed into place: the first, already in place, is taken out again and the
    # file it replaced put back, and the folder made for the second is removed (the `find` check sees all that).
    "second_output_fails_to_rename": BadInput(
        "ttt-convert-to-jax",
        _previous_checkpoint,
        OutputError, ("cannot move", "new/config.json", "into place", "Input/output error"),
        instrument=FAIL_SECOND_RENAME,
    ),
}


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture converted to a Hugging Face folder, the starting point of the to-jax cases."""
    return convert_jax_checkpoint(CHECKPOINT, JAX_CONFIG, tmp_path_factory.mktemp("good") / "model")


@dataclass(frozen=True)
class CaseRun:
    folder: Path
    args: list[str]
    before: list[str]
    finished: Finished


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory: pytest.TempPathFactory, good_model: Path) -> dict[str, CaseRun]:
    """Every corpus case, made in its own folder and run in its own process (all at once, `PARALLEL` at a time)."""
    made = {}
    for name, case in CORPUS.items():
        folder = tmp_path_factory.mktemp(name)
        args = case.make(folder, good_model)
        made[name] = (folder, args, _tree(folder))
    finished = _run_all({
        name: (_command(CORPUS[name].cli, args, CORPUS[name].instrument),
               _limit_file_size(CORPUS[name].file_size_limit) if CORPUS[name].file_size_limit else None)
        for name, (_, args, _) in made.items()
    })
    return {name: CaseRun(folder, args, before, finished[name]) for name, (folder, args, before) in made.items()}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input(name: str, corpus_runs: dict[str, CaseRun], monkeypatch: pytest.MonkeyPatch) -> None:
    case, run = CORPUS[name], corpus_runs[name]
    _assert_one_line_error(run.finished, case.exit_code, *case.phrases)
    assert _tree(run.folder) == run.before  # no temporary, no created folder, no input touched

    if case.file_size_limit is not None or case.instrument:
        return  # the fault is made in the child process only
    # In-process, with the CLI's error handling turned off, the library raises exactly this type.
    monkeypatch.setattr(modeling_ttt.conversion.jax, "_USER_ERRORS", ())
    entry = {"ttt-convert-jax": main, "ttt-convert-to-jax": main_to_jax}[case.cli]
    with pytest.raises(case.error) as error:
        entry([*run.args, "--quiet"])
    assert type(error.value) is case.error
    for phrase in case.phrases:
        assert phrase in str(error.value), (phrase, str(error.value))
    assert _tree(run.folder) == run.before


def test_reader_refuses_chunks_of_different_dtypes(tmp_path: Path) -> None:
    # np.concatenate would promote float16 and float32 chunks to one float32 tensor without a word.
    chunk = {
        "__msgpack_chunked_array__": True,
        "shape": [4],
        "chunks": [msgpack.ExtType(1, msgpack.packb([[2], dtype, np.ones(2, dtype).tobytes()]))
                   for dtype in ("float32", "float16")],
    }
    path = tmp_path / "streaming_params"
    path.write_bytes(msgpack.packb([["big"], msgpack.packb(chunk)]))
    with pytest.raises(CheckpointFormatError, match=r'record 0 \["big"\]: .*different dtypes: float16, float32'):
        read_streaming_checkpoint(path)


# ------------------------------------------------------------------------------------------- faults part-way through

# Instruments a run to stop just before its outputs are renamed into place, every temporary written: it touches
# the file named by $TTT_TEST_MARKER, then sleeps until the test signals it.
PAUSE_BEFORE_RENAMES = """
import os, time
from modeling_ttt.conversion import outputs
marker = os.environ["TTT_TEST_MARKER"]
commit = outputs._commit
def paused_commit(staged, overwrite):
    open(marker, "w").close()
    time.sleep(PROCESS_TIMEOUT)
    commit(staged, overwrite)
outputs._commit = paused_commit
""".replace("PROCESS_TIMEOUT", str(PROCESS_TIMEOUT))


def _start_paused(cli: str, args: list[str], marker: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        _command(cli, args, PAUSE_BEFORE_RENAMES), env={**os.environ, "TTT_TEST_MARKER": str(marker)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run did not reach its renames: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return process


def _stop(process: subprocess.Popen[str], signum: int) -> str:
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the run did not end within {PROCESS_TIMEOUT} s of {signal.Signals(signum).name}")
    # It ends by the signal itself, as a shell reports it (128 + N), not with an error of its own.
    assert process.returncode == -signum, (process.returncode, stderr)
    return stderr


def _names(folder: Path) -> list[str]:
    return [line.split(" ")[0] for line in _tree(folder)]


# (with the modeling code that `save_pretrained` writes by default: `modeling_ttt.hub`)
MODEL_FILES = sorted(["README.md", "config.json", "generation_config.json", "model.safetensors", *hub.remote_code_files()])


def test_killed_conversion_leaves_a_temporary_that_only_the_next_run_removes(tmp_path: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    args = _jax_args(CHECKPOINT, folder)
    killed = _start_paused("ttt-convert-jax", args, tmp_path / "marker")
    # The temporary is in the nearest folder that exists, so that `new/` is created only once everything is written.
    [temporary] = folder.iterdir()
    assert temporary.name.startswith(f".model.tmp-{killed.pid}-")
    assert _names(folder) == [f"{temporary.name}/", *(f"{temporary.name}/{name}" for name in MODEL_FILES)]

    # A run for the same output meanwhile leaves the live run's temporary alone.
    assert main([*args, "--quiet"]) == 0
    assert temporary.is_dir()

    _stop(killed, signal.SIGKILL)
    assert temporary.is_dir()  # nothing can clean up after SIGKILL...
    assert main([*args, "--quiet", "--overwrite"]) == 0
    # ...but the next run for the same output does, and succeeds.
    assert _names(folder) == ["new/", "new/model/", *(f"new/model/{name}" for name in MODEL_FILES)]


def test_terminated_conversion_cleans_up_and_keeps_the_previous_outputs(tmp_path: Path, good_model: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "streaming_params").write_bytes(b"previous checkpoint")
    (folder / "config.json").write_text("previous config")
    before = _tree(folder)
    args = ["--model", str(good_model), "--output", str(folder / "streaming_params"),
            "--jax-config-output", str(folder / "config.json"), "--overwrite"]

    terminated = _start_paused("ttt-convert-to-jax", args, tmp_path / "marker")
    assert len([entry for entry in folder.iterdir() if ".tmp-" in entry.name]) == 2  # both outputs written
    stderr = _stop(terminated, signal.SIGTERM)
    assert "Traceback" not in stderr
    assert _tree(folder) == before  # temporaries removed by the run itself, previous outputs untouched

    assert main_to_jax([*args, "--quiet"]) == 0
    assert read_streaming_checkpoint(folder / "streaming_params").keys() == read_streaming_checkpoint(CHECKPOINT).keys()
    assert json.loads((folder / "config.json").read_text())["seq_modeling_block"] == "ttt_linear"
    assert _names(folder) == ["config.json", "streaming_params"]


# ------------------------------------------------------------------------------------------ stale temporaries rule


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_only_stale_temporaries_of_the_same_output_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modeling_ttt.conversion import outputs

    host, dead, live = outputs._HOST, _dead_pid(), os.getppid()
    names = {
        "dead owner": f".model.tmp-{dead}-{host}-0123abcd",
        "live owner": f".model.tmp-{live}-{host}-0123abcd",
        "other machine": f".model.tmp-{dead}-elsewhere-0123abcd",
        "another output's": f".other.tmp-{dead}-{host}-0123abcd",
        "not our naming": f".model.tmp-{dead}-{host}-xyz",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    # A previous output moved aside by a run that died before putting the new one in place comes back.
    (tmp_path / f".model.old-{dead}-{host}-89abcdef").write_text("previous model")

    removed = outputs.remove_stale_temporaries(tmp_path, "model")
    assert [path.name for path in removed] == [names["dead owner"]]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [names[key] for key in ("live owner", "other machine", "another output's", "not our naming")] + ["model"])
    assert (tmp_path / "model").read_text() == "previous model"

    # Untouched for longer than the bound, a temporary of ours is stale whoever owns it.
    later = time.time() + outputs.STALE_AFTER_SECONDS + 60
    monkeypatch.setattr(outputs.time, "time", lambda: later)
    removed = outputs.remove_stale_temporaries(tmp_path, "model")
    assert sorted(path.name for path in removed) == sorted([names["live owner"], names["other machine"]])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [names["another output's"], names["not our naming"], "model"])


# ------------------------------------------------------------------------------------------------------- opt-ins


def test_opt_in_flags_convert_what_is_refused_by_default(
    tmp_path: Path, good_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for cli in (main, main_to_jax):
        with pytest.raises(SystemExit):
            cli(["--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "--allow-non-finite convert weights holding NaN or inf" in help_text
        assert "--allow-non-float cast integer and bool tensors" in help_text

    nan = _checkpoint(tmp_path, _nan_and_inf)
    assert main(_jax_args(nan, tmp_path, "--allow-non-finite", "--quiet")) == 0
    weights = load_file(tmp_path / "new" / "model" / "model.safetensors")
    assert torch.isnan(weights["model.norm.weight"][3]) and torch.isneginf(weights["model.layers.0.seq_norm.weight"][0])

    integers = write_streaming_checkpoint(tmp_path / "ints" / "streaming_params",
                                          {**read_streaming_checkpoint(CHECKPOINT), FINAL_NORM: np.arange(64)})
    model = tmp_path / "from_ints"
    args = ["--checkpoint", str(integers), "--jax-config", str(JAX_CONFIG), "--output", str(model)]
    assert main([*args, "--allow-non-float", "--quiet"]) == 0
    assert torch.equal(load_file(model / "model.safetensors")["model.norm.weight"], torch.arange(64.0))

    back = tmp_path / "back" / "streaming_params"
    assert main_to_jax(["--model", str(tmp_path / "new" / "model"), "--output", str(back), "--allow-non-finite",
                        "--quiet"]) == 0
    assert np.isnan(read_streaming_checkpoint(back)[FINAL_NORM][3])

    # An integer tensor in a model folder: refused, then cast when asked.
    int_model = _model(tmp_path / "int_model", good_model,
                       lambda t: t.__setitem__("model.norm.weight", torch.arange(64, dtype=torch.int64)))
    args = ["--model", str(int_model), "--output", str(tmp_path / "int_back" / "streaming_params"), "--quiet"]
    with pytest.raises(ConversionError, match=r"1 tensor\(s\) are not floating point, .*: model.norm.weight \(int64\)"):
        convert_hf_to_jax(int_model, tmp_path / "int_back" / "streaming_params")
    assert main_to_jax(args) == 2 and not (tmp_path / "int_back").exists()
    assert "--allow-non-float" in capsys.readouterr().err
    assert main_to_jax([*args, "--allow-non-float"]) == 0
    stored = read_streaming_checkpoint(tmp_path / "int_back" / "streaming_params")[FINAL_NORM]
    assert stored.dtype == np.float32 and np.array_equal(stored, np.arange(64, dtype=np.float32))


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path: Path, good_model: Path) -> None:
    (tmp_path / "target.json").write_text("precious")
    (tmp_path / "config.json").symlink_to("target.json")
    args = ["--model", str(good_model), "--output", str(tmp_path / "streaming_params"),
            "--jax-config-output", str(tmp_path / "config.json"), "--overwrite", "--quiet"]
    assert main_to_jax(args) == 0
    assert not (tmp_path / "config.json").is_symlink()
    assert json.loads((tmp_path / "config.json").read_text())["seq_modeling_block"] == "ttt_linear"
    assert (tmp_path / "target.json").read_text() == "precious"
