"""`ttt-eval`: evaluation of saved causal LM folders (perplexity, loss by position, passkey retrieval, ...).

The metrics are `evaluate` modules shipped in this package, loadable offline:

```python
import evaluate
from modeling_ttt.evaluation import metric_path

perplexity = evaluate.load(metric_path("ttt_perplexity"))
perplexity.compute(token_nll=[[2.1, 1.7, 0.9]])
```
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRIC_NAMES = ("ttt_perplexity", "position_loss")


def metric_path(name: str) -> str:
    """The folder of a metric shipped with the package, for `evaluate.load(...)` (works offline)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; one of {list(METRIC_NAMES)}.")
    return str(METRICS_DIR / name)


def load_metric(name: str):
    """`evaluate.load(metric_path(name))`."""
    import evaluate

    return evaluate.load(metric_path(name))


__all__ = ["METRIC_NAMES", "metric_path", "load_metric"]
