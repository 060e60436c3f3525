"""`ttt-eval`: evaluate saved causal LM folders (TTT, Llama, Mamba2, ...) offline.

    ttt-eval perplexity --model DIR [--data SOURCE ...] [--output results.json]
    ttt-eval position-loss --model A --label a --model B --label b --output loss.csv
    ttt-eval passkey --model DIR --lengths 256,512 --depths 0,0.5,1 --output passkey.json
    ttt-eval speed ... / ttt-eval state ...

Each subcommand is a module of this package with `add_arguments(parser)` and `run(args) -> int`, imported only
when it runs (so one subcommand's dependencies never slow down or break another). Several processes:
`accelerate launch -m modeling_ttt.evaluation SUBCOMMAND ...` shards the documents and gathers the results on
the main process, which alone writes the outputs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Subcommand name -> module defining `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS = {
    "perplexity": "modeling_ttt.evaluation.perplexity",
    "position-loss": "modeling_ttt.evaluation.position_loss",
    "passkey": "modeling_ttt.evaluation.passkey",
    "speed": "modeling_ttt.evaluation.speed",
    "state": "modeling_ttt.evaluation.state",
}

#: One line of help per subcommand, shown by `ttt-eval --help` without importing the modules.
DESCRIPTIONS = {
    "perplexity": "per-document and corpus perplexity (TTT: streamed through the cache; others: one pass or a "
                  "sliding window)",
    "position-loss": "mean next-token loss by token position, one or more models (CSV + PNG)",
    "passkey": "passkey retrieval accuracy by context length and depth (JSON/CSV + heat map)",
    "speed": "throughput and latency",
    "state": "the recurrent state",
}

EXIT_BAD_INPUT = 2


def _load_module(name: str):
    """The subcommand's module, or `None` if it is not part of this installation (a `ModuleNotFoundError` for
    the module itself; one of its own imports failing is a real error and propagates)."""
    module_name = SUBCOMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of `command` (the subcommand being run) is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="ttt-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name in SUBCOMMANDS:
        sub = subparsers.add_parser(name, help=DESCRIPTIONS.get(name), description=DESCRIPTIONS.get(name))
        if name == command:
            module = _load_module(name)
            if module is not None:
                module.add_arguments(sub)
                sub.set_defaults(_module=module)
    return parser


def _error(message: str) -> int:
    print(f"ttt-eval: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ttt-eval` with `argv` (default: the command line); returns the exit status."""
    from ..data import DataError
    from .common import EvaluationError

    argv = list(sys.argv[1:] if argv is None else argv)
    # the subcommand is the first word that is not an option (`ttt-eval` itself takes only -h)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    command = command if command in SUBCOMMANDS else None
    # said before parsing, so that a missing subcommand is not reported as its arguments being unknown
    if command is not None and _load_module(command) is None:
        return _error(f"the {command!r} subcommand is not available in this installation "
                      f"(module {SUBCOMMANDS[command]} is missing).")
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own usage errors (status 2) and --help (0)
        return int(exit_.code or 0)
    module = args._module
    try:
        return int(module.run(args) or 0)
    except (EvaluationError, DataError) as error:
        return _error(str(error))
    except KeyboardInterrupt:
        print("ttt-eval: interrupted; nothing written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
