"""`ttt-eval speed`: prefill and decode throughput, and memory, against the context length, for TTT models (each
inner-loop backend that runs on the device) and Transformer (Llama, SDPA attention) and Mamba2 baselines.

    ttt-eval speed --preset 125m-linear --baseline llama --baseline mamba2 --lengths 128,512,2048 --output out/s.json
    ttt-eval speed --preset 1.3b-linear --baseline llama --baseline mamba2 --device cuda --dtype bfloat16 \
        --lengths 1024,2048,4096,8192,16384 --output out/speed-1.3b.json      # the paper's largest size, on a GPU
    ttt-eval speed --model runs/ttt --label ttt --model runs/llama --label llama --device cuda --dtype bfloat16

What is measured, for every (model, backend, context length L), batch `--batch-size`, random token ids:

* prefill: one forward of L tokens that builds the model's cache, as `generate()` does (`use_cache=True`,
  logits of the last position only); `--warmup` untimed forwards, then the median of `--repeats` timed ones;
  tokens/s = batch · L / median.
* decode: one-token steps continuing from the cache of an L-token prefill; `--warmup` untimed steps, then the
  median of `--decode-tokens` timed steps; tokens/s = batch / median step. TTT's `TTTCache` has a fixed size
  (the inner weights, Sec. 2 of Sun et al. 2024), a Transformer's KV cache grows with L; `cache_mib` is the size of
  the cache after the decode (the bytes of its tensors).
* peak memory of each phase. On CUDA `torch.cuda.max_memory_allocated` (reset before the phase; it includes the
  weights). On the CPU the peak resident set size of this process (Linux `VmHWM`, reset before the phase after
  returning freed heap memory to the system): it includes the weights and the Python/torch runtime, and the
  output records which method was used (`memory_method`), including when the reset is not possible (then the
  figure is the process's peak so far and only its growth is meaningful).

Random-initialised models: `--preset NAME` (TTT) and `--baseline llama|mamba2`, sized to the parameter count of
the first TTT model of the run exactly as `ttt-train --arch llama|mamba2` sizes them
(`modeling_ttt.train.baseline_config`). Speed does not depend on the weights. Mamba2 is fast only with the
`mamba_ssm` and `causal_conv1d` kernels (CUDA); without them transformers runs a PyTorch reference, and the JSON
says so (`fast_kernels`).

Outputs: `--output FILE.json` (default `speed.json`) with the settings and every row, the rows as CSV (`--csv`,
default beside it) and the plot (`--plot`, default beside it), written together or not at all.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import common
from .common import EvaluationError
from ..train import baseline_config, count_parameters

BASELINE_ARCHS = ("llama", "mamba2")
DTYPES = {name: common.DTYPES[name] for name in ("float32", "bfloat16", "float16")}
CSV_FIELDS = ("label", "arch", "ttt_impl", "params", "device", "dtype", "batch", "length",
              "prefill_tokens_per_s", "prefill_ms", "prefill_peak_mib", "decode_tokens_per_s", "decode_ms_per_token",
              "decode_peak_mib", "cache_mib", "weights_mib", "memory_method")


# -- memory ------------------------------------------------------------------------------------------------------


def _release_heap() -> None:
    try:  # glibc keeps freed memory (e.g. the previous phase's activations) resident; give it back first
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory of one phase on `device` (see the module docstring); `method` says what the numbers are."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated (includes the weights)"
        elif self._can_reset_rss():
            self.method = "process peak RSS, reset per phase (includes the weights and the runtime)"
        else:
            self.method = "process peak RSS since start, not resettable here (includes the weights and the runtime)"

    @staticmethod
    def _can_reset_rss() -> bool:
        if _read_status_mib("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: 5 resets the peak resident set size (VmHWM) to the current one
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_heap()
        if self.method.startswith("process peak RSS, reset"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _read_status_mib("VmHWM")
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return peak


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (a cache object, with its lists, dicts, dataclass
    and object attributes): the size of any model's cache without knowing its class."""
    seen_storages, seen_objects, total = set(), set(), 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen_storages:
                seen_storages.add(key)
                total += storage.nbytes()
            continue
        if id(item) in seen_objects or isinstance(item, (str, bytes, int, float, bool, type(None))):
            continue
        seen_objects.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return total


# -- models ------------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """A model of the run, built only when its turn comes (`build()`) and freed after it, so that no other model's
    weights count in its memory figures."""

    label: str
    arch: str  # "ttt", "llama", "mamba2" or another model_type
    config: object  # its transformers config (checked before anything is measured)
    build: Callable[[], torch.nn.Module]
    impls: list[str] = field(default_factory=lambda: [""])  # TTT backends to run ("" for other models)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_impls(device: torch.device) -> list[str]:
    """The TTT backends that can run on `device`: the PyTorch ops everywhere, the C++ decoding kernels on the CPU
    (when they build), the Triton kernels on CUDA (when Triton is installed)."""
    from modeling_ttt.ops import resolve_ttt_impl

    impls = ["torch"]
    for impl in ("cpp",) if device.type == "cpu" else ("triton",) if device.type == "cuda" else ():
        try:
            resolve_ttt_impl(impl, device)
            impls.append(impl)
        except RuntimeError:
            pass
    return impls


def check_impls(impls: list[str], device: torch.device) -> list[str]:
    """`impls` resolved on `device` ("auto" becomes what it picks), or an `EvaluationError` naming one that cannot
    run."""
    from modeling_ttt.ops import TTT_IMPLEMENTATIONS, resolve_ttt_impl

    resolved = []
    for impl in impls:
        if impl not in TTT_IMPLEMENTATIONS:
            raise EvaluationError(f"--ttt-impl {impl!r} is not one of {', '.join(TTT_IMPLEMENTATIONS)}")
        try:
            name = resolve_ttt_impl(impl, device)
        except (RuntimeError, ValueError) as error:
            raise EvaluationError(f"--ttt-impl {impl} cannot run on {device}: {error}") from None
        if name not in resolved:
            resolved.append(name)
    return resolved


def fast_kernels(arch: str) -> bool | None:
    """For Mamba2, whether transformers finds the fused `mamba_ssm` and `causal_conv1d` kernels (without them it
    runs its much slower PyTorch reference, and the comparison says little about Mamba2 itself); None otherwise."""
    if arch != "mamba2":
        return None
    from transformers.utils.import_utils import is_causal_conv1d_available, is_mamba_2_ssm_available

    return bool(is_mamba_2_ssm_available() and is_causal_conv1d_available())


def _folder_spec(path: str, label: str, dtype: torch.dtype, device: torch.device, impls: list[str]) -> ModelSpec:
    import modeling_ttt  # noqa: F401  (registers TTT with the auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = common.check_model_folder(path)  # no tokenizer needed: the inputs are random ids
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:  # an unreadable config.json: the folder's problem, in one line
        raise EvaluationError(f"cannot read the config of {str(path)!r}: {type(error).__name__}") from None

    def build():
        kwargs = {"attn_implementation": "sdpa"} if config.model_type == "llama" else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        except Exception as error:  # any failure to build the model is the folder's problem, named in one line
            message = " ".join(str(error).split())[:300]
            raise EvaluationError(f"cannot load a causal LM from {str(path)!r}: {type(error).__name__}: "
                                  f"{message}") from None
        return model.to(device).eval()

    arch = config.model_type
    return ModelSpec(label, arch, config, build, list(impls) if arch == "ttt" else [""])


def model_specs(args, device: torch.device, dtype: torch.dtype, impls: list[str]) -> list[ModelSpec]:
    """The models of the run, in order: `--model` folders, `--preset` TTT models, then `--baseline` models sized to
    the first TTT model (parameter counts from the configs, on the meta device)."""
    from transformers import AutoModelForCausalLM

    from modeling_ttt import PRESET_NAMES, TTTConfig, TTTForCausalLM

    specs = []
    for index, path in enumerate(args.model):
        label = args.label[index] if args.label else Path(path).name or str(path)
        specs.append(_folder_spec(path, label, dtype, device, impls))
    for name in args.preset:
        if name not in PRESET_NAMES:
            raise EvaluationError(f"--preset {name!r} is not one of {', '.join(PRESET_NAMES)}")
        config = TTTConfig.from_preset(name)

        def build(config=config):
            torch.manual_seed(args.seed)
            return TTTForCausalLM(config).to(device=device, dtype=dtype).eval()

        specs.append(ModelSpec(f"ttt-{name}", "ttt", config, build, list(impls)))
    if args.baseline:
        reference = next((spec.config for spec in specs if spec.arch == "ttt"), None)
        if reference is None:
            raise EvaluationError("--baseline needs a TTT model to match in size (--preset or a TTT --model folder)")
        for arch in args.baseline:
            # positions for the longest prefill plus its decode steps
            config = baseline_config(arch, reference, seq_len=max(args.lengths) + args.warmup + args.decode_tokens)[0]

            def build(config=config):
                torch.manual_seed(args.seed)
                kwargs = {"attn_implementation": "sdpa"} if config.model_type == "llama" else {}
                return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs).to(device).eval()

            specs.append(ModelSpec(arch, arch, config, build))
    if not specs:
        raise EvaluationError(f"nothing to measure: give --model PATH, --preset NAME ({', '.join(PRESET_NAMES)}) "
                              "and/or --baseline")
    return specs


# -- measurements ------------------------------------------------------------------------------------------------


#: Where an output holds the model's cache, which is also the forward argument taking it back: `cache` from
#: transformers 5.24 on; before, `past_key_values` (TTT, Llama) or `cache_params` (Mamba2).
CACHE_FIELDS = ("cache", "past_key_values", "cache_params")


def _model_cache(output) -> tuple[str, object]:
    for name in CACHE_FIELDS:
        if getattr(output, name, None) is not None:
            return name, getattr(output, name)
    raise EvaluationError(f"the model returned no cache (none of {', '.join(CACHE_FIELDS)} in its output): "
                          "decode speed needs one")


@torch.inference_mode()
def measure(model, length: int, args, device: torch.device, memory: PeakMemory) -> dict:
    """One (model, length) point: prefill and decode speed and peak memory (see the module docstring)."""
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.batch_size, length), generator=generator).to(device)

    def prefill():
        return model(input_ids, use_cache=True, logits_to_keep=1)

    for _ in range(args.warmup):
        prefill()
    memory.reset()
    times, output = [], None
    for _ in range(args.repeats):
        output = None  # the previous repeat's cache must not count in this one's peak
        _synchronize(device)
        start = time.perf_counter()
        output = prefill()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    prefill_peak = memory.peak_mib()
    prefill_seconds = statistics.median(times)

    cache_name, cache = _model_cache(output)
    token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
    del output
    memory.reset()
    steps = []
    for step in range(args.warmup + args.decode_tokens):
        _synchronize(device)
        start = time.perf_counter()
        output = model(token, **{cache_name: cache}, use_cache=True, logits_to_keep=1)
        token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        _synchronize(device)
        if step >= args.warmup:
            steps.append(time.perf_counter() - start)
        cache = getattr(output, cache_name)
    decode_peak = memory.peak_mib()
    step_seconds = statistics.median(steps)
    return dict(prefill_tokens_per_s=args.batch_size * length / prefill_seconds, prefill_ms=prefill_seconds * 1e3,
                prefill_peak_mib=prefill_peak, decode_tokens_per_s=args.batch_size / step_seconds,
                decode_ms_per_token=step_seconds * 1e3, decode_peak_mib=decode_peak,
                cache_mib=tensor_bytes(cache) / 2**20)


# -- outputs -----------------------------------------------------------------------------------------------------


def plot(rows: list[dict], memory_method: str, title: str):
    """The figure: throughput, peak memory and cache size against the context length (log axes)."""
    plt = common.pyplot()

    panels = (("prefill_tokens_per_s", "prefill tokens/s", True), ("decode_tokens_per_s", "decode tokens/s", True),
              ("decode_peak_mib", "peak memory while decoding (MiB)", False), ("cache_mib", "cache size (MiB)", True))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    series = {}
    for row in rows:
        series.setdefault(row["label"] + (f" [{row['ttt_impl']}]" if row["ttt_impl"] else ""), []).append(row)
    for axis, (key, name, log_y) in zip(axes, panels):
        for line, points in series.items():
            points = sorted(points, key=lambda r: r["length"])
            axis.plot([p["length"] for p in points], [max(p[key], 1e-6) for p in points], marker="o", label=line)
        axis.set_xscale("log", base=2)
        if log_y:
            axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_title(name, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{title}\nmemory: {memory_method}", fontsize=9)
    figure.tight_layout()
    return figure



# -- command -----------------------------------------------------------------------------------------------------


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="a saved causal LM folder (any AutoModelForCausalLM; no tokenizer needed); repeatable")
    models.add_argument("--label", action="append", default=[], metavar="NAME",
                        help="a name for each --model, in the same order (default: the folder name)")
    models.add_argument("--preset", action="append", default=[], metavar="NAME",
                        help="a random-initialised TTT preset, e.g. 125m-linear; repeatable")
    models.add_argument("--baseline", action="append", default=[], choices=BASELINE_ARCHS,
                        help="a random-initialised baseline sized to the first TTT model; repeatable")
    models.add_argument("--ttt-impl", default=None, metavar="LIST",
                        help="comma list of TTT backends (torch, cpp, triton, auto); default: all that run here")
    models.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="default float32")
    models.add_argument("--device", default=None,
                        help="torch device (default: this process's accelerate device: a GPU if there is one)")
    timing = parser.add_argument_group("measurements")
    timing.add_argument("--lengths", type=_positive_ints, default=[128, 512, 2048], metavar="LIST",
                        help="context lengths (default 128,512,2048)")
    timing.add_argument("--batch-size", type=int, default=1, help="rows per forward (default 1)")
    timing.add_argument("--repeats", type=int, default=3, help="timed prefill forwards per point (median; default 3)")
    timing.add_argument("--decode-tokens", type=int, default=16,
                        help="timed decode steps per point (median; default 16)")
    timing.add_argument("--warmup", type=int, default=1, help="untimed forwards / steps before each timing (default 1)")
    timing.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    timing.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")
    parser.add_argument("--output", default="speed.json", metavar="FILE.json",
                        help="settings and rows (default speed.json)")
    parser.add_argument("--csv", default=None, metavar="FILE.csv", help="the rows (default: beside --output)")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="the plot (default: beside --output)")
    common.add_common_arguments(parser)


def _check_args(args) -> torch.device:
    for name in ("batch_size", "repeats", "decode_tokens"):
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise EvaluationError("--warmup must be at least 0")
    if args.threads is not None and args.threads < 1:
        raise EvaluationError("--threads must be at least 1")
    if args.label and len(args.label) != len(args.model):
        raise EvaluationError(f"got {len(args.label)} --label for {len(args.model)} --model; give one per model or "
                              "none")
    if os.environ.get("TTT_IMPL"):
        raise EvaluationError("the TTT_IMPL environment variable would override every --ttt-impl; unset it")
    state = common.process_state()
    if state.num_processes > 1:  # several processes would time each other
        raise EvaluationError("ttt-eval speed runs in one process; run it without accelerate launch")
    device = common.resolve_device(args.device, state)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {args.device}: CUDA is not available here")
    return device


def run(args: argparse.Namespace) -> int:
    device = _check_args(args)
    impls = check_impls(args.ttt_impl.split(","), device) if args.ttt_impl else default_impls(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = model_specs(args, device, DTYPES[args.dtype], impls)  # every input checked before any measurement

    memory = PeakMemory(device)
    lengths = sorted(set(args.lengths))
    rows, models = [], []
    bar = common.progress(total=sum(len(spec.impls) for spec in specs) * len(lengths), enabled=not args.no_progress,
                          desc="speed")
    for spec in specs:
        model = spec.build()
        params = sum(p.numel() for p in model.parameters())
        weights_mib = tensor_bytes(dict(model.named_parameters())) / 2**20
        models.append(dict(label=spec.label, arch=spec.arch, params=params, ttt_impls=[i for i in spec.impls if i],
                           fast_kernels=fast_kernels(spec.arch), config=model.config.to_diff_dict()))
        for impl in spec.impls:
            if impl:
                model.config.ttt_impl = impl  # the layers resolve the backend from the config at every forward
            if args.warmup:
                # one untimed point first: lazy work of a model's first calls (kernel builds and loads, allocator
                # growth, first-call dispatch) must not land in the first length's numbers
                measure(model, lengths[0], args, device, memory)
            for length in lengths:
                result = measure(model, length, args, device, memory)
                rows.append(dict(label=spec.label, arch=spec.arch, ttt_impl=impl, params=params, device=str(device),
                                 dtype=args.dtype, batch=args.batch_size, length=length, weights_mib=weights_mib,
                                 memory_method=memory.method, **result))
                bar.update(1)
        del model  # before the next model is built: its weights must not count in the next one's memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results = dict(
        command="ttt-eval speed", device=str(device), device_name=device_name, dtype=args.dtype,
        threads=torch.get_num_threads(), torch=torch.__version__, batch_size=args.batch_size, repeats=args.repeats,
        decode_tokens=args.decode_tokens, warmup=args.warmup, lengths=lengths, memory_method=memory.method,
        models=models,
        results=rows)
    title = f"ttt-eval speed: {args.dtype} on {device_name}, batch {args.batch_size}"
    csv_path = args.csv or common.default_path(args.output, ".csv")
    plot_path = args.plot or common.default_path(args.output, ".png")
    common.write_results([common.json_output(args.output, results), common.csv_output(csv_path, rows, CSV_FIELDS),
                          common.figure_output(plot_path, plot(rows, memory.method, title))])
    for row in rows:
        impl = f" [{row['ttt_impl']}]" if row["ttt_impl"] else ""
        print(f"{row['label']}{impl} L={row['length']}: prefill {row['prefill_tokens_per_s']:.1f} tok/s, decode "
              f"{row['decode_tokens_per_s']:.1f} tok/s, peak {row['decode_peak_mib']:.0f} MiB, cache "
              f"{row['cache_mib']:.3f} MiB")
    print(f"wrote {args.output}, {csv_path}, {plot_path}")
    return 0


__all__ = ["BASELINE_ARCHS", "PeakMemory", "add_arguments", "baseline_config", "count_parameters", "measure",
           "plot", "run", "tensor_bytes"]
