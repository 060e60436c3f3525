"""Decode speed of a TTT preset with the recurrent cache: tokens/s and peak memory vs context length and batch size.

    python eval/bench_decode.py                                   # 125m-linear, contexts 1k..32k, batch 1..32
    python eval/bench_decode.py --contexts 1024,4096 --batch-sizes 1 --new-tokens 32   # a quick run

What is measured, per (context, batch):
* the state after `context` prompt tokens, built by chunked prefill through the cache (`--prefill-chunk` tokens per
  forward, so long prompts fit in memory). The prompt is prefilled once, with batch 1, growing from one context
  length to the next; for batch `B` the state is copied to `B` rows (`TTTCache.batch_repeat_interleave`). A TTT
  state has a fixed size, so the decode cost depends on the batch and the model, not on how the state was built;
  `--prefill-per-batch` prefills every row separately instead (slow on CPU);
* `--new-tokens` greedy decode steps after `--warmup` untimed ones: one forward of one token per row
  (`logits_to_keep=1`), argmax, feed back; `--use-generate` times `model.generate(..., cache=cache)`
  instead (adds generate's own per-step overhead);
* decode tokens/s = B · steps / time (median step), ms per step, process CPU ms per step (with one thread: the
  step's time on a dedicated core, a useful figure when other processes load the machine), peak memory during
  the decode (CPU: the process's peak resident set size, reset before each measurement where Linux allows
  (`/proc/self/clear_refs`, after `malloc_trim` returns memory freed by the prefill), so it includes the model
  weights and the Python/torch runtime; CUDA: peak allocated), and the cache size.

Random weights (`TTTConfig.from_preset`, no checkpoint needed) and random prompts: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling_ttt import PRESET_NAMES, TTTCache, TTTConfig, TTTForCausalLM  # noqa: E402


def _ints(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            values.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return values


# -- memory --------------------------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # glibc keeps freed memory (e.g. the prefill's activations) resident; give it back first
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the measurements ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def prefill(model, cache: TTTCache, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed `input_ids` through the cache in chunks; returns the last position's logits."""
    logits = None
    for start in range(0, input_ids.shape[1], chunk):
        logits = model(input_ids[:, start : start + chunk], cache=cache, logits_to_keep=1).logits
    return logits[:, -1]


@torch.inference_mode()
def time_decode(model, cache: TTTCache, first_token: torch.Tensor, steps: int, warmup: int, device):
    """Per-step wall-clock seconds and process CPU seconds of greedy decoding from `cache`."""
    token = first_token.view(-1, 1)
    times, cpu_times = [], []
    for step in range(warmup + steps):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = model(token, cache=cache, logits_to_keep=1).logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


@torch.inference_mode()
def time_generate(model, cache: TTTCache, history: torch.Tensor, steps: int, warmup: int, device):
    """Wall-clock and CPU seconds per new token of `model.generate` continuing from `cache`."""
    if warmup:
        model.generate(history, attention_mask=torch.ones_like(history), cache=copy.deepcopy(cache),
                       max_new_tokens=warmup, min_new_tokens=warmup, do_sample=False, pad_token_id=0)
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.generate(history, attention_mask=torch.ones_like(history), cache=cache,
                   max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, pad_token_id=0)
    synchronize(device)
    # steps + 1 new tokens: the first comes from the (one-token) prefill of the last history token
    wall, cpu = (time.perf_counter() - start) / (steps + 1), (time.process_time() - cpu_start) / (steps + 1)
    return [wall] * steps, [cpu] * steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m-linear", choices=PRESET_NAMES)
    parser.add_argument("--contexts", type=_ints, default=_ints("1k,2k,4k,8k,16k,32k"),
                        help="comma list of prompt lengths (k = 1024), default 1k,2k,4k,8k,16k,32k")
    parser.add_argument("--batch-sizes", type=_ints, default=_ints("1,2,4,8,16,32"), help="default 1,2,4,8,16,32")
    parser.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per measurement")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward")
    parser.add_argument("--prefill-per-batch", action="store_true",
                        help="prefill every batch row separately (default: prefill once, copy the state)")
    parser.add_argument("--use-generate", action="store_true", help="time model.generate instead of a raw loop")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ttt-impl", default=None, help="override config.ttt_impl (torch, triton, cpp, auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    overrides = {"ttt_impl": args.ttt_impl} if args.ttt_impl else {}
    config = TTTConfig.from_preset(args.preset, **overrides)
    model = TTTForCausalLM(config).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    contexts = sorted(args.contexts)
    print(f"preset {args.preset} ({params:.1f}M params), {args.dtype} on {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.new_tokens} timed steps after {args.warmup} warm-up; prefill chunks of "
          f"{args.prefill_chunk}; {'generate()' if args.use_generate else 'raw decode loop'}", flush=True)
    header = (f"{'context':>8} {'batch':>5} {'tok/s':>9} {'ms/step':>9} {'cpu ms':>9} {'peak MiB':>9} {'cache MiB':>9} "
              f"{'prefill s':>9}")
    print(header)
    print("-" * len(header), flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    max_batch = max(args.batch_sizes) if args.prefill_per_batch else 1
    prompt = torch.randint(3, config.vocab_size, (max_batch, contexts[-1]), generator=gen).to(device)
    results = []
    base_cache, done, last_logits, prefill_seconds = TTTCache(config), 0, None, 0.0
    for context in contexts:
        # grow the shared batch-1 state (or the per-row states) from the previous context to this one
        start = time.perf_counter()
        last_logits = prefill(model, base_cache, prompt[:, done:context], args.prefill_chunk)
        synchronize(device)
        prefill_seconds += time.perf_counter() - start
        done = context
        for batch in args.batch_sizes:
            cache = copy.deepcopy(base_cache)
            logits = last_logits
            if args.prefill_per_batch:
                cache.batch_select_indices(torch.arange(batch, device=device))
                logits = logits[:batch]
            else:
                cache.batch_repeat_interleave(batch)
                logits = logits.repeat_interleave(batch, dim=0)
            first = logits.argmax(dim=-1)
            reset_peak_memory(device)
            if args.use_generate:
                history = torch.cat([prompt[:1, :context].expand(batch, -1), first.view(-1, 1)], dim=1)
                times, cpu_times = time_generate(model, cache, history, args.new_tokens, args.warmup, device)
            else:
                times, cpu_times = time_decode(model, cache, first, args.new_tokens, args.warmup, device)
            step = statistics.median(times)
            row = dict(context=context, batch=batch, tokens_per_second=batch / step, ms_per_step=step * 1000,
                       cpu_ms_per_step=statistics.median(cpu_times) * 1000, peak_mib=peak_memory_mib(device),
                       cache_mib=cache.nbytes() / 2**20, prefill_seconds=prefill_seconds)
            results.append(row)
            print(f"{context:>8} {batch:>5} {row['tokens_per_second']:>9.1f} {row['ms_per_step']:>9.1f} "
                  f"{row['cpu_ms_per_step']:>9.1f} {row['peak_mib']:>9.0f} {row['cache_mib']:>9.2f} "
                  f"{prefill_seconds:>9.1f}", flush=True)
            del cache

    # decode tok/s as a context x batch table
    print("\ndecode tokens/s (rows: context, columns: batch)")
    print(f"{'context':>8}" + "".join(f"{b:>9}" for b in args.batch_sizes))
    for context in contexts:
        cells = {r["batch"]: r["tokens_per_second"] for r in results if r["context"] == context}
        print(f"{context:>8}" + "".join(f"{cells[b]:>9.1f}" for b in args.batch_sizes))
    if args.json:
        args.json.write_text(json.dumps(dict(preset=args.preset, dtype=args.dtype, device=str(device),
                                             threads=torch.get_num_threads(), results=results), indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
