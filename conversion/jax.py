"""Convert checkpoints of the official JAX TTT code (`test-time-training/ttt-lm-jax`) to and from `modeling_ttt`.

Two console scripts live here:

* `ttt-convert-jax` (`main`): a `streaming_params` or `streaming_train_state` file plus its upstream model
  config (or `--official NAME`, one of the nine published checkpoints) → a Hugging Face model folder (config.json,
  model.safetensors, generation_config.json, a model card README.md; `--reference` adds a logits parity report).
* `ttt-convert-to-jax` (`main_to_jax`): a Hugging Face model folder → a `streaming_params` file that upstream's
  `StreamingCheckpointer` loads (`--load_part=params`-style), optionally with a matching upstream config.json.

Both check the weights against the config tensor by tensor, refuse weights that would silently give a different
model (NaN or inf, integer or bool tensors, values the chosen dtype cannot hold) unless told otherwise, and write
all their outputs together or not at all (`modeling_ttt.conversion.outputs.write_outputs`): a failed or interrupted run leaves
neither a half-written model nor the folders it would have created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from .jax_config import (
    OFFICIAL_MODELS,
    OFFICIAL_TOKENIZER,
    ConfigConversionError,
    hf_config_to_jax_config,
    jax_config_to_hf_kwargs,
    load_jax_config,
    official_hub_id,
    official_jax_config,
    official_model,
)
from .jax_params import ParameterMappingError, hf_to_jax, jax_parameter_shapes, jax_to_hf, parameter_specs
from .msgpack_checkpoint import (
    FLOAT_DTYPES,
    CheckpointFormatError,
    format_key,
    read_checkpoint_params,
    write_streaming_records,
)
from .outputs import Output, check_output, write_outputs

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ConversionError(ValueError):
    """The conversion cannot proceed (bad input or mismatching weights; a refused output is an `OutputError`)."""


# What TTTConfig raises for a bad value: its own checks give ValueError, huggingface_hub's `@strict` wraps them.
_CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)


def _config_error_message(exc: BaseException) -> str:
    # `@strict` puts the informative ValueError in __cause__ and a generic preamble in its own message.
    cause = exc.__cause__ if isinstance(exc, StrictDataclassError) and exc.__cause__ is not None else exc
    return str(cause)


# Everything the CLIs report as a one-line `error:` rather than a traceback (OutputError is an OSError).
_USER_ERRORS = (ConversionError, ConfigConversionError, ParameterMappingError, CheckpointFormatError, OSError)

# Dtypes a stored weight is converted from as a matter of course.
_FLOAT_SOURCE_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
# Dtypes converted only when asked (--allow-non-float): a model's weights are floats, so an integer or bool tensor
# usually means a wrong, corrupted or quantized checkpoint, and casting it would silently give another model.
_CASTABLE_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
# How many tensors an error message lists before summarising the rest.
_MAX_LISTED = 8


def _numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    # torch.from_numpy does not understand ml_dtypes' bfloat16; reinterpret its bits instead (exact).
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _check_dtype(dtype: str) -> None:
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", … and {len(items) - _MAX_LISTED} more"
    return shown


def _refuse_non_float(source: Path, dtypes: Mapping[str, str], *, allow_non_float: bool) -> None:
    """Refuse tensors that are not floating point, unless `allow_non_float` (then integers and bools are cast).

    `dtypes` maps each tensor's name, as the user's file calls it, to its dtype name (numpy's and torch's agree).
    """
    unsupported = [f"{name} ({dtype})" for name, dtype in dtypes.items()
                   if dtype not in _FLOAT_SOURCE_DTYPES and dtype not in _CASTABLE_DTYPES]
    if unsupported:
        raise ConversionError(
            f"{source}: {len(unsupported)} tensor(s) of a dtype that cannot be converted "
            f"(expected {', '.join(sorted(_FLOAT_SOURCE_DTYPES))}): {_listed(unsupported)}"
        )
    non_float = [f"{name} ({dtype})" for name, dtype in dtypes.items() if dtype in _CASTABLE_DTYPES]
    if non_float and not allow_non_float:
        raise ConversionError(
            f"{source}: {len(non_float)} tensor(s) are not floating point, which a model's weights are: "
            f"{_listed(non_float)}; pass --allow-non-float to cast them anyway"
        )


def _refuse_non_finite(
    source: Path, tensors: Iterable[tuple[str, np.ndarray, np.ndarray]], dtype: str, *, allow_non_finite: bool
) -> None:
    """Refuse NaN or infinite weights (unless `allow_non_finite`), and finite ones that `dtype` cannot hold.

    `tensors` yields `(name, as stored, as converted to dtype)`. A value that was finite and is not any more
    overflowed the dtype (e.g. 1e5 in float16): always refused, since the flag is about the input's own values.
    """
    non_finite, overflowed = [], []
    for name, stored, converted in tensors:
        bad_stored = int(np.count_nonzero(~np.isfinite(stored)))
        bad_converted = int(np.count_nonzero(~np.isfinite(converted)))
        if bad_stored and not allow_non_finite:
            non_finite.append(f"{name} ({bad_stored} of {stored.size} values)")
        if bad_converted > bad_stored:
            overflowed.append(f"{name} ({bad_converted - bad_stored} values)")
    problems = []
    if non_finite:
        problems.append(
            f"{len(non_finite)} tensor(s) hold NaN or infinite values: {_listed(non_finite)}; "
            "pass --allow-non-finite to convert them anyway"
        )
    if overflowed:
        problems.append(
            f"{len(overflowed)} tensor(s) hold values beyond the range of {dtype}, which would become infinite: "
            f"{_listed(overflowed)}; choose a wider --dtype"
        )
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars (e.g. while saving shards) for the duration of the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def write_model_card(config: Any, folder: Path, **kwargs: Any) -> None:
    from modeling_ttt.model_card import write_model_card as write_card

    write_card(config, folder, **kwargs)


def _build_empty_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    # Importing modeling_ttt registers model_type "ttt" with the Auto classes.
    import modeling_ttt  # noqa: F401
    from transformers import AutoModelForCausalLM

    # On the meta device no memory is allocated and no random init runs: every weight comes from the checkpoint.
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


REFERENCE_FILES = ("input_ids.npy", "logits.npy")


def _read_reference(reference: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """`input_ids.npy` ([batch, length] integers) and `logits.npy` ([batch, length, vocab]) of a reference folder."""
    folder = Path(reference)
    if not folder.is_dir():
        raise ConversionError(f"--reference {folder}: not a folder (it must hold {' and '.join(REFERENCE_FILES)})")
    arrays = []
    for name in REFERENCE_FILES:
        try:
            arrays.append(np.load(folder / name, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise ConversionError(f"--reference {folder}: cannot read {name}: {exc}") from exc
    input_ids, logits = arrays
    if input_ids.ndim == 1:
        input_ids, logits = input_ids[None], logits[None]
    if input_ids.ndim != 2 or input_ids.size == 0 or not np.issubdtype(input_ids.dtype, np.integer):
        raise ConversionError(
            f"--reference {folder}: input_ids.npy must be a non-empty [batch, length] integer array, "
            f"got shape {input_ids.shape} of {input_ids.dtype}"
        )
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape or not np.issubdtype(logits.dtype, np.floating):
        raise ConversionError(
            f"--reference {folder}: logits.npy must be a float [batch, length, vocab] array matching input_ids "
            f"{input_ids.shape}, got shape {logits.shape} of {logits.dtype}"
        )
    return input_ids, logits


def _check_reference_fits(reference: tuple[np.ndarray, np.ndarray], vocab_size: int, where: str) -> None:
    input_ids, logits = reference
    if logits.shape[2] != vocab_size:
        raise ConversionError(f"--reference {where}: logits.npy has {logits.shape[2]} logits per token, the model {vocab_size}")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ConversionError(f"--reference {where}: input_ids.npy holds ids outside [0, {vocab_size})")


def logits_parity(model: torch.nn.Module, input_ids: np.ndarray, reference_logits: np.ndarray) -> dict[str, Any]:
    """Max |Δ logits| and greedy-token (argmax) agreement of `model` against reference logits on `input_ids`."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids.astype(np.int64)), use_cache=False).logits.float().numpy()
    reference = reference_logits.astype(np.float32)
    agree = logits.argmax(-1) == reference.argmax(-1)
    return {
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "argmax_agreement": float(agree.mean()),
        "num_tokens": int(agree.size),
    }


def convert_jax_checkpoint(
    checkpoint: str | os.PathLike[str],
    jax_config: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str],
    dtype: str = "float32",
    config_update: str | Mapping[str, Any] | None = None,
    *,
    official: str | None = None,
    reference: str | os.PathLike[str] | None = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_non_finite: bool = False,
    allow_non_float: bool = False,
) -> Path:
    """Convert an upstream JAX checkpoint into a Hugging Face `TTTForCausalLM` folder.

    Args:
        checkpoint: a `streaming_params` or `streaming_train_state` file (any stored float dtype).
        jax_config: the upstream model config: a JSON file of `ModelConfig.to_dict()` or a preset name
            (`125m-TTT`, `350m-TTT`, `760m-TTT`, `1b-TTT`); None with `official`.
        output_dir: the folder to create.
        dtype: dtype of the saved weights: "float32", "bfloat16" or "float16". Converting a bf16 checkpoint to
            float32 is exact.
        config_update: fields overriding the config, as upstream's `--update_model_config` takes them.
        official: the name of an official checkpoint (`OFFICIAL_MODELS`, e.g. "ttt-linear-125m-books-2k"): its config
            is known, so `jax_config` must be None. The card then names `Test-Time-Training/<name>` as base model.
        reference: a folder with `input_ids.npy` and `logits.npy` (upstream's logits on those ids): the saved model
            is run on the ids (in float32) and its max |Δ logits| and greedy-token agreement go into the card.
        report: if given, filled with the parity numbers (`max_abs_logit_diff`, `argmax_agreement`, `num_tokens`).
        overwrite: replace a non-empty `output_dir` (only once the new folder is complete), or a symlink there.
        progress: show progress bars.
        allow_non_finite: convert tensors holding NaN or inf instead of refusing them.
        allow_non_float: cast integer and bool tensors to `dtype` instead of refusing them.

    The folder holds config.json, generation_config.json, model.safetensors, the remote-code files and a model card
    README.md, all written together or not at all.

    Returns:
        `output_dir`.

    Raises:
        ConversionError, ConfigConversionError, ParameterMappingError, CheckpointFormatError: bad input.
        OutputError: `output_dir` is refused (see `modeling_ttt.conversion.outputs.check_output`) or cannot be written.
    """
    from modeling_ttt import TTTConfig

    _check_dtype(dtype)
    output_dir = Path(output_dir)
    check_output(output_dir, is_dir=True, overwrite=overwrite)

    if official is not None and jax_config is not None:
        raise ConversionError(
            f"--official {official} already fixes the model config; do not also give --jax-config {os.fspath(jax_config)}"
        )
    if official is not None:
        jax_dict = official_jax_config(official, config_update)
    elif jax_config is not None:
        jax_dict = load_jax_config(jax_config, config_update)
    else:
        raise ConversionError(
            f"give --jax-config (a config JSON or preset) or --official NAME (one of {', '.join(OFFICIAL_MODELS)})"
        )
    kwargs = jax_config_to_hf_kwargs(jax_dict)
    try:
        config = TTTConfig(**kwargs)
    except _CONFIG_ERRORS as exc:
        raise ConversionError(f"JAX config gives an invalid TTTConfig: {_config_error_message(exc)}") from exc
    reference_arrays = None
    if reference is not None:
        reference_arrays = _read_reference(reference)
        _check_reference_fits(reference_arrays, config.vocab_size, os.fspath(reference))

    torch_dtype = TORCH_DTYPES[dtype]
    model = _build_empty_model(config, torch_dtype)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    # Tied targets (the LM head when tie_word_embeddings) have no upstream tensor of their own.
    tied: dict[str, str] = dict(model.all_tied_weights_keys)
    needed = {key: shape for key, shape in expected.items() if key not in tied}

    loaded = read_checkpoint_params(checkpoint, progress=progress)
    specs = parameter_specs(config)
    arrays = jax_to_hf(loaded.params, specs, needed)
    del loaded

    # Errors name the tensors as the checkpoint does.
    jax_names = {spec.hf_key: format_key(spec.jax_key) for spec in specs}
    checkpoint = Path(checkpoint)
    _refuse_non_float(
        checkpoint, {jax_names[key]: array.dtype.name for key, array in arrays.items()}, allow_non_float=allow_non_float
    )
    state_dict = {key: _numpy_to_torch(array).to(torch_dtype) for key, array in arrays.items()}
    _refuse_non_finite(
        checkpoint,
        ((jax_names[key], array, _torch_to_numpy(state_dict[key])) for key, array in arrays.items()),
        dtype,
        allow_non_finite=allow_non_finite,
    )
    for target, source in tied.items():
        state_dict[target] = state_dict[source]
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ConversionError(f"the converted weights do not load into TTTForCausalLM: {exc}") from exc
    # assign=True gave the tied keys separate Parameter objects; make them one again before saving.
    model.tie_weights()
    still_empty = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if still_empty:
        raise ConversionError(f"model weights left unset after loading: {', '.join(still_empty)}")

    num_parameters = model.num_parameters()
    card_kwargs: dict[str, Any] = {"num_parameters": num_parameters}
    if official is not None:
        row = official_model(official)
        card_kwargs["base_model"] = official_hub_id(official)
        card_kwargs["model_name"] = official
        card_kwargs["repo_id"] = official_hub_id(official)
        card_kwargs["training"] = {
            "datasets": [row.dataset],
            "notes": f"Converted from the official JAX checkpoint {official_hub_id(official)} "
            f"(test-time-training/ttt-lm-jax) with `ttt-convert-jax --official {official}`. "
            f"Tokenizer: {OFFICIAL_TOKENIZER} (vocabulary {config.vocab_size}).",
        }

    def save(folder: Path) -> None:
        try:
            with _transformers_progress_bars(progress):
                model.save_pretrained(folder)
        except SafetensorError as exc:
            # safetensors reports its I/O failures (a full disk) as its own type; they are OSErrors to write_outputs.
            raise OSError(str(exc)) from exc
        parity = None
        if reference_arrays is not None:
            # Measured on what was saved, as a user loads it (float32 compute).
            from transformers import AutoModelForCausalLM

            with _transformers_progress_bars(progress):
                saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            parity = logits_parity(saved, *reference_arrays)
            del saved
            parity["reference"] = (
                f"upstream JAX logits from `{Path(reference).name}/logits.npy`; this model's {dtype} weights run in float32"
            )
            if report is not None:
                report.update(parity)
        # The card is part of the same all-or-nothing output as the weights.
        write_model_card(config, folder, parity=parity, **card_kwargs)

    write_outputs([Output(output_dir, save, is_dir=True)], overwrite=overwrite)
    return output_dir


def _read_hf_config(model_dir: Path) -> dict[str, Any]:
    from modeling_ttt import TTTConfig

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{model_dir} has no config.json; not a Hugging Face model folder")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{config_file}: not a JSON file: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("model_type") != TTTConfig.model_type:
        found = raw.get("model_type") if isinstance(raw, dict) else None
        raise ConversionError(f"{config_file}: model_type is {found!r}, expected {TTTConfig.model_type!r}")
    try:
        # Going through TTTConfig fills defaults for fields the file omits and validates the values.
        return TTTConfig.from_pretrained(model_dir).to_dict()
    except _CONFIG_ERRORS as exc:
        raise ConversionError(f"{config_file}: invalid TTT config: {_config_error_message(exc)}") from exc


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as exc:
        # A truncated or corrupted file; safetensors' message says which part is wrong.
        raise ConversionError(f"{file}: not a valid safetensors file: {exc}") from exc


def _read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConversionError(f"{index}: not a valid safetensors index (needs a weight_map): {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConversionError(f"{index}: weight_map must map tensor names to shard file names")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_safetensors(model_dir / shard))
        return tensors
    raise ConversionError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")


def convert_hf_to_jax(
    model_dir: str | os.PathLike[str],
    output_file: str | os.PathLike[str],
    dtype: str = "float32",
    *,
    jax_config_file: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_non_finite: bool = False,
    allow_non_float: bool = False,
) -> Path:
    """Write a Hugging Face `modeling_ttt` folder as an upstream `streaming_params` checkpoint.

    The tensors are exactly what upstream's model holds (inverse layout transforms), cast to `dtype`
    ("float32", "bfloat16" or "float16") like upstream's `float_dtype` does. `jax_config_file`, if given,
    receives the matching upstream `ModelConfig` as JSON (loadable with `json::PATH`); the two files are written
    together or not at all. `allow_non_finite` and `allow_non_float` are as for `convert_jax_checkpoint`.
    """
    if dtype not in FLOAT_DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
    model_dir = Path(model_dir)
    output_file = Path(output_file)
    config_file = Path(jax_config_file) if jax_config_file is not None else None
    for path in (output_file, config_file):
        if path is not None:
            check_output(path, overwrite=overwrite)

    hf_config = _read_hf_config(model_dir)
    jax_config = hf_config_to_jax_config(hf_config)
    specs = parameter_specs(hf_config)
    weights = _read_hf_weights(model_dir)
    _refuse_non_float(
        model_dir, {key: str(tensor.dtype).removeprefix("torch.") for key, tensor in weights.items()},
        allow_non_float=allow_non_float,
    )
    # An integer or bool tensor (allowed above) goes through float32 like any other weight: exact up to 2**24.
    state_dict = {key: _torch_to_numpy(t if t.is_floating_point() else t.float()) for key, t in weights.items()}
    tied = frozenset({"lm_head.weight"}) if hf_config["tie_word_embeddings"] else frozenset()
    params = hf_to_jax(state_dict, specs, jax_parameter_shapes(hf_config), ignored_hf_keys=tied)
    # Cast here rather than in the writer, so that what would be written is checked; errors use the folder's names.
    stored = {key: array.astype(FLOAT_DTYPES[dtype], copy=False) for key, array in params.items()}
    hf_names = {spec.jax_key: spec.hf_key for spec in specs}
    _refuse_non_finite(
        model_dir,
        ((hf_names[key], params[key], stored[key]) for key in params),
        dtype,
        allow_non_finite=allow_non_finite,
    )
    del params

    def write_checkpoint(temporary: Path) -> None:
        write_streaming_records(temporary, stored, dtype=dtype, progress=progress, name=output_file.name)

    outputs = [Output(output_file, write_checkpoint)]
    if config_file is not None:
        text = json.dumps(jax_config, indent=2, sort_keys=True) + "\n"
        outputs.append(Output(config_file, lambda temporary: temporary.write_text(text, encoding="utf-8")))
    write_outputs(outputs, overwrite=overwrite)
    return output_file


# Signals that ask a CLI run to stop. Python's default for them ends the process on the spot, skipping the cleanup
# that removes a half-written output; raising instead lets `finally`/`except` blocks run, as for Ctrl-C.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Stopped(BaseException):
    """Raised in the main thread when a stop signal arrives (a BaseException, so `except Exception` lets it by)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    # Further stop signals are ignored from here on, so that they cannot interrupt the cleanup this one starts.
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    raise _Stopped(signum)


def _run(action: Any) -> int:
    """Run a CLI action: one `error:` line and exit status 2 for a user error.

    A stop signal interrupts the action like Ctrl-C does (its cleanup runs), and is then handed to whatever handled
    it before: by default that ends the process by the signal, so a caller sees how the run ended.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in _STOP_SIGNALS} if in_main_thread else {}
    stopped_by = None
    try:
        action()
    except _USER_ERRORS as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception text holds
        print(f"error: {message}", file=sys.stderr)
        return 2
    except _Stopped as exc:
        stopped_by = exc.signum
    finally:
        for sig, handler in previous.items():
            # None: the handler was not set from Python; the default is the best stand-in.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if stopped_by is not None:
        signal.raise_signal(stopped_by)
        return 128 + stopped_by  # the previous handler did not end the process (it ignores the signal)
    return 0


def _add_value_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert weights holding NaN or inf (refused by default: they mean a diverged or corrupted checkpoint)",
    )
    parser.add_argument(
        "--allow-non-float",
        action="store_true",
        help="cast integer and bool tensors to the float dtype (refused by default: weights are floats, so they mean "
        "a wrong or quantized checkpoint)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`ttt-convert-jax`: upstream JAX checkpoint → Hugging Face model folder."""
    parser = argparse.ArgumentParser(
        prog="ttt-convert-jax",
        description="Convert a checkpoint of test-time-training/ttt-lm-jax (streaming_params or "
        "streaming_train_state) into a Hugging Face TTTForCausalLM folder.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="streaming_params or streaming_train_state file (of an official download: its streaming_train_state)",
    )
    parser.add_argument(
        "--jax-config",
        help="upstream ModelConfig JSON file (json::PATH also accepted) or preset: 125m-TTT, 350m-TTT, 760m-TTT, 1b-TTT",
    )
    parser.add_argument(
        "--official",
        metavar="NAME",
        help=f"an official checkpoint, whose config is known (instead of --jax-config): {', '.join(OFFICIAL_MODELS)}",
    )
    parser.add_argument(
        "--reference",
        metavar="DIR",
        help="folder with input_ids.npy and logits.npy: report max |delta logits| and greedy-token agreement "
        "(printed and written into the model card)",
    )
    parser.add_argument(
        "--config-update",
        help="fields to override, as JSON or as upstream's --update_model_config, "
        "e.g. '{\"seq_modeling_block\": \"ttt_mlp\", \"ttt_base_lr\": 0.1}'",
    )
    parser.add_argument("--output", required=True, help="output model folder")
    parser.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="float32", help="saved weight dtype")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder (or a symlink at --output)"
    )
    _add_value_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def action() -> None:
        report: dict[str, Any] = {}
        out = convert_jax_checkpoint(
            args.checkpoint,
            args.jax_config,
            args.output,
            dtype=args.dtype,
            config_update=args.config_update,
            official=args.official,
            reference=args.reference,
            report=report,
            overwrite=args.overwrite,
            progress=not args.quiet,
            allow_non_finite=args.allow_non_finite,
            allow_non_float=args.allow_non_float,
        )
        if report:
            print(
                f"parity against {args.reference}: max |delta logits| = {report['max_abs_logit_diff']:.3e}, "
                f"greedy-token agreement = {100.0 * report['argmax_agreement']:.2f}% of {report['num_tokens']} tokens"
            )
        print(f"wrote {out}")

    return _run(action)


def main_to_jax(argv: Sequence[str] | None = None) -> int:
    """`ttt-convert-to-jax`: Hugging Face model folder → upstream `streaming_params` file."""
    parser = argparse.ArgumentParser(
        prog="ttt-convert-to-jax",
        description="Write a Hugging Face TTTForCausalLM folder as a streaming_params checkpoint of "
        "test-time-training/ttt-lm-jax.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="output streaming_params file")
    parser.add_argument("--dtype", choices=tuple(FLOAT_DTYPES), default="float32", help="stored float dtype")
    parser.add_argument("--jax-config-output", help="also write the matching upstream ModelConfig JSON here")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (a symlink is replaced, not followed)"
    )
    _add_value_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def action() -> None:
        out = convert_hf_to_jax(
            args.model,
            args.output,
            dtype=args.dtype,
            jax_config_file=args.jax_config_output,
            overwrite=args.overwrite,
            progress=not args.quiet,
            allow_non_finite=args.allow_non_finite,
            allow_non_float=args.allow_non_float,
        )
        print(f"wrote {out}")

    return _run(action)


if __name__ == "__main__":
    sys.exit(main())
