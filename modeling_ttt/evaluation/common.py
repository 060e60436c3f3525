"""Pieces every `ttt-eval` subcommand shares: loading a model folder with its tokenizer, choosing and tokenizing
the documents, sharding them over processes, progress bars and writing the outputs atomically.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int`; it raises `EvaluationError` (or
`modeling_ttt.data.DataError`) for input it cannot use, which the CLI prints as one line with exit status 2.

Which documents are scored (`select_documents`):

1. `--data SOURCE ...` (files, folders, JSONL, a saved `datasets` folder or a dataset name) or, without it, the
   CPython standard library's `.py` sources (`modeling_ttt.data.iter_documents`).
2. The validation side of the document split (`modeling_ttt.data.is_validation_document`): with
   `--split-fraction F --seed S` as given; otherwise, when the model folder holds a `training_args.json` that
   records a validation fraction (`validation_fraction`) and seed (`seed`), those, so a model trained by
   `ttt-train` is scored on documents it never trained on; otherwise (or with `--split-fraction 0`) every document.
3. Tokenized with the model's tokenizer (its BOS token first, unless `--no-bos`), only those at least
   `--min-tokens` long, each cut to `--max-tokens-per-document`, the first `--max-documents` of them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DEFAULT_CORPUS, DataError, is_validation_document, iter_documents

#: What the model folder may hold about how the model was trained (written by `ttt-train`).
TRAINING_ARGS_FILE = "training_args.json"
#: Keys of `training_args.json` read as the training context length, first found wins.
TRAINING_LENGTH_KEYS = ("seq_len", "max_seq_length", "block_size", "context_length", "max_length")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class EvaluationError(Exception):
    """Input an evaluation cannot use (a missing or unloadable model folder, bad arguments, no documents left):
    the CLI prints its message as one line and exits with status 2."""


# --------------------------------------------------------------------------------------------------------------
# Models


def add_model_arguments(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """`--model PATH` (repeatable with `--label NAME` when `multiple`), `--dtype`, `--device`,
    `--trust-remote-code`."""
    group = parser.add_argument_group("model")
    if multiple:
        group.add_argument("--model", dest="models", action="append", required=True, metavar="PATH",
                           help="a saved model folder (any AutoModelForCausalLM, with its tokenizer); repeat for "
                                "several models")
        group.add_argument("--label", dest="labels", action="append", default=None, metavar="NAME",
                           help="a name for each --model, in the same order (default: the folder name)")
    else:
        group.add_argument("--model", required=True, metavar="PATH",
                           help="a saved model folder (any AutoModelForCausalLM, with its tokenizer)")
    group.add_argument("--dtype", default="float32", choices=sorted(DTYPES) + ["auto"],
                       help="weights dtype (default float32; 'auto' keeps the folder's)")
    group.add_argument("--device", default=None,
                       help="torch device (default: this process's accelerate device: a GPU if there is one)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow the folder's own modeling code (needed only for models this package and "
                            "transformers do not know)")


def model_labels(paths: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """One label per model: `--label`s in order, else the folder names."""
    if labels and len(labels) != len(paths):
        raise EvaluationError(f"got {len(labels)} --label for {len(paths)} --model; give one per model or none.")
    return list(labels) if labels else [Path(path).name or str(path) for path in paths]


def check_model_folder(path: str | os.PathLike[str]) -> Path:
    """The folder as a Path, or an `EvaluationError` saying why it is not a saved model folder."""
    folder = Path(path)
    if not folder.exists():
        raise EvaluationError(f"model folder {str(path)!r} does not exist.")
    if not folder.is_dir():
        raise EvaluationError(f"{str(path)!r} is a file, not a model folder (save_pretrained writes a folder).")
    if not (folder / "config.json").is_file():
        raise EvaluationError(f"{str(path)!r} is not a model folder: it has no config.json "
                              "(write one with model.save_pretrained(DIR)).")
    return folder


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}" if text else type(error).__name__


def load_model_and_tokenizer(path: str | os.PathLike[str], dtype: str | torch.dtype = "float32",
                             device: str | torch.device | None = "cpu", trust_remote_code: bool = False,
                             show_progress: bool = True):
    """`(model, tokenizer)` from a folder written by `save_pretrained`: any `AutoModelForCausalLM` (TTT, Llama,
    Mamba2, ...) and the tokenizer saved beside it, in eval mode on `device`. An `EvaluationError` if the folder is
    missing, is not a model folder, or has no tokenizer. `show_progress=False` hides transformers' loading bar."""
    from transformers.utils import logging as transformers_logging

    if show_progress or not transformers_logging.is_progress_bar_enabled():
        return _load_model_and_tokenizer(path, dtype, device, trust_remote_code)
    transformers_logging.disable_progress_bar()
    try:
        return _load_model_and_tokenizer(path, dtype, device, trust_remote_code)
    finally:
        transformers_logging.enable_progress_bar()


def _load_model_and_tokenizer(path, dtype, device, trust_remote_code):
    import modeling_ttt  # noqa: F401  (registers model_type "ttt" with the auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_model_folder(path)
    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in DTYPES:
            raise EvaluationError(f"unknown dtype {dtype!r}; one of {sorted(DTYPES) + ['auto']}.")
        dtype = DTYPES.get(dtype, "auto")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for a folder without one
        raise EvaluationError(f"{str(path)!r} has no usable tokenizer (save one beside the model with "
                              f"tokenizer.save_pretrained(DIR)): {_one_line(error)}") from error
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as error:  # any failure to build the model is the folder's problem, named in one line
        raise EvaluationError(f"cannot load a causal LM from {str(path)!r}: {_one_line(error)}") from error
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def is_ttt_model(model) -> bool:
    return getattr(model.config, "model_type", None) == "ttt" and hasattr(model, "stream")


def read_training_args(path: str | os.PathLike[str]) -> dict:
    """The folder's `training_args.json` as a dict (empty if there is none; an `EvaluationError` if unreadable)."""
    file = Path(path) / TRAINING_ARGS_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot read {file}: {_one_line(error)}") from error
    if not isinstance(data, dict):
        raise EvaluationError(f"{file} must hold a JSON object, got {type(data).__name__}.")
    return data


def training_length(model, training_args: dict | None = None) -> int | None:
    """The context length the model was trained on: from `training_args.json` if it says, else the config's
    `max_position_embeddings` (a Llama's limit; informational for TTT), else `None` (Mamba2 has no such field)."""
    for key in TRAINING_LENGTH_KEYS:
        value = (training_args or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def max_positions(model) -> int | None:
    """How many positions a model can attend over in one forward (`None`: unbounded, a recurrent model)."""
    if is_ttt_model(model) or getattr(model.config, "model_type", None) in ("mamba", "mamba2"):
        return None
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


# --------------------------------------------------------------------------------------------------------------
# Documents


def add_data_arguments(parser: argparse.ArgumentParser, min_tokens: int = 2) -> None:
    """`--data`, `--text-field`, `--split`, `--streaming`, `--split-fraction`, `--seed`, `--max-documents`,
    `--min-tokens`, `--max-tokens-per-document`, `--no-bos` (see the module docstring for the rule)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", nargs="+", default=None, metavar="SOURCE",
                       help=f"files, folders, JSONL, a saved datasets folder or a dataset name "
                            f"(default: {DEFAULT_CORPUS})")
    group.add_argument("--text-field", default="text", help="the text column/field of JSONL and datasets")
    group.add_argument("--split", default="train", help="the datasets split to read (default 'train')")
    group.add_argument("--streaming", action="store_true", help="stream a datasets dataset instead of loading it")
    group.add_argument("--split-fraction", type=float, default=None, metavar="F",
                       help="score the validation side of the document split with this fraction (default: the "
                            f"model folder's {TRAINING_ARGS_FILE} if it records one, else every document; 0: "
                            "every document)")
    group.add_argument("--seed", type=int, default=None,
                       help="seed of the document split (default: the training run's, else 0)")
    group.add_argument("--max-documents", type=int, default=None, metavar="N", help="score at most N documents")
    group.add_argument("--min-tokens", type=int, default=min_tokens, metavar="N",
                       help=f"only documents at least N tokens long (default {min_tokens})")
    group.add_argument("--max-tokens-per-document", type=int, default=None, metavar="N",
                       help="cut each document to its first N tokens")
    group.add_argument("--no-bos", action="store_true",
                       help="do not put the tokenizer's BOS token before each document")


@dataclass(frozen=True)
class DocumentSelection:
    """What `select_documents` reads: built from the data arguments by `DocumentSelection.from_args`."""

    sources: tuple[str, ...] | None = None
    text_field: str = "text"
    split: str = "train"
    streaming: bool = False
    validation_fraction: float = 0.0
    seed: int = 0
    max_documents: int | None = None
    min_tokens: int = 2
    max_tokens_per_document: int | None = None
    add_bos: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_path: str | os.PathLike[str] | None = None
                  ) -> "DocumentSelection":
        """The selection the arguments ask for; the split defaults to the one in the model folder's
        `training_args.json` (`validation_fraction`, `seed`) when the folder has one."""
        recorded = read_training_args(model_path) if model_path is not None else {}
        fraction = args.split_fraction
        if fraction is None:
            fraction = recorded.get("validation_fraction", 0.0) if isinstance(
                recorded.get("validation_fraction"), (int, float)) else 0.0
        seed = args.seed if args.seed is not None else recorded.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            seed = 0
        if not 0 <= fraction < 1:
            raise EvaluationError(f"--split-fraction must be in [0, 1), got {fraction}.")
        for name in ("max_documents", "max_tokens_per_document"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise EvaluationError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
        if args.min_tokens < 2:
            raise EvaluationError(f"--min-tokens must be >= 2 (a score needs a token of context), "
                                  f"got {args.min_tokens}.")
        return cls(sources=tuple(args.data) if args.data else None, text_field=args.text_field, split=args.split,
                   streaming=args.streaming, validation_fraction=float(fraction), seed=seed,
                   max_documents=args.max_documents, min_tokens=args.min_tokens,
                   max_tokens_per_document=args.max_tokens_per_document, add_bos=not args.no_bos)

    def describe(self) -> dict:
        """JSON-ready record of the selection (stored in every output)."""
        return {
            "data": list(self.sources) if self.sources else DEFAULT_CORPUS,
            "text_field": self.text_field,
            "split": self.split,
            "validation_fraction": self.validation_fraction,
            "seed": self.seed,
            "max_documents": self.max_documents,
            "min_tokens": self.min_tokens,
            "max_tokens_per_document": self.max_tokens_per_document,
            "add_bos": self.add_bos,
        }


@dataclass(frozen=True)
class TokenizedDocument:
    name: str
    input_ids: torch.Tensor  # [N] int64
    original_length: int  # tokens before --max-tokens-per-document


def encode(tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, the BOS token first when the tokenizer has one and `add_bos` (it gives the document's
    first token a context, so every real token is scored) and never twice."""
    # verbose=False: long documents are the point here, not a mistake to warn about
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def tokenized_documents(selection: DocumentSelection, tokenizer) -> list[TokenizedDocument]:
    """The documents `selection` picks, tokenized (see the module docstring); a `DataError` if none is left."""
    documents: list[TokenizedDocument] = []
    seen = 0
    for document in iter_documents(selection.sources, selection.text_field, selection.split, selection.streaming):
        seen += 1
        if selection.validation_fraction > 0 and not is_validation_document(
                document.name, selection.validation_fraction, selection.seed):
            continue
        ids = encode(tokenizer, document.text, selection.add_bos)
        if len(ids) < selection.min_tokens:
            continue
        length = len(ids)
        if selection.max_tokens_per_document is not None:
            ids = ids[: selection.max_tokens_per_document]
        documents.append(TokenizedDocument(document.name, torch.tensor(ids, dtype=torch.long), length))
        if selection.max_documents is not None and len(documents) >= selection.max_documents:
            break
    if not documents:
        where = ", ".join(selection.sources) if selection.sources else DEFAULT_CORPUS
        side = (f" in the validation split (fraction {selection.validation_fraction}, seed {selection.seed}; "
                "--split-fraction 0 scores every document)" if selection.validation_fraction > 0 else "")
        raise DataError(f"no document of {where}{side} has at least {selection.min_tokens} tokens "
                        f"({seen} read).")
    return documents


# --------------------------------------------------------------------------------------------------------------
# Processes and progress


def process_state(cpu: bool = False):
    """accelerate's `PartialState` for this process: one process when run plainly, several under
    `accelerate launch`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState itself does not read ACCELERATE_USE_CPU (only AcceleratorState does), and without cpu=True
    # several processes on a machine with no GPU would each run alone: ask for the CPU backend (gloo) then
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or (several_processes and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def resolve_device(requested: str | None, state=None) -> torch.device:
    """`--device` if given, else this process's accelerate device."""
    if requested:
        try:
            return torch.device(requested)
        except (RuntimeError, TypeError) as error:
            raise EvaluationError(f"bad --device {requested!r}: {_one_line(error)}") from error
    device = (state or process_state()).device
    # accelerate names the CPU of a multi-process CPU run "cpu:0"; it is the one CPU device either way
    return torch.device("cpu") if device.type == "cpu" else device


def shard(items: Sequence, state=None) -> list:
    """This process's share of `items` (contiguous, in order; everything with one process)."""
    state = state or process_state()
    if state.num_processes == 1:
        return list(items)
    with state.split_between_processes(list(items)) as part:
        return list(part)


def gather(items: list, state=None) -> list:
    """Every process's `items`, concatenated in process order (so in the original order after `shard`), on
    every process."""
    state = state or process_state()
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def progress(iterable: Iterable | None = None, *, enabled: bool = True, state=None, **kwargs):
    """A tqdm bar (on stderr) shown by the main process only, and not when `enabled` is false."""
    from tqdm.auto import tqdm

    state = state or process_state()
    return tqdm(iterable, disable=not enabled or not state.is_main_process, dynamic_ncols=True, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Outputs


def json_text(data: Any) -> str:
    """Indented JSON; NaN/inf (an empty bucket, an overflowing perplexity) written as null, which JSON has."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key in columns})
    return buffer.getvalue()


def text_output(path: str | os.PathLike[str], text: str):
    """An output (for `write_results`) holding `text`."""
    from ..conversion.outputs import Output

    def write(temporary: Path) -> None:
        temporary.write_text(text, encoding="utf-8")

    return Output(Path(path), write)


def json_output(path: str | os.PathLike[str], data: Any):
    return text_output(path, json_text(data))


def csv_output(path: str | os.PathLike[str], rows: Sequence[dict], columns: Sequence[str]):
    return text_output(path, csv_text(rows, columns))


def figure_output(path: str | os.PathLike[str], figure):
    """An output holding a matplotlib figure as PNG (the figure is closed once written)."""
    from ..conversion.outputs import Output

    def write(temporary: Path) -> None:
        import matplotlib.pyplot as plt

        with temporary.open("wb") as file:
            figure.savefig(file, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)

    return Output(Path(path), write)


def write_results(outputs: Sequence, state=None) -> None:
    """Write the outputs of a run together or not at all (temporaries renamed into place once all are written,
    replacing earlier results), on the main process only. An `EvaluationError` names a failed output."""
    from ..conversion.outputs import OutputError, write_outputs

    state = state or process_state()
    if not state.is_main_process or not outputs:
        return
    try:
        write_outputs(list(outputs), overwrite=True)
    except OutputError as error:
        raise EvaluationError(str(error)) from error


def default_path(output: str | os.PathLike[str] | None, suffix: str) -> Path | None:
    """`--output` with its suffix replaced (e.g. the CSV and PNG beside `results.json`)."""
    return None if output is None else Path(output).with_suffix(suffix)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = [
    "DocumentSelection",
    "EvaluationError",
    "TokenizedDocument",
    "add_common_arguments",
    "add_data_arguments",
    "add_model_arguments",
    "check_model_folder",
    "csv_output",
    "csv_text",
    "default_path",
    "encode",
    "figure_output",
    "gather",
    "is_ttt_model",
    "json_output",
    "json_text",
    "load_model_and_tokenizer",
    "max_positions",
    "model_labels",
    "process_state",
    "progress",
    "pyplot",
    "read_training_args",
    "resolve_device",
    "shard",
    "text_output",
    "tokenized_documents",
    "training_length",
    "write_results",
]
