"""modeling_ttt.data: document sources, the embedded corpus, the split, the tokenizer."""

import json

import pytest

from modeling_ttt.data import (
    DataError,
    Document,
    iter_documents,
    load_documents,
    split_documents,
    stdlib_files,
    train_bpe_tokenizer,
)


def test_the_default_corpus_is_the_standard_library_in_a_fixed_order():
    files = stdlib_files()
    assert len(files) > 500
    assert all(path.suffix == ".py" and "site-packages" not in path.parts for path in files)
    assert files == stdlib_files()
    first = next(iter_documents())
    assert first.name.endswith(".py") and first.text.strip()


def test_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("x = 1\n")
    (tmp_path / "sub" / "blank.txt").write_text("  \n")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\0\1")
    records = [{"text": "first record"}, {"text": ""}, {"text": "third record", "meta": 1}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    documents = load_documents([str(tmp_path)])
    assert [d.text for d in documents] == ["alpha text", "first record", "third record", "x = 1\n"]
    assert documents[1].name.endswith("c.jsonl:1") and documents[2].name.endswith("c.jsonl:3")
    assert [d.text for d in load_documents([str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.py")])] == [
        "alpha text", "x = 1\n"]


def test_a_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two", " "], "id": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    assert [d.text for d in load_documents([str(tmp_path / "ds")])] == ["one", "two"]
    assert [d.text for d in load_documents([str(tmp_path / "ds")], streaming=True)] == ["one", "two"]
    with pytest.raises(DataError, match="no 'content' column"):
        load_documents([str(tmp_path / "ds")], text_field="content")


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text or JSONL files"):
        load_documents([str(tmp_path / "empty")])
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="every document is empty"):
        load_documents([str(tmp_path / "blank.txt")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
        load_documents([str(tmp_path / "bad.jsonl")])
    (tmp_path / "field.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match=r"with a 'text' field"):
        load_documents([str(tmp_path / "field.jsonl")])


def test_the_split_is_by_document_deterministic_and_order_free():
    documents = [Document(f"doc{i}", f"text {i}") for i in range(400)]
    train, validation = split_documents(documents, 0.1, seed=3)
    assert len(train) + len(validation) == 400 and 20 <= len(validation) <= 60
    train2, validation2 = split_documents(list(reversed(documents)), 0.1, seed=3)
    assert {d.name for d in validation2} == {d.name for d in validation}
    # adding documents never moves an existing one
    _, validation3 = split_documents(documents + [Document(f"new{i}", "x") for i in range(50)], 0.1, seed=3)
    assert {d.name for d in validation} <= {d.name for d in validation3}
    _, other_seed = split_documents(documents, 0.1, seed=4)
    assert {d.name for d in other_seed} != {d.name for d in validation}
    with pytest.raises(DataError, match="validation fraction"):
        split_documents(documents, 1.0)


def test_the_bpe_tokenizer_round_trips_any_text():
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files()[:20]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600, show_progress=False)
    assert len(tokenizer) == 600
    assert tokenizer.convert_tokens_to_ids(["<|bos|>", "<|eos|>", "<|pad|>"]) == [0, 1, 2]
    sample = "def f(x):\n    return x ** 2  # ünïcödé ✓\n"
    ids = tokenizer(sample)["input_ids"]
    assert tokenizer.decode(ids) == sample and 0 not in ids and 1 not in ids
    with pytest.raises(DataError, match="vocab_size must be at least"):
        train_bpe_tokenizer(texts, vocab_size=100)
