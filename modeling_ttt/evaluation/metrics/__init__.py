"""`evaluate` metric modules (one folder each, `NAME/NAME.py`); load them with `evaluate.load(metric_path(NAME))`."""
