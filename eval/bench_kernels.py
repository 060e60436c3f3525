"""Inner-loop kernels on a GPU: the PyTorch reference vs the fused Triton kernels (and flash-linear-attention's
`chunk_ttt_linear` when it is installed), forward and forward+backward, plus one decoding step.

    python eval/bench_kernels.py                                  # the issue's table (needs a CUDA GPU)
    python eval/bench_kernels.py --layer-types linear --seq-lens 2048 --decode-batches 1,64

Default problem: B=8, H=32, head_dim=64, mini_batch=16, T in {2k, 8k, 32k}, bf16 inputs and state.
Times are medians of `triton.testing.do_bench` (ms). TFLOP/s are *model* FLOPs — the matmuls of the dual
form as written in torch_chunk.py (per mini-batch and head, M tokens, d = head_dim, F = 4d hidden):

    TTT-Linear forward: 6·M·d² + 4·M²·d         (X_k W, X_q W, G; X_q X_kᵀ, η∇Z)
    TTT-MLP forward:   14·M·d·F + 4·M²·(d + F)
    forward+backward:  3 × forward (the usual convention; the kernels also recompute the forward in backward)

flash-linear-attention's TTT-Linear is a different parameterisation (no per-position token scale, query scale
1/√d) with the same matmul shapes; it is timed on the same shapes as a point of reference only.
Decoding: one token for every row (T = 1) from a state in the middle of a mini-batch, latency in µs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling_ttt.ops import InnerLoopParams, InnerState  # noqa: E402
from modeling_ttt.ops import torch_chunk  # noqa: E402


def model_flops(layer_type: str, batch: int, heads: int, seq_len: int, dim: int, mini_batch: int) -> float:
    num_mini_batches = -(-seq_len // mini_batch)
    if layer_type == "linear":
        per = 6 * mini_batch * dim * dim + 4 * mini_batch * mini_batch * dim
    else:
        hidden = 4 * dim
        per = 14 * mini_batch * dim * hidden + 4 * mini_batch * mini_batch * (dim + hidden)
    return float(batch * heads * num_mini_batches * per)


def make_problem(layer_type, batch, heads, seq_len, dim, mini_batch, dtype, device, seen=0):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    inputs = dict(
        xq=randn(batch, heads, seq_len, dim), xk=randn(batch, heads, seq_len, dim),
        xv=randn(batch, heads, seq_len, dim),
        inner_lr=(torch.rand(batch, heads, seq_len, generator=gen, device=device) / dim).to(dtype),
        params=InnerLoopParams(
            token_scale=(1.0 / torch.arange(1, mini_batch + 1, device=device)).to(dtype),
            ln_weight=torch.ones(heads, dim, device=device, dtype=dtype),
            ln_bias=torch.zeros(heads, dim, device=device, dtype=dtype),
        ),
    )
    if layer_type == "linear":
        shapes = [(dim, dim), (1, dim)]
    else:
        shapes = [(dim, 4 * dim), (1, 4 * dim), (4 * dim, dim), (1, dim)]
    weights = tuple(randn(heads, *s, std=0.02) for s in shapes)
    state = InnerState.initial(weights, batch)
    if seen:
        state = InnerState(tuple(w.contiguous() for w in state.weights), state.grads,
                           torch.full((batch,), seen, device=device, dtype=torch.long))
    return inputs, weights, state


def bench(fn, rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")


def run_ops(fn, inputs, weights, batch, checkpoint_group, backward):
    """One forward (and backward) of an ops function with fresh leaves."""
    leaf = lambda t: t.detach().requires_grad_(backward)  # noqa: E731
    views = {k: leaf(v) for k, v in inputs.items() if k != "params"}
    params = InnerLoopParams(*map(leaf, inputs["params"].tensors()), checkpoint_group=checkpoint_group)
    initial_weights = tuple(leaf(w) for w in weights)
    with torch.set_grad_enabled(backward):
        out, state = fn(**views, params=params, state=InnerState.initial(initial_weights, batch))
        if backward:
            (out.float().square().sum() + state.weights[0].float().square().sum()).backward()
    return out


def fla_ttt_linear():
    """flash-linear-attention's `chunk_ttt_linear` wrapped to our [B, H, T, d] layout, or None."""
    try:
        from fla.ops.ttt import chunk_ttt_linear
    except Exception:  # noqa: BLE001  (not installed, or fails to import on this machine)
        return None
    fla_arguments = inspect.signature(chunk_ttt_linear).parameters

    def call(xq, xk, xv, inner_lr, params, state):
        token_scale, ln_weight, ln_bias = params.tensors()
        mini_batch = token_scale.shape[0]
        dim = xq.shape[-1]
        w0 = state.weights[0].contiguous()
        b0 = state.weights[1].contiguous()
        chunk_arg = {"chunk_size": mini_batch} if "chunk_size" in fla_arguments else {"BT": mini_batch}
        if "head_first" in fla_arguments:
            return chunk_ttt_linear(xq, xk, xv, ln_weight, ln_bias, inner_lr.unsqueeze(-1), scale=1.0 / dim ** 0.5,
                                    initial_state=w0, output_final_state=True, head_first=True, **chunk_arg)
        q, k, v = (x.transpose(1, 2).contiguous() for x in (xq, xk, xv))
        eta = inner_lr.transpose(1, 2).unsqueeze(-1).contiguous()
        kwargs = dict(scale=1.0 / dim ** 0.5, initial_state=w0, output_final_state=True, **chunk_arg)
        if "initial_state_bias" in fla_arguments:
            kwargs["initial_state_bias"] = b0
        return chunk_ttt_linear(q, k, v, ln_weight, ln_bias, eta, **kwargs)

    def adapter(xq, xk, xv, inner_lr, params, state, num_tokens=None):
        result = call(xq, xk, xv, inner_lr, params, state)
        out = result[0]
        final = result[1] if len(result) > 1 and result[1] is not None else state.weights[0]
        return out, InnerState((final,), (), state.seen)

    return adapter


def default_checkpoint_group(layer_type, batch, heads, seq_len, dim, mini_batch, budget_gib=8.0) -> int:
    """Smallest recomputation group keeping the saved per-mini-batch states under `budget_gib`."""
    per_state = dim * dim + dim if layer_type == "linear" else 2 * 4 * dim * dim + 5 * dim
    total = batch * heads * (-(-seq_len // mini_batch)) * per_state * 4 / 2 ** 30
    return 0 if total <= budget_gib else int(-(-total // budget_gib))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer-types", default="linear,mlp")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--seq-lens", default="2048,8192,32768")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--impls", default="torch,triton,fla", help="comma list of: torch, triton, fla")
    parser.add_argument("--checkpoint-group", type=int, default=-1,
                        help="recomputation group for backward (-1: 0 unless the saved states exceed 8 GiB)")
    parser.add_argument("--decode-batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (the Triton kernels only run on CPU under the slow interpreter, "
              "which says nothing about speed). No GPU here: nothing measured. See eval/README.md.", file=sys.stderr)
        return 2
    try:
        from modeling_ttt.ops import triton as triton_ops
    except ImportError as error:
        print(f"bench_kernels.py needs `triton` ({error}).", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    impls = {"torch": {"linear": torch_chunk.ttt_linear, "mlp": torch_chunk.ttt_mlp},
             "triton": {"linear": triton_ops.ttt_linear, "mlp": triton_ops.ttt_mlp}}
    fla = fla_ttt_linear() if "fla" in args.impls.split(",") else None
    if fla is not None:
        impls["fla"] = {"linear": fla}
    chosen = [name for name in args.impls.split(",") if name in impls]
    B, H, d, M = args.batch, args.heads, args.head_dim, args.mini_batch
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | B={B} H={H} d={d} M={M} {args.dtype}"
          f" | fla: {'yes' if fla is not None else 'not installed'}\n")
    results = []

    print("| layer | T | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | ckpt group |")
    print("|---|---|---|---|---|---|---|---|")
    for layer_type in args.layer_types.split(","):
        for seq_len in (int(t) for t in args.seq_lens.split(",")):
            inputs, weights, _ = make_problem(layer_type, B, H, seq_len, d, M, dtype, device)
            flops = model_flops(layer_type, B, H, seq_len, d, M)
            group = args.checkpoint_group
            if group < 0:
                group = default_checkpoint_group(layer_type, B, H, seq_len, d, M)
            for name in chosen:
                fn = impls[name].get(layer_type)
                if fn is None:
                    continue
                row = dict(layer=layer_type, seq_len=seq_len, impl=name, checkpoint_group=group)
                for key, backward in (("fwd", False), ("fwd_bwd", True)):
                    try:
                        ms = bench(lambda: run_ops(fn, inputs, weights, B, group, backward), args.rep_ms)
                        row[f"{key}_ms"] = ms
                        row[f"{key}_tflops"] = flops * (3 if backward else 1) / ms / 1e9
                    except torch.cuda.OutOfMemoryError:
                        row[f"{key}_ms"] = "OOM"
                    except Exception as error:  # noqa: BLE001  (report and go on: e.g. fla without a backward)
                        row[f"{key}_ms"] = f"error: {type(error).__name__}: {str(error)[:80]}"
                    torch.cuda.empty_cache()
                results.append(row)

                def cell(key):
                    value = row.get(key)
                    return f"{value:.3f}" if isinstance(value, float) else str(value)

                print(f"| {layer_type} | {seq_len} | {name} | {cell('fwd_ms')} | {cell('fwd_tflops')} | "
                      f"{cell('fwd_bwd_ms')} | {cell('fwd_bwd_tflops')} | {group} |", flush=True)
            del inputs, weights
            torch.cuda.empty_cache()

    print("\n| layer | batch | impl | decode step µs |")
    print("|---|---|---|---|")
    for layer_type in args.layer_types.split(","):
        for batch in (int(b) for b in args.decode_batches.split(",")):
            inputs, _, state = make_problem(layer_type, batch, H, 1, d, M, dtype, device, seen=M // 2)
            for name in ("torch", "triton"):
                if name not in chosen:
                    continue
                fn = impls[name][layer_type]
                with torch.no_grad():
                    us = 1e3 * bench(lambda: fn(**inputs, state=state), args.rep_ms)
                results.append(dict(layer=layer_type, decode_batch=batch, impl=name, decode_us=us))
                print(f"| {layer_type} | {batch} | {name} | {us:.1f} |", flush=True)

    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
