"""`ttt-eval position-loss`: mean next-token loss by token position for one or more models, as a CSV and a plot
in the style of the TTT paper's loss-versus-token-index figure (log-scale positions).

Each model reads the same long documents its own way (`scoring.py`: a TTT model streams them through its cache;
a Llama reads them in one forward up to `max_position_embeddings` and beyond that in a sliding window, which the
legend says; a Mamba2 in one forward). Positions are binned log-spaced — powers of two (1, 2, 4, ...) or `--bins N`
bins up to the longest position, the same bins for every model — and each bin's loss is the token-weighted mean
over every document reaching it (the package's `position_loss` evaluate metric). A dashed vertical line marks
each model's training length (its `training_args.json`, else `config.max_position_embeddings`), so the plot shows
what happens past it.

Outputs: `--output FILE.csv` with columns model, bin_start, bin_end (exclusive), tokens, mean_loss; the plot beside
it (`FILE.png`, or `--plot`); a JSON beside it (`FILE.json`) with each model's method and training length.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import common, load_metric
from .perplexity import add_scoring_arguments, score_documents
from .scoring import SLIDING_WINDOW, scoring_plan

COLUMNS = ("model", "bin_start", "bin_end", "tokens", "mean_loss")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser, multiple=True)
    common.add_data_arguments(parser, min_tokens=1024)
    add_scoring_arguments(parser)
    parser.add_argument("--bins", type=int, default=None, metavar="N",
                        help="N log-spaced position bins up to the longest position (default: powers of two)")
    parser.add_argument("--output", required=True, metavar="FILE.csv", help="the CSV of mean loss per bin")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="the plot (default: beside --output)")
    parser.add_argument("--title", default=None, help="the plot's title")
    common.add_common_arguments(parser)


def plot_position_loss(curves: list[dict], title: str | None = None):
    """A matplotlib figure: mean loss against token position (log x), one line per model, and each model's
    training length as a dashed vertical line in the same colour."""
    plt = common.pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, curve in enumerate(curves):
        color = f"C{index}"
        points = [(math.sqrt(start * (end - 1)) if end - 1 > start else start, loss)
                  for start, end, loss in zip(curve["bin_start"], curve["bin_end"], curve["mean_loss"])
                  if loss is not None and math.isfinite(loss)]
        notes = [curve["note"]] if curve.get("note") else []
        length = curve.get("training_length")
        # a line far right of the data would only squash the curves: past the plotted positions it is said instead
        if length and length > curve["bin_end"][-1]:
            notes.append(f"training length {length}, past the longest position")
        label = curve["label"] + (f" ({'; '.join(notes)})" if notes else "")
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, color=color, label=label)
        if length and length <= curve["bin_end"][-1]:
            axes.axvline(curve["training_length"], color=color, linestyle="--", linewidth=1, alpha=0.8,
                         label=f"{curve['label']} training length ({curve['training_length']})")
    axes.set_xscale("log")
    axes.set_xlabel("token position")
    axes.set_ylabel("mean next-token loss (nats)")
    axes.set_title(title or "Loss by token position")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def run(args: argparse.Namespace) -> int:
    labels = common.model_labels(args.models, args.labels)
    if args.bins is not None and args.bins < 1:
        raise common.EvaluationError(f"--bins must be >= 1, got {args.bins}.")
    for path in args.models:  # every folder checked before the first long scoring run
        common.check_model_folder(path)
    state = common.process_state()
    device = common.resolve_device(args.device, state)
    # the same documents for every model: the split recorded by the first model folder (if any)
    selection = common.DocumentSelection.from_args(args, args.models[0])

    scored = []
    for path, label in zip(args.models, labels):
        model, tokenizer = common.load_model_and_tokenizer(path, args.dtype, device, args.trust_remote_code,
                                                      not args.no_progress)
        plan = scoring_plan(model, args.window, args.stride, args.chunk_size)
        documents = common.tokenized_documents(selection, tokenizer)
        records = score_documents(model, documents, plan, state, not args.no_progress)
        methods = {record["method"] for record in records}
        note = f"sliding window of {plan.window} past position {plan.window}" if SLIDING_WINDOW in methods else ""
        scored.append({"label": label, "path": str(path), "model_type": model.config.model_type,
                       "training_length": common.training_length(model, common.read_training_args(path)),
                       "methods": sorted(methods), "note": note, "num_documents": len(records),
                       "token_nll": [record["token_nll"] for record in records]})
        del model
    if not state.is_main_process:
        return 0

    # one set of bins for every model: from the longest position any of them reached
    from .metrics.position_loss.position_loss import position_bin_edges

    max_position = max(len(nll) for curve in scored for nll in curve["token_nll"])
    edges = position_bin_edges(max_position, num_bins=args.bins)
    metric = load_metric("position_loss")
    rows, curves = [], []
    for curve in scored:
        result = metric.compute(token_nll=curve.pop("token_nll"), bin_edges=edges[:-1])
        # a model whose documents are shorter stops earlier; its bins past that are empty, not written
        bins = [(start, end, tokens, loss) for start, end, tokens, loss in
                zip(result["bin_start"], result["bin_end"], result["tokens"], result["mean_loss"]) if tokens]
        curve.update(bin_start=[b[0] for b in bins], bin_end=[b[1] for b in bins], tokens=[b[2] for b in bins],
                     mean_loss=[b[3] for b in bins], max_position=result["max_position"])
        curves.append(curve)
        rows += [{"model": curve["label"], "bin_start": start, "bin_end": end, "tokens": tokens, "mean_loss": loss}
                 for start, end, tokens, loss in bins]

    output = Path(args.output)
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    summary = {"selection": selection.describe(), "bins": "powers of two" if args.bins is None else args.bins,
               "models": curves}
    common.write_results([common.csv_output(output, rows, COLUMNS), common.figure_output(plot, plot_position_loss(
        curves, args.title)), common.json_output(output.with_suffix(".json"), summary)], state)
    for curve in curves:
        print(f"{curve['label']}: {curve['num_documents']} documents, positions up to {curve['max_position']}, "
              f"loss {curve['mean_loss'][0]:.3f} (first bin) -> {curve['mean_loss'][-1]:.3f} (last bin)",
              file=sys.stdout)
    return 0
