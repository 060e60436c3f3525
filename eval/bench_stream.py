"""Score a long token stream chunk by chunk (`modeling_ttt.streaming.score_stream`) and show that memory stays flat.

    python eval/bench_stream.py --preset 125m-linear --tokens 100000 --chunk-size 2048

Random weights and random tokens unless `--model PATH` (a saved TTT checkpoint) and `--tokens-file FILE` (a .npy or
.pt 1D array of token ids) are given. Prints the resident memory and cache size after chunks (at most ~12 rows),
then the scores: token count, total/mean NLL, perplexity, throughput, loss per position bucket (`--buckets`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling_ttt import PRESET_NAMES, TTTConfig, TTTForCausalLM, score_stream  # noqa: E402


def rss_mib() -> float:
    """Current resident set size (Linux /proc; falls back to the peak from getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_tokens(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path)).long().flatten()
    return torch.as_tensor(torch.load(path, weights_only=True)).long().flatten()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m-linear", choices=PRESET_NAMES)
    parser.add_argument("--model", type=Path, default=None, help="a saved TTT model directory (else random weights)")
    parser.add_argument("--tokens", type=int, default=100_000, help="stream length (random tokens)")
    parser.add_argument("--tokens-file", type=Path, default=None, help=".npy / .pt token ids instead of random ones")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--buckets", default="0,1024,4096,16384,65536",
                        help="comma list of bucket starts over target positions ('' for none)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the summary (and memory trace) here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.model:
        model = TTTForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        model = TTTForCausalLM(TTTConfig.from_preset(args.preset)).eval()
    if args.tokens_file:
        ids = load_tokens(args.tokens_file)
    else:
        ids = torch.randint(3, model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    buckets = [int(b) for b in args.buckets.split(",") if b.strip()] or None

    trace = []
    every = max(1, (len(ids) // args.chunk_size) // 12)

    def record(done, cache):
        trace.append(dict(tokens=done, rss_mib=rss_mib(), cache_mib=cache.nbytes() / 2**20))

    print(f"{args.model or args.preset}: {len(ids)} tokens in chunks of {args.chunk_size}, "
          f"{torch.get_num_threads()} threads; memory before: {rss_mib():.0f} MiB", flush=True)
    result = score_stream(model, ids, chunk_size=args.chunk_size, position_buckets=buckets,
                          return_token_nll=False, progress=not args.no_progress, callback=record)
    print(f"\n{'tokens':>9} {'RSS MiB':>9} {'cache MiB':>9}")
    for i, row in enumerate(trace):
        if i % every == 0 or i == len(trace) - 1:
            print(f"{row['tokens']:>9} {row['rss_mib']:>9.0f} {row['cache_mib']:>9.2f}")
    after_first = [row["rss_mib"] for row in trace[1:]] or [trace[0]["rss_mib"]]
    print(f"RSS after the first chunk: min {min(after_first):.0f} MiB, max {max(after_first):.0f} MiB")
    summary = result.to_dict()
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(dict(summary=summary, memory=trace), indent=2))


if __name__ == "__main__":
    main()
