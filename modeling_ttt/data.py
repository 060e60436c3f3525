"""Text corpora for training and evaluation: documents from files, folders, JSONL or a `datasets` dataset, the
embedded default corpus (the CPython standard library's own `.py` sources), a deterministic split by document,
and a byte-level BPE tokenizer trained on the data.

A *document* is one unit whose tokens belong together: a file, one JSONL record, one dataset row. Training packs
documents into rows and resets the TTT state at each document start; evaluation scores each document as one stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

#: File suffixes read as plain text (one document per file) when a folder is given.
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".text")
#: File suffixes read as JSON Lines (one document per record, its `text_field`).
JSONL_SUFFIXES = (".jsonl", ".json")
#: What `--data` means when it is not given.
DEFAULT_CORPUS = "the CPython standard library's .py sources"


@dataclass(frozen=True)
class Document:
    name: str  # where it came from: a file path, `path:line`, or `dataset[index]`
    text: str


class DataError(ValueError):
    """Data that cannot be used: missing, empty, unreadable, or too short for what is asked."""


def stdlib_source_dir() -> Path:
    """The folder of the running Python's standard library (the base interpreter's, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files in a fixed order (sorted relative paths), third-party packages
    (`site-packages`) left out: ~1,800 files, ~31 MB of real code on CPython 3.11, many longer than 20k tokens."""
    root = stdlib_source_dir()
    files = [path for path in root.rglob("*.py")
             if "site-packages" not in path.relative_to(root).parts and path.is_file()]
    if not files:
        raise DataError(f"No .py files under the standard library folder {root}: pass --data.")
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def stdlib_documents() -> Iterator[Document]:
    root = stdlib_source_dir()
    for path in stdlib_files():
        text = _read_text(path)
        if text.strip():
            yield Document(path.relative_to(root).as_posix(), text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise DataError(f"Cannot read {path}: {error.strerror or error}.") from error


def _jsonl_documents(path: Path, text_field: str, name: str) -> Iterator[Document]:
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not a JSON object per line ({error.msg}).") from error
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{number}: a JSONL record must be an object with a {text_field!r} field "
                                f"(--text-field names another), got "
                                f"{'keys ' + str(sorted(record)) if isinstance(record, dict) else type(record).__name__}.")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {text_field!r} must be a string, got {type(text).__name__}.")
            if text.strip():
                yield Document(f"{name}:{number}", text)


def _file_documents(path: Path, text_field: str, name: str | None = None) -> Iterator[Document]:
    # `name` (default: the path as given) names the documents, and so decides their side of the split
    name = str(path) if name is None else name
    if path.suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text_field, name)
    else:
        text = _read_text(path)
        if text.strip():
            yield Document(name, text)


def _folder_files(folder: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes), key=lambda p: p.as_posix())


def _is_saved_dataset(path: Path) -> bool:
    # `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folders
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (
        path / "state.json").is_file()


def _dataset_documents(source: str, text_field: str, split: str, streaming: bool) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"{source!r} is not a file or folder here; reading it as a `datasets` dataset needs "
                        "`pip install datasets` (extra `train`).") from error
    path = Path(source)
    if path.is_dir() and _is_saved_dataset(path):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{source}: no split {split!r} (it has {sorted(dataset)}).")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        try:
            dataset = datasets.load_dataset(source, split=split, streaming=streaming)
        except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
            raise DataError(f"Cannot load {source!r}: not a file or folder here, and `datasets.load_dataset` "
                            f"failed: {type(error).__name__}: {error}".rstrip()) from error
    features = getattr(dataset, "column_names", None)
    if features is not None and text_field not in features:
        raise DataError(f"{source}: no {text_field!r} column (it has {features}); --text-field names another.")
    for index, row in enumerate(dataset):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{source}[{index}]: column {text_field!r} must hold strings, got {type(text).__name__}.")
        if text.strip():
            yield Document(f"{source}[{index}]", text)


def iter_documents(sources: Sequence[str] | None = None, text_field: str = "text", split: str = "train",
                   streaming: bool = False) -> Iterator[Document]:
    """Documents from `sources`, in order: each a text file (one document), a JSONL file (one per record's
    `text_field`), a folder (its text and JSONL files, recursively, sorted by path), a folder written by
    `datasets`' `save_to_disk`, or a `datasets` name (`split`, `streaming`). No sources: the CPython standard
    library's `.py` files. Documents of a folder are named by their path inside it (so the split does not depend
    on where the folder lives), those of a file by its path as given. Blank documents are skipped. A source that
    does not exist is a `DataError` at once."""
    if not sources:
        yield from stdlib_documents()
        return
    for source in sources:
        path = Path(source)
        if path.is_file():
            yield from _file_documents(path, text_field)
        elif path.is_dir() and not _is_saved_dataset(path):
            files = _folder_files(path)
            if not files:
                raise DataError(f"Folder {source} holds no text or JSONL files "
                                f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}).")
            for file in files:
                # named relative to the folder: the split does not depend on where the folder lives
                yield from _file_documents(file, text_field, file.relative_to(path).as_posix())
        elif path.is_dir() or not os.path.exists(source) and _looks_like_dataset_name(source):
            yield from _dataset_documents(source, text_field, split, streaming)
        else:
            raise DataError(f"Data source {source!r} does not exist (not a file, folder or saved dataset).")


def _looks_like_dataset_name(source: str) -> bool:
    # `name` or `owner/name` with no path separators beyond one slash and no file suffix
    return source.count("/") <= 1 and not source.startswith((".", "/", "~")) and Path(source).suffix == ""


def load_documents(sources: Sequence[str] | None = None, text_field: str = "text", split: str = "train",
                   streaming: bool = False) -> list[Document]:
    """`iter_documents` as a list; a `DataError` if no document has any text."""
    documents = list(iter_documents(sources, text_field, split, streaming))
    if not documents:
        where = DEFAULT_CORPUS if not sources else ", ".join(sources)
        raise DataError(f"No text in {where}: every document is empty.")
    return documents


def is_validation_document(name: str, validation_fraction: float, seed: int = 0) -> bool:
    """Whether a document belongs to the validation split: a hash of its name and the seed, so the split is the
    same on every machine and run, for any order the documents come in, and a document never changes sides
    when others are added."""
    if validation_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def split_documents(documents: Iterable[Document], validation_fraction: float, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation) by document (never splitting one); see `is_validation_document`."""
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation fraction must be in [0, 1), got {validation_fraction}.")
    train, validation = [], []
    for document in documents:
        (validation if is_validation_document(document.name, validation_fraction, seed) else train).append(document)
    return train, validation


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192, model_max_length: int = 1_000_000,
                        show_progress: bool = True):
    """A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library, wrapped as a
    `PreTrainedTokenizerFast` with `<|bos|>`, `<|eos|>` and `<|pad|>` special tokens (ids 0, 1, 2) and no
    automatic special tokens (training adds the document separators itself). Byte-level: every string encodes,
    nothing maps to an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|bos|>", "<|eos|>", "<|pad|>"]
    if vocab_size < 256 + len(special):
        raise DataError(f"vocab_size must be at least {256 + len(special)} (the 256 bytes and {len(special)} special "
                        f"tokens), got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special[0], eos_token=special[1],
                                   pad_token=special[2], model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------------------------------
# Tokens and rows
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStream:
    """All documents' tokens back to back (`tokens`, each document followed by the end-of-document token) and
    where each document starts (`starts`, True at a document's first token)."""

    tokens: "np.ndarray"  # int32, (num_tokens,)
    starts: "np.ndarray"  # bool, (num_tokens,)
    num_documents: int

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_documents(documents: Sequence[Document], tokenizer, batch_size: int = 256) -> TokenStream:
    """Encode every document (no automatic special tokens) and append the tokenizer's end-of-document token after
    each, so that the model learns where a document ends and the next one starts after it."""
    import numpy as np

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("The tokenizer has no eos token (needed between documents).")
    pieces, starts = [], []
    for begin in range(0, len(documents), batch_size):
        texts = [document.text for document in documents[begin:begin + batch_size]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            piece = np.asarray(ids + [eos], dtype=np.int32)
            start = np.zeros(len(piece), dtype=bool)
            start[0] = True
            pieces.append(piece)
            starts.append(start)
    if not pieces:
        return TokenStream(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool), 0)
    return TokenStream(np.concatenate(pieces), np.concatenate(starts), len(pieces))


def num_rows(stream: TokenStream, seq_len: int) -> int:
    """Rows of `seq_len` tokens the stream fills (the incomplete tail is dropped)."""
    return len(stream) // seq_len


def packed_row(stream: TokenStream, index: int, seq_len: int, packing: bool = True) -> dict:
    """Row `index` of the stream cut into rows of `seq_len` tokens, as `input_ids`, `position_ids` and `labels`
    (int64 tensors of shape (seq_len,)).

    Packing (the default): a row holds pieces of consecutive documents. `position_ids` restart at 0 at each
    document start *and at the row start*: the model starts every row from its initial state (a document cut by a
    row end continues in the next row as a new sequence) and, within a row, restarts its state where a document
    starts. `labels` are the input ids with -100 at every restart, so that no token is predicted from before its
    sequence start (the loss shifts the labels by one: position t-1 predicts labels[t]).

    Without packing: position ids count from 0 over the whole row and every next token is a target (documents are
    separated by the end-of-document token only)."""
    import torch

    begin, end = index * seq_len, (index + 1) * seq_len
    if index < 0 or end > len(stream):
        raise IndexError(f"row {index} is beyond the {num_rows(stream, seq_len)} rows of {seq_len} tokens.")
    input_ids = torch.from_numpy(stream.tokens[begin:end].astype("int64"))
    if not packing:
        return {"input_ids": input_ids, "position_ids": torch.arange(seq_len), "labels": input_ids.clone()}
    restart = torch.from_numpy(stream.starts[begin:end].copy())
    restart[0] = True
    # position = distance to the latest restart at or before it
    positions = torch.arange(seq_len)
    last_restart = torch.cummax(torch.where(restart, positions, torch.zeros_like(positions)), dim=0).values
    position_ids = positions - last_restart
    labels = input_ids.masked_fill(restart, -100)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def row_batch(stream: TokenStream, indices: Sequence[int], seq_len: int, packing: bool = True) -> dict:
    """Rows `indices` stacked into a batch: a dict of (len(indices), seq_len) int64 tensors."""
    import torch

    rows = [packed_row(stream, int(index), seq_len, packing) for index in indices]
    return {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "position_ids", "labels")}


__all__ = [
    "DEFAULT_CORPUS",
    "DataError",
    "Document",
    "is_validation_document",
    "iter_documents",
    "load_documents",
    "num_rows",
    "packed_row",
    "row_batch",
    "split_documents",
    "stdlib_documents",
    "stdlib_files",
    "TokenStream",
    "tokenize_documents",
    "train_bpe_tokenizer",
]
