"""Datasets of the tiny lm_eval task pack, read from the JSONL files next to this module.

lm_eval hands `dataset_kwargs.data_files` to `datasets.load_dataset` as written, so a relative path there would be
relative to the working directory, not to the YAML. The YAMLs name these loaders instead (`custom_dataset:
!function ttt_tiny.<loader>`; lm_eval imports `ttt_tiny.py` from the YAML's own folder), and each finds its file
next to this module: the pack works from any working directory, with no path to substitute.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    with open(HERE / name, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def choice(**kwargs):  # lm_eval passes the task's metadata and dataset_kwargs; neither is needed
    return _load("ttt_tiny_choice.jsonl")


def generate(**kwargs):
    return _load("ttt_tiny_generate.jsonl")
