"""Reader and writer for the streaming msgpack checkpoints of `test-time-training/ttt-lm-jax`.

Upstream's `StreamingCheckpointer` writes a file that is a bare concatenation of msgpack records
`[key_path, value_bytes]`, one per leaf of the flattened state dict, with no header, count or index.
`value_bytes` is what `flax.serialization.to_bytes(leaf)` returns: the msgpack encoding of an ExtType
whose payload is `[shape, dtype_name, raw_bytes]`. The whole file therefore has to be streamed until
EOF, and the only way to notice a truncated file is to compare the bytes consumed with the file size.

This module needs neither jax nor flax; bfloat16 comes from `ml_dtypes` (the same type jax uses).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import msgpack
import numpy as np
from tqdm.auto import tqdm

from .outputs import Output, write_outputs

KeyPath = tuple[str, ...]
"""A flattened flax key. Elements may themselves contain "/" (e.g. `"ttt_norm/scale"`), so never join them."""

# flax's msgpack ExtType codes (flax.serialization._MsgpackExtType).
_EXT_NDARRAY = 1
_EXT_NATIVE_COMPLEX = 2
_EXT_NPSCALAR = 3
# Marker of flax's chunked form for arrays over 2**30 bytes.
_CHUNKED_MARKER = "__msgpack_chunked_array__"
# numpy dtype kinds of bool, signed and unsigned integers, floats and complex numbers.
_NUMERIC_KINDS = frozenset("biufc")

# In a train-state file the model parameters live under this prefix; `mu`/`nu` of the optimizer
# repeat every parameter path further down, so matching by suffix would be wrong.
TRAIN_STATE_PARAMS_PREFIX: KeyPath = ("params", "params")
_TRAIN_STATE_OTHER_ROOTS = frozenset({"step", "opt_state"})

# Unpacker read size: large enough to stream multi-GB files quickly, small enough to keep memory flat.
_READ_SIZE = 16 * 1024 * 1024

FLOAT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


class CheckpointFormatError(ValueError):
    """The file is not a well-formed streaming msgpack checkpoint."""


@dataclass(frozen=True)
class CheckpointParams:
    """Model parameters read from a streaming checkpoint.

    Attributes:
        params: parameter tensors keyed by their path relative to the params root (`("model", "wte", ...)`).
        is_train_state: whether the file was a full train state (`streaming_train_state`).
        step: the training step stored in a train-state file, else None.
    """

    params: dict[KeyPath, np.ndarray]
    is_train_state: bool
    step: int | None


def format_key(key: KeyPath) -> str:
    """Render a key path unambiguously (as a JSON-style list, like upstream's params listings)."""
    return "[" + ", ".join(f'"{element}"' for element in key) + "]"


def _dtype_from_name(name: str) -> np.dtype:
    # numpy does not know "bfloat16"; flax writes numpy's `dtype.name`, which for ml_dtypes is "bfloat16".
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}") from None
    # numpy also parses names of strings, dates, records and objects, which no tensor of a model is.
    if dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"dtype {name!r} is not a numeric dtype this reader supports "
                         "(bool, integer, float, complex or bfloat16)")
    # flax writes `dtype.name`, which never names a byte order, and the machine's own bytes.
    if not dtype.isnative:
        raise ValueError(f"dtype {name!r} is not in this machine's byte order, which flax never writes")
    return dtype


def _decode_ndarray_payload(payload: bytes) -> np.ndarray:
    fields = msgpack.unpackb(payload, raw=False)
    if not (isinstance(fields, list) and len(fields) == 3):
        raise ValueError("ndarray payload is not a [shape, dtype_name, data] triple")
    shape, dtype_name, data = fields
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"invalid ndarray shape {shape!r}")
    if not isinstance(dtype_name, str):
        raise ValueError(f"invalid dtype name {dtype_name!r}")
    if not isinstance(data, bytes):
        raise ValueError("ndarray data is not a msgpack bin")
    dtype = _dtype_from_name(dtype_name)
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(data) != expected_bytes:
        raise ValueError(
            f"ndarray of shape {tuple(shape)} and dtype {dtype_name} needs {expected_bytes} bytes, found {len(data)}"
        )
    # Copy so the array owns writable memory (torch.from_numpy warns on read-only buffers).
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _decode_leaf(obj: Any) -> np.ndarray:
    """Decode one flax leaf (already msgpack-unpacked, ExtTypes left as `msgpack.ExtType`)."""
    if isinstance(obj, msgpack.ExtType):
        if obj.code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            # Code 3 (numpy scalar) has the same payload; keep it as a 0-d array so every leaf is an ndarray.
            return _decode_ndarray_payload(obj.data)
        if obj.code == _EXT_NATIVE_COMPLEX:
            raise ValueError("leaf is a Python complex number (ext code 2), not a tensor")
        raise ValueError(f"unknown msgpack ext code {obj.code} (flax uses 1 = ndarray, 2 = complex, 3 = numpy scalar)")
    if isinstance(obj, dict) and obj.get(_CHUNKED_MARKER) is True:
        return _decode_chunked(obj)
    raise ValueError(f"leaf is a msgpack {type(obj).__name__}, expected an ndarray ExtType")


def _indexed_values(obj: Any, what: str) -> list[Any]:
    # flax stores tuples as {"0": ..., "1": ...}; accept a plain list as well.
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        try:
            return [obj[str(i)] for i in range(len(obj))]
        except KeyError:
            pass
    raise ValueError(f"chunked array has an invalid {what} field")


def _decode_chunked(obj: dict[str, Any]) -> np.ndarray:
    shape = _indexed_values(obj.get("shape"), "shape")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"chunked array has an invalid shape {shape!r}")
    chunks = []
    for index, chunk in enumerate(_indexed_values(obj.get("chunks"), "chunks")):
        # flax splits an array into plain ndarray chunks, one level deep; decoding anything else recursively would
        # let a crafted file nest chunks until the interpreter's recursion limit.
        if not (isinstance(chunk, msgpack.ExtType) and chunk.code == _EXT_NDARRAY):
            found = "a chunked array itself" if isinstance(chunk, dict) else f"a msgpack {type(chunk).__name__}"
            raise ValueError(f"chunk {index} of a chunked array is {found}, expected an ndarray ExtType")
        chunks.append(_decode_ndarray_payload(chunk.data).reshape(-1))
    if not chunks:
        raise ValueError("chunked array has no chunks")
    dtypes = sorted({chunk.dtype.name for chunk in chunks})
    if len(dtypes) > 1:
        # np.concatenate would promote them to a common dtype: a silently different tensor.
        raise ValueError(f"chunks of a chunked array have different dtypes: {', '.join(dtypes)}")
    flat = np.concatenate(chunks)
    if flat.size != math.prod(shape):
        raise ValueError(f"chunked array holds {flat.size} elements, shape {tuple(shape)} needs {math.prod(shape)}")
    return flat.reshape(shape)


def decode_value(value_bytes: bytes) -> np.ndarray:
    """Decode the `value_bytes` of one record (the output of `flax.serialization.to_bytes(leaf)`)."""
    return _decode_leaf(msgpack.unpackb(value_bytes, raw=False))


def encode_value(array: np.ndarray) -> bytes:
    """Encode one array exactly as `flax.serialization.to_bytes(array)` does."""
    array = np.asarray(array)
    payload = msgpack.packb([list(array.shape), array.dtype.name, array.tobytes(order="C")], use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(_EXT_NDARRAY, payload), use_bin_type=True)


def _msgpack_problem(exc: BaseException) -> str:
    # msgpack's StackError (nesting deeper than its limit) comes with an empty message.
    if isinstance(exc, msgpack.exceptions.StackError):
        return "msgpack data nested too deeply"
    return str(exc) or type(exc).__name__


def _raw_records(path: Path, stream: BinaryIO, progress: bool) -> Iterator[tuple[int, KeyPath, bytes]]:
    """Yield `(record_index, key_path, value_bytes)`; check structure and that the file ends on a record boundary."""
    size = os.fstat(stream.fileno()).st_size
    if size == 0:
        raise CheckpointFormatError(f"{path}: empty file, not a streaming msgpack checkpoint")
    unpacker = msgpack.Unpacker(stream, raw=False, max_buffer_size=0, read_size=_READ_SIZE)
    index = 0
    consumed = 0
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", disable=not progress) as bar:
        while True:
            try:
                record = next(unpacker)
            except StopIteration:
                break
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise CheckpointFormatError(
                    f"{path}: record {index} (at byte {consumed}) is not valid msgpack: {_msgpack_problem(exc)}"
                ) from exc
            if not (isinstance(record, list) and len(record) == 2):
                found = f"a {len(record)}-element array" if isinstance(record, list) else f"a msgpack {type(record).__name__}"
                raise CheckpointFormatError(
                    f"{path}: record {index} (at byte {consumed}) is {found}, expected a [key_path, value_bytes] "
                    "pair; this is not a streaming msgpack checkpoint"
                )
            key, value = record
            if not (isinstance(key, list) and key and all(isinstance(element, str) for element in key)):
                raise CheckpointFormatError(
                    f"{path}: record {index} (at byte {consumed}) has key {key!r}, expected a non-empty list of strings"
                )
            if not isinstance(value, bytes):
                raise CheckpointFormatError(
                    f"{path}: record {index} {format_key(tuple(key))} holds a msgpack {type(value).__name__}, "
                    "expected the bin written by flax.serialization.to_bytes"
                )
            position = unpacker.tell()
            bar.update(position - consumed)
            consumed = position
            yield index, tuple(key), value
            index += 1
    if consumed != size:
        raise CheckpointFormatError(
            f"{path}: file is truncated or has trailing garbage: record {index} starting at byte {consumed} "
            f"is incomplete ({size - consumed} bytes left of a {size}-byte file)"
        )


def _decode_record(path: Path, index: int, key: KeyPath, value: bytes) -> np.ndarray:
    try:
        return decode_value(value)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointFormatError(f"{path}: record {index} {format_key(key)}: {_msgpack_problem(exc)}") from exc


def iter_records(path: str | os.PathLike[str], *, progress: bool = False) -> Iterator[tuple[KeyPath, np.ndarray]]:
    """Stream `(key_path, array)` for every record of a streaming checkpoint, in file order."""
    path = Path(path)
    with open(path, "rb") as stream:
        for index, key, value in _raw_records(path, stream, progress):
            yield key, _decode_record(path, index, key, value)


def read_streaming_checkpoint(path: str | os.PathLike[str], *, progress: bool = False) -> dict[KeyPath, np.ndarray]:
    """Read every record of a streaming checkpoint (parameters, and for a train state also step and optimizer)."""
    path = Path(path)
    tensors: dict[KeyPath, np.ndarray] = {}
    for key, array in iter_records(path, progress=progress):
        if key in tensors:
            raise CheckpointFormatError(f"{path}: key {format_key(key)} occurs more than once")
        tensors[key] = array
    return tensors


def read_checkpoint_params(path: str | os.PathLike[str], *, progress: bool = False) -> CheckpointParams:
    """Read the model parameters of a `streaming_params` or `streaming_train_state` file.

    A train state is recognised by its `step` / `opt_state` / `params/params` roots; only the
    `params/params` subtree is decoded (prefix stripped), the optimizer records are skipped undecoded.
    """
    path = Path(path)
    plain: dict[KeyPath, np.ndarray] = {}
    train_params: dict[KeyPath, np.ndarray] = {}
    step: int | None = None
    saw_train_state_root = False
    with open(path, "rb") as stream:
        for index, key, value in _raw_records(path, stream, progress):
            if key[: len(TRAIN_STATE_PARAMS_PREFIX)] == TRAIN_STATE_PARAMS_PREFIX:
                param_key = key[len(TRAIN_STATE_PARAMS_PREFIX) :]
                if not param_key:
                    raise CheckpointFormatError(f"{path}: record {index} has the bare key {format_key(key)}")
                target = train_params
            elif key[0] in _TRAIN_STATE_OTHER_ROOTS:
                saw_train_state_root = True
                if key == ("step",):
                    step_array = _decode_record(path, index, key, value)
                    if step_array.size != 1 or not np.issubdtype(step_array.dtype, np.integer):
                        raise CheckpointFormatError(f"{path}: record {index} \"step\" is not an integer scalar")
                    step = int(step_array.reshape(()))
                continue
            else:
                param_key = key
                target = plain
            if param_key in target:
                raise CheckpointFormatError(f"{path}: key {format_key(key)} occurs more than once")
            target[param_key] = _decode_record(path, index, key, value)

    is_train_state = bool(train_params) or saw_train_state_root
    if is_train_state and plain:
        stray = ", ".join(format_key(k) for k in list(plain)[:5])
        raise CheckpointFormatError(
            f"{path}: mixes train-state records (step/opt_state/params/params) with records outside them ({stray})"
        )
    if is_train_state and not train_params:
        raise CheckpointFormatError(f"{path}: train-state file has no records under {format_key(TRAIN_STATE_PARAMS_PREFIX)}")
    return CheckpointParams(params=train_params if is_train_state else plain, is_train_state=is_train_state, step=step)


def _cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    # Mirrors upstream's float_dtype: only floating leaves are cast, integers (e.g. `step`) stay as they are.
    is_float = np.issubdtype(array.dtype, np.floating) or array.dtype == np.dtype(ml_dtypes.bfloat16)
    if dtype is None or not is_float or array.dtype == dtype:
        return array
    return array.astype(dtype)


def _check_writable(tensors: Mapping[KeyPath, np.ndarray], dtype: str | None) -> np.dtype | None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
    for key in tensors:
        if not (isinstance(key, tuple) and key and all(isinstance(element, str) for element in key)):
            raise ValueError(f"checkpoint keys must be non-empty tuples of str, got {key!r}")
    return FLOAT_DTYPES[dtype] if dtype is not None else None


def write_streaming_records(
    path: str | os.PathLike[str],
    tensors: Mapping[KeyPath, np.ndarray],
    *,
    dtype: str | None = None,
    progress: bool = False,
    name: str | None = None,
) -> None:
    """Write `tensors` to the file `path` as it is, with no temporary and no rename.

    This is the body of `write_streaming_checkpoint`, for callers that make a whole set of outputs atomic
    themselves (`modeling_ttt.conversion.outputs.write_outputs`). `name` is what the progress bar shows (default: the file's).
    """
    path = Path(path)
    target_dtype = _check_writable(tensors, dtype)
    with open(path, "wb") as out:
        for key in tqdm(sorted(tensors), desc=f"writing {name or path.name}", unit="tensor", disable=not progress):
            value = encode_value(_cast(np.asarray(tensors[key]), target_dtype))
            out.write(msgpack.packb([list(key), value], use_bin_type=True))


def write_streaming_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[KeyPath, np.ndarray],
    *,
    dtype: str | None = None,
    progress: bool = False,
) -> Path:
    """Write `tensors` as a streaming msgpack checkpoint that upstream's loader accepts.

    Records are written in sorted key order, which is the order upstream's own files have. `dtype`
    ("float32", "bfloat16", "float16") casts floating tensors (round to nearest even), like upstream's
    `float_dtype`. The file is written beside its destination and renamed into place only once complete
    (`modeling_ttt.conversion.outputs.write_outputs`), so a failure never leaves a truncated checkpoint behind; an existing
    file, or a symlink, at `path` is replaced.
    """
    path = Path(path)
    _check_writable(tensors, dtype)  # before any temporary is made

    def write(temporary: Path) -> None:
        write_streaming_records(temporary, tensors, dtype=dtype, progress=progress, name=path.name)

    write_outputs([Output(path, write)], overwrite=True)
    return path
