"""Training-step throughput and memory on CPU: a benchmark script that prints tables, not a test.

    python eval/bench_train.py                                   # 125m-linear, fp32, 1 x 512, ours only
    python eval/bench_train.py --official-port /path/to/ttt.py --port-python /path/to/venv/bin/python
    python eval/bench_train.py --seq-len 2048 --group 4          # scan_checkpoint_group_size=4
    python eval/bench_train.py --autocast bf16                   # forward under torch.autocast("cpu", bfloat16)

One step is forward + backward + optimizer step (AdamW, `labels` loss) of `TTTForCausalLM` in training mode,
timed from the forward to the end of `zero_grad(set_to_none=True)`. Each *run* is a fresh subprocess that builds
the model and the optimizer, takes `--warmup` steps, then times `--steps` steps and reports their median.

`--official-port PATH/ttt.py --port-python PYTHON` also measures the official PyTorch port
(test-time-training/ttt-lm-pytorch, its own `TTTForCausalLM` built with the same sizes and config switches, the
same optimizer construction and the same input) in its own interpreter (it needs transformers 4.x). The runs are
interleaved, ours and the port's alternating which goes first, and every pair is printed with the ratio.

Memory, measured the same way for both sides from the process's resident set (Linux `/proc/self/status`):
`peak - built`: the process's peak RSS over the warm-up steps minus its RSS right after building the model and
the optimizer (so it includes the gradients and AdamW's two state tensors, created by the first step);
`step peak - rest`: the peak RSS during a timed step (the high-water mark reset before it through
`/proc/self/clear_refs`) minus the RSS just before it (model, optimizer state, no gradients), median over the
timed steps. The allocator keeps some freed memory, so the second figure is a lower bound.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+)", status.read(), re.MULTILINE).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _build_ours(args):
    sys.path.insert(0, str(REPO))
    from modeling_ttt import TTTConfig, TTTForCausalLM

    overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
    config = TTTConfig.from_preset(args.preset, scan_checkpoint_group_size=args.group, **overrides)
    return TTTForCausalLM(config), config


def _build_port(args):
    """The port's model with the sizes and switches of our preset (same parameter count, same layer)."""
    sys.path.insert(0, str(REPO))  # only for the preset's JSON, read without importing modeling_ttt
    with open(REPO / "configuration" / f"ttt-{args.preset}.json") as preset_file:
        preset = json.load(preset_file)
    if args.num_layers:
        preset["num_hidden_layers"] = args.num_layers
    spec = importlib.util.spec_from_file_location("official_ttt", args.official_port)
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
            "rope_theta", "use_gate", "share_qk", "ttt_layer_type", "ttt_base_lr", "mini_batch_size", "pre_conv",
            "conv_kernel", "bos_token_id", "eos_token_id")
    config = port.TTTConfig(**{key: preset[key] for key in keys}, use_cache=False,
                            scan_checkpoint_group_size=args.group)
    return port.TTTForCausalLM(config), config


def make_optimizer(parameters, kind: str):
    import torch

    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.1, **options)


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, config = (_build_ours if args.worker == "ours" else _build_port)(args)
    model.train()
    optimizer = make_optimizer(model.parameters(), args.optimizer)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    built_kib = _status_kib("VmRSS")
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=args.autocast == "bf16")

    def step() -> float:
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step() for _ in range(args.warmup)]
    peak_over_built = (_status_kib("VmHWM") - built_kib) / 1024
    times, step_peaks = [], []
    for _ in range(args.steps):
        resting_kib = _status_kib("VmRSS")
        reset = _reset_peak_rss()
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
        if reset:
            step_peaks.append((_status_kib("VmHWM") - resting_kib) / 1024)
    tokens = args.batch_size * args.seq_len
    print("RESULT " + json.dumps({
        "tok_s": tokens / statistics.median(times),
        "step_s": [round(t, 3) for t in times],
        "peak_over_built_mib": peak_over_built,
        "step_peak_mib": statistics.median(step_peaks) if step_peaks else None,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "first_loss": losses[0],
    }))


def run_worker(python: str, side: str, args) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", side, "--preset", args.preset,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--group", str(args.group),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--optimizer", args.optimizer,
               "--autocast", args.autocast, "--threads", str(args.threads), "--num-layers", str(args.num_layers)]
    if side == "port":
        command += ["--official-port", args.official_port]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{side} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m-linear")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--group", type=int, default=0, help="scan_checkpoint_group_size (0: none)")
    parser.add_argument("--num-layers", type=int, default=0, help="override the preset's depth (0: keep it)")
    parser.add_argument("--autocast", default="none", choices=["none", "bf16"])
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach", "loop"],
                        help="AdamW implementation, the same for both sides")
    parser.add_argument("--runs", type=int, default=5, help="fresh subprocesses per side (pairs with the port)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (their median is the run's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--official-port", default=None, help="path to the official port's ttt.py")
    parser.add_argument("--port-python", default=None, help="interpreter with the port's dependencies")
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--worker", default=None, choices=["ours", "port"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if (args.official_port is None) != (args.port_python is None):
        parser.error("--official-port and --port-python go together")
    if args.official_port:
        args.official_port = os.path.abspath(args.official_port)

    depth = f" with {args.num_layers} layers" if args.num_layers else ""
    print(f"preset {args.preset}{depth}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{'bf16 autocast' if args.autocast == 'bf16' else 'fp32'}, scan_checkpoint_group_size {args.group}, "
          f"AdamW {args.optimizer}, {args.runs} runs x (warm-up {args.warmup} + median of {args.steps} steps)")
    print("memory: peak RSS minus RSS after building model + optimizer (`peak-built`), and peak RSS during a "
          "step minus RSS before it (`step`), MiB")
    header = f"{'run':>3} {'ours tok/s':>10} {'peak-built':>10} {'step':>6}"
    if args.official_port:
        header += f" {'port tok/s':>10} {'peak-built':>10} {'step':>6} {'ratio':>6}"
    print(header, flush=True)
    rows = []
    for run in range(args.runs):
        ours_first = run % 2 == 0
        results = {}
        for side in (("ours", "port") if ours_first else ("port", "ours")):
            if side == "port" and not args.official_port:
                continue
            results[side] = run_worker(sys.executable if side == "ours" else args.port_python, side, args)
        rows.append(results)
        ours = results["ours"]
        line = f"{run:>3} {ours['tok_s']:>10.1f} {ours['peak_over_built_mib']:>10.0f} {ours['step_peak_mib'] or 0:>6.0f}"
        if "port" in results:
            port = results["port"]
            line += (f" {port['tok_s']:>10.1f} {port['peak_over_built_mib']:>10.0f} {port['step_peak_mib'] or 0:>6.0f}"
                     f" {ours['tok_s'] / port['tok_s']:>6.2f}")
        print(line + ("" if ours_first else "  (port first)"), flush=True)

    def median(side, key):
        return statistics.median(r[side][key] for r in rows)

    line = (f"{'med':>3} {median('ours', 'tok_s'):>10.1f} {median('ours', 'peak_over_built_mib'):>10.0f} "
            f"{median('ours', 'step_peak_mib') or 0:>6.0f}")
    if args.official_port:
        ratio = statistics.median(r["ours"]["tok_s"] / r["port"]["tok_s"] for r in rows)
        line += (f" {median('port', 'tok_s'):>10.1f} {median('port', 'peak_over_built_mib'):>10.0f} "
                 f"{median('port', 'step_peak_mib') or 0:>6.0f} {ratio:>6.2f}")
    print(line)
    first = rows[0]
    print("params (M): " + ", ".join(f"{side} {r['params_m']:.2f}" for side, r in first.items())
          + "; first loss: " + ", ".join(f"{side} {r['first_loss']:.4f}" for side, r in first.items())
          + f"; threads {first['ours']['threads']}, torch {first['ours']['torch']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "runs": rows}, out, indent=1)


if __name__ == "__main__":
    main()
