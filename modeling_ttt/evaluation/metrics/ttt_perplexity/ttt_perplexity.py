"""Perplexity of a causal language model from its per-token negative log-likelihoods, or from logits and labels.

An `evaluate` metric module shipped with modeling-ttt; it loads offline from its folder:

    import evaluate
    from modeling_ttt.evaluation import metric_path

    metric = evaluate.load(metric_path("ttt_perplexity"))             # inputs: token_nll
    metric.compute(token_nll=[[2.3, 1.1, 0.4], [3.0, 2.0]])
    metric = evaluate.load(metric_path("ttt_perplexity"), "logits")   # inputs: logits, labels
    metric.compute(logits=[logits_of_doc], labels=[labels_of_doc])

Each example is one document. `token_nll` holds its scored tokens' natural-log NLLs. With the `logits` config,
`logits` is `[T, vocab]` and `labels` `[T]` as a transformers causal LM takes them: position `t` predicts
`labels[t + 1]` (the shift happens here), labels equal to `ignore_index` (-100) are not scored.

The corpus figures are token-weighted: `mean_nll` is the total NLL over the total number of scored tokens (not the
mean of the documents' means), `perplexity = exp(mean_nll)`.
"""

import math

import datasets
import evaluate
import numpy

_CITATION = """\
@article{sun2024learning,
  title={Learning to (Learn at Test Time): RNNs with Expressive Hidden States},
  author={Sun, Yu and Li, Xinhao and Dalal, Karan and Xu, Jiarui and Vikram, Arjun and Zhang, Genghan and
          Dubois, Yann and Chen, Xinlei and Wang, Xiaolong and Koyejo, Sanmi and Hashimoto, Tatsunori and
          Guestrin, Carlos},
  journal={arXiv preprint arXiv:2407.04620},
  year={2024}
}
"""

_DESCRIPTION = """\
Perplexity (exp of the token-weighted mean negative log-likelihood) per document and over the corpus, from
per-token NLLs (default config) or from logits and labels (config "logits").
"""

_KWARGS_DESCRIPTION = """
Args:
    token_nll (`list[list[float]]`): per document, the NLL (nats) of each scored token (default config).
    logits (`list[list[list[float]]]`): per document, `[T, vocab]` logits (config "logits").
    labels (`list[list[int]]`): per document, `[T]` token ids; `labels[t + 1]` is what position `t` predicts.
    ignore_index (`int`, default -100): labels not scored (config "logits").
Returns:
    num_tokens, total_nll, mean_nll, perplexity, bits_per_token: corpus figures (token-weighted);
    documents: per document `{"num_tokens", "total_nll", "mean_nll", "perplexity"}`, in input order.
Examples:
    >>> metric.compute(token_nll=[[1.0, 1.0], [2.0]])["mean_nll"]
    1.3333333333333333
"""


def _summary(total_nll, num_tokens):
    mean_nll = total_nll / num_tokens if num_tokens else float("nan")
    perplexity = math.exp(mean_nll) if num_tokens and mean_nll < 700 else float("inf") if num_tokens else float("nan")
    return {"num_tokens": int(num_tokens), "total_nll": float(total_nll), "mean_nll": float(mean_nll),
            "perplexity": float(perplexity)}


def _document_nll(logits, labels, ignore_index):
    """Per-token NLLs of one document from its logits and labels (shifted: position t predicts labels[t + 1])."""
    logits = numpy.asarray(logits, dtype=numpy.float64)[:-1]
    targets = numpy.asarray(labels, dtype=numpy.int64)[1:]
    keep = targets != ignore_index
    logits, targets = logits[keep], targets[keep]
    if not len(targets):
        return numpy.zeros(0)
    # log-softmax with the max subtracted, so large logits do not overflow
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = numpy.log(numpy.exp(shifted).sum(axis=-1))
    return log_norm - shifted[numpy.arange(len(targets)), targets]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TTTPerplexity(evaluate.Metric):
    def _info(self):
        if self.config_name == "logits":
            features = datasets.Features({"logits": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                                          "labels": datasets.Sequence(datasets.Value("int64"))})
        else:
            features = datasets.Features({"token_nll": datasets.Sequence(datasets.Value("float64"))})
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=features, reference_urls=["https://arxiv.org/abs/2407.04620"])

    def _compute(self, token_nll=None, logits=None, labels=None, ignore_index=-100):
        if self.config_name == "logits":
            if len(logits) != len(labels):
                raise ValueError(f"got {len(logits)} logits and {len(labels)} labels; one of each per document.")
            token_nll = [_document_nll(doc_logits, doc_labels, ignore_index)
                         for doc_logits, doc_labels in zip(logits, labels)]
        documents = []
        total_nll, num_tokens = 0.0, 0
        for nll in token_nll:
            nll = numpy.asarray(nll, dtype=numpy.float64)
            if not numpy.isfinite(nll).all():
                raise ValueError("token_nll holds NaN or inf: the scores are broken, not just high.")
            document_total = float(nll.sum())
            documents.append(_summary(document_total, len(nll)))
            total_nll += document_total
            num_tokens += len(nll)
        result = _summary(total_nll, num_tokens)
        result["bits_per_token"] = result["mean_nll"] / math.log(2)
        result["documents"] = documents
        return result
