"""Compile the Triton TTT kernels for a GPU architecture without a GPU, and report what the launch would need.

    python eval/compile_kernels.py                 # sm_90 (H100/H200), head_dim 64, bf16 and fp32 variants
    python eval/compile_kernels.py --head-dims 64,128 --layer-types linear --arch 90

For each kernel variant it runs Triton's whole compiler (front end, TTGIR, LLVM, ptxas), then prints the shared
memory per block (an H100/H200 allows 227 KiB: more and the launch fails), and, when the bundled ptxas can be
run, registers and spills per thread. This catches what the CPU interpreter of the tests lets through (non-constexpr
globals, names defined in one branch only, tile shapes `tl.dot` refuses, shared-memory overflow); it says nothing
about speed (see bench_kernels.py). TTT-MLP backward variants take about a minute each to compile.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles for a GPU: unset TRITON_INTERPRET.")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modeling_ttt.ops.triton import chunk_linear, chunk_mlp, decode  # noqa: E402
from modeling_ttt.ops.triton.interface import block_size, dot_precision, num_warps_for  # noqa: E402

SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}  # bytes per block (opt-in maximum)
TOKEN_POINTERS = ("xq_ptr", "xk_ptr", "xv_ptr", "out_ptr", "d_out_ptr", "d_xq_ptr", "d_xk_ptr", "d_xv_ptr")


def signature(kernel, constexprs: dict, token_dtype: str) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("end_ptr", "count_ptr"):
            sig[name] = "*i32"
        elif name == "seen_ptr":
            sig[name] = "*i64"
        elif name in TOKEN_POINTERS:
            sig[name] = f"*{token_dtype}"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(layer_type: str, head_dim: int, dtypes: list[str]):
    block_d, mini_batch = block_size(head_dim), 16
    for token_dtype in dtypes:
        torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[token_dtype]
        import torch

        precision = dot_precision(getattr(torch, torch_dtype))
        common = dict(D=head_dim, M=mini_batch, BLOCK_D=block_d, BLOCK_M=16, EPS=1e-6, PRECISION=precision)
        if layer_type == "mlp":
            common.update(F=4 * head_dim, BLOCK_F=block_size(4 * head_dim))
        fwd = chunk_linear.ttt_linear_fwd_kernel if layer_type == "linear" else chunk_mlp.ttt_mlp_fwd_kernel
        bwd = chunk_linear.ttt_linear_bwd_kernel if layer_type == "linear" else chunk_mlp.ttt_mlp_bwd_kernel
        for pending, save in itertools.product((True, False), (True, False)):
            yield fwd, dict(common, HAS_PENDING=pending, SAVE_CKPT=save), token_dtype
        for pending, every_mini_batch in itertools.product((True, False), (True, False)):
            extra = {"CKPT_EVERY": 1} if every_mini_batch else {}  # Triton specialises an argument equal to 1
            yield bwd, dict(common, HAS_PENDING=pending, **extra), token_dtype
        dec = dict(D=head_dim, M=mini_batch, BLOCK_D=block_d, EPS=1e-6)
        if layer_type == "linear":
            yield decode.ttt_linear_decode_kernel, dec, token_dtype
        else:
            yield decode.ttt_mlp_decode_kernel, dict(dec, F=4 * head_dim, BLOCK_F=min(block_size(4 * head_dim), 32)), \
                token_dtype


def ptxas_report(ptx: str, arch: int) -> str:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        ptxas = bin_dir / name
        if not ptxas.exists():
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
            handle.write(ptx)
        result = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", handle.name,
                                 "-o", os.devnull], capture_output=True, text=True)
        os.unlink(handle.name)
        if result.returncode == 0:
            lines = [line.split("info    :")[-1].strip() for line in result.stderr.splitlines()
                     if "registers" in line or "spill" in line]
            return "; ".join(lines)
    return "ptxas report unavailable"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--layer-types", default="linear,mlp")
    parser.add_argument("--head-dims", default="64")
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_MEMORY_LIMIT.get(args.arch)
    failures = 0
    for layer_type in args.layer_types.split(","):
        for head_dim in (int(d) for d in args.head_dims.split(",")):
            for kernel, constexprs, token_dtype in variants(layer_type, head_dim, args.dtypes.split(",")):
                blocks = [constexprs["BLOCK_D"], constexprs.get("BLOCK_F", constexprs["BLOCK_D"])]
                num_warps = num_warps_for(*blocks) if "BLOCK_M" in constexprs else num_warps_for(constexprs["BLOCK_D"])
                label = (f"{kernel.__name__} d={head_dim} {token_dtype} "
                         + " ".join(f"{k}={v}" for k, v in constexprs.items() if k in ("HAS_PENDING", "SAVE_CKPT",
                                                                                        "CKPT_EVERY")))
                start = time.time()
                try:
                    compiled = triton.compile(ASTSource(kernel, signature(kernel, constexprs, token_dtype),
                                                        constexprs=constexprs),
                                              target=target, options=dict(num_warps=num_warps))
                except Exception as error:  # noqa: BLE001
                    failures += 1
                    print(f"FAIL {label}: {type(error).__name__}: {str(error)[:2000]}", flush=True)
                    continue
                shared = compiled.metadata.shared
                too_big = limit is not None and shared > limit
                failures += too_big
                print(f"{'FAIL' if too_big else 'ok  '} {label}: {num_warps} warps, shared {shared / 1024:.0f} KiB"
                      f"{' > limit' if too_big else ''}; {ptxas_report(compiled.asm['ptx'], args.arch)} "
                      f"({time.time() - start:.0f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
