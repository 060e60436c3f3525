"""`ttt-eval perplexity`: per-document and corpus perplexity of a saved model folder.

A TTT model streams each document through its recurrent cache (exact, memory flat, no window); any other causal
LM reads a document in one forward when it fits in its positions, else in a sliding window (`scoring.py`). The
corpus figures are token-weighted (total NLL over all scored tokens), computed by the package's
`ttt_perplexity` evaluate metric.

Output (`--output FILE.json`, and always a summary on stdout): the model, how documents were read, the document
selection, corpus `num_tokens` / `total_nll` / `mean_nll` / `perplexity` / `bits_per_token`, and per document its
name, length in tokens, scored tokens, NLL and perplexity. `--csv FILE` writes the per-document rows as CSV too.
"""

from __future__ import annotations

import argparse
import sys

from . import common, load_metric
from .scoring import describe_method, document_token_nll, scoring_plan

DOCUMENT_COLUMNS = ("name", "length", "num_tokens", "total_nll", "mean_nll", "perplexity", "method")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scoring")
    group.add_argument("--chunk-size", type=int, default=2048,
                       help="TTT models: tokens per forward through the cache (any value gives the same scores)")
    group.add_argument("--window", type=int, default=None,
                       help="other models: longest forward (default: config.max_position_embeddings)")
    group.add_argument("--stride", type=int, default=None,
                       help="other models: tokens between sliding-window starts (default: half the window)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    common.add_data_arguments(parser)
    add_scoring_arguments(parser)
    parser.add_argument("--output", default=None, metavar="FILE.json", help="write the full results here")
    parser.add_argument("--csv", default=None, metavar="FILE.csv", help="also write the per-document rows here")
    common.add_common_arguments(parser)


def score_documents(model, documents, plan, state, show_progress=True) -> list[dict]:
    """This process's share of `documents` scored; every process's records, in document order, on all of them.
    Each record: name, length, method and `token_nll` (a float32 numpy array)."""
    records = []
    mine = common.shard(documents, state)
    bar = common.progress(total=sum(len(d.input_ids) for d in mine), enabled=show_progress, state=state,
                          unit="tok", unit_scale=True, desc="scoring")
    for document in mine:
        token_nll, method = document_token_nll(model, document.input_ids, plan)
        records.append({"name": document.name, "length": len(document.input_ids), "method": method,
                        "token_nll": token_nll.numpy()})
        bar.update(len(document.input_ids))
    bar.close()
    return common.gather(records, state)


def run(args: argparse.Namespace) -> int:
    state = common.process_state()
    device = common.resolve_device(args.device, state)
    model, tokenizer = common.load_model_and_tokenizer(args.model, args.dtype, device, args.trust_remote_code,
                                                      not args.no_progress)
    selection = common.DocumentSelection.from_args(args, args.model)
    plan = scoring_plan(model, args.window, args.stride, args.chunk_size)
    documents = common.tokenized_documents(selection, tokenizer)
    records = score_documents(model, documents, plan, state, not args.no_progress)
    if not state.is_main_process:
        return 0

    metric = load_metric("ttt_perplexity")
    scores = metric.compute(token_nll=[record["token_nll"] for record in records])
    rows = []
    for record, document_score in zip(records, scores.pop("documents")):
        rows.append({"name": record["name"], "length": record["length"], "method": record["method"],
                     **document_score})
    methods = sorted({row["method"] for row in rows})
    results = {
        "model": str(args.model),
        "model_type": model.config.model_type,
        "methods": {method: describe_method(method, plan) for method in methods},
        "selection": selection.describe(),
        "settings": {"dtype": args.dtype, "device": str(device), "num_processes": state.num_processes,
                     "chunk_size": plan.chunk_size, "window": plan.window, "stride": plan.stride},
        "num_documents": len(rows),
        "corpus": scores,
        "documents": rows,
    }
    outputs = []
    if args.output:
        outputs.append(common.json_output(args.output, results))
    if args.csv:
        outputs.append(common.csv_output(args.csv, rows, DOCUMENT_COLUMNS))
    common.write_results(outputs, state)
    summary = {"model": str(args.model), "num_documents": len(rows), **scores}
    print(common.json_text(summary), end="", file=sys.stdout)
    return 0
