"""Mean next-token loss by token position, in log-spaced bins: how much a model gains from longer context.

An `evaluate` metric module shipped with modeling-ttt; it loads offline from its folder:

    import evaluate
    from modeling_ttt.evaluation import metric_path

    metric = evaluate.load(metric_path("position_loss"))
    metric.compute(token_nll=[nll_of_doc_1, nll_of_doc_2])               # bins 1, 2, 4, 8, ... (powers of two)
    metric.compute(token_nll=[...], num_bins=20)                         # 20 log-spaced bins
    metric.compute(token_nll=[...], bin_edges=[1, 10, 100, 1000])        # your own bin starts

Each example is one document's per-token NLLs (nats) in order. `token_nll[i]` scores the token at position
`i + 1` (it is predicted from the `i + 1` tokens before it), as `TTTForCausalLM.stream` returns them. Bin `k` holds
positions `bin_start[k] <= p < bin_end[k]`; its loss is the mean over all documents' tokens in it
(token-weighted), so a bin is averaged only over the documents long enough to reach it.
"""

import math

import datasets
import evaluate
import numpy

_DESCRIPTION = """\
Mean next-token loss by token position over documents, in log-spaced position bins (powers of two by default).
"""

_KWARGS_DESCRIPTION = """
Args:
    token_nll (`list[list[float]]`): per document, the NLL of the token at positions 1, 2, 3, ...
    num_bins (`int`, optional): that many log-spaced bins from position 1 to the longest position (fewer when
        bins would be narrower than one position).
    bin_edges (`list[int]`, optional): increasing bin starts (>= 1); the last bin ends after the longest position.
Returns:
    bin_start, bin_end (exclusive), tokens, mean_loss: one entry per bin, and max_position.
"""


def position_bin_edges(max_position, num_bins=None, bin_edges=None):
    """Edges `[start_0, ..., end]` over positions `1 .. max_position`: given starts, `num_bins` log-spaced ones,
    or powers of two."""
    end = max_position + 1
    if bin_edges is not None:
        starts = [int(edge) for edge in bin_edges]
        if not starts or starts[0] < 1 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"bin_edges must be increasing positions >= 1, got {list(bin_edges)}.")
        starts = [start for start in starts if start < end] or starts[:1]
    elif num_bins is not None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
        spaced = numpy.geomspace(1, end, num_bins + 1)[:-1]
        starts = sorted({int(round(value)) for value in spaced})
    else:
        starts = [2**k for k in range(max(1, math.ceil(math.log2(end))))]
        starts = [start for start in starts if start < end] or [1]
    return starts + [max(end, starts[-1] + 1)]


class PositionLoss(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=datasets.Features({"token_nll": datasets.Sequence(datasets.Value("float64"))}),
                                   reference_urls=["https://arxiv.org/abs/2407.04620"])

    def _compute(self, token_nll, num_bins=None, bin_edges=None):
        lengths = [len(nll) for nll in token_nll]
        max_position = max(lengths, default=0)
        if max_position == 0:
            raise ValueError("no scored tokens: every document is empty.")
        edges = position_bin_edges(max_position, num_bins, bin_edges)
        sums = numpy.zeros(len(edges) - 1)
        counts = numpy.zeros(len(edges) - 1, dtype=numpy.int64)
        for nll in token_nll:
            nll = numpy.asarray(nll, dtype=numpy.float64)
            positions = numpy.arange(1, len(nll) + 1)
            index = numpy.searchsorted(edges, positions, side="right") - 1
            inside = (index >= 0) & (index < len(edges) - 1)
            numpy.add.at(sums, index[inside], nll[inside])
            numpy.add.at(counts, index[inside], 1)
        means = [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]
        return {"bin_start": edges[:-1], "bin_end": edges[1:], "tokens": counts.tolist(), "mean_loss": means,
                "max_position": max_position}
