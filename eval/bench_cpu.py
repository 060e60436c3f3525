"""Prefill throughput of a TTT preset on CPU (fp32, batch 1): a benchmark script, not a test.

    python eval/bench_cpu.py --preset 125m-linear --seq-len 2048

Prints tokens/s (median of `--repeats` timed runs after one warm-up) for two prefill modes:
`last`  — what `generate()` does: the state is built and only the last position's logits are computed;
`all`   — logits for every position (what a full forward / the official port computes).
Peak memory is the process's peak resident set size after each mode (includes the model's weights).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling_ttt import PRESET_NAMES, TTTConfig, TTTForCausalLM  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_prefill(model, input_ids, logits_to_keep: int, repeats: int) -> list[float]:
    times = []
    with torch.inference_mode():
        model(input_ids, use_cache=True, logits_to_keep=logits_to_keep)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids, use_cache=True, logits_to_keep=logits_to_keep)
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m-linear", choices=PRESET_NAMES)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--modes", default="last,all", help="comma list of: last, all")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = TTTConfig.from_preset(args.preset)
    model = TTTForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"preset {args.preset} ({params:.1f}M params), fp32, batch {args.batch_size}, {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'mode':<6} {'median s':>9} {'tok/s':>9} {'peak RSS MiB':>13}")
    for mode in args.modes.split(","):
        keep = {"last": 1, "all": 0}[mode]
        times = time_prefill(model, input_ids, keep, args.repeats)
        median = statistics.median(times)
        tokens = args.batch_size * args.seq_len
        print(f"{mode:<6} {median:>9.3f} {tokens / median:>9.1f} {peak_rss_mib():>13.0f}")


if __name__ == "__main__":
    main()
