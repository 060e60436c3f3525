"""`ttt-eval state`: what the inner models of a TTT model do along a long stream — the size of the inner weights and
the inner (TTT) loss by position, per layer and head — to see the state explode or collapse past the training length.

    ttt-eval state --model runs/ttt --data corpus/ --tokens 16384 --output-dir out/

The stream (one document with `--first-document`, else the documents joined by the EOS token) is fed through the
recurrent `TTTCache` in chunks of whole mini-batches. For every mini-batch `i` (tokens `i·M … i·M+M−1`) and every
layer and head this records

* the state the mini-batch starts from, `W_prev` (the weights after the `i·M` tokens before it): `‖W1‖_F` (and
  `‖W2‖_F` for TTT-MLP) and the relative change from the learned initial weights `‖W1 − W1₀‖_F / ‖W1₀‖_F`;
* the self-supervised reconstruction loss of the mini-batch's tokens (Eq. 4 of Sun et al. 2024, with the inner
  LayerNorm of Sec. 2.7, as `modeling_ttt.ops.naive` defines it: `ℓ_t(W) = ½‖LN(f(x_k,t; W)) − (x_v,t − x_k,t)‖²`)
  at three weights: `loss_init` at the learned `W₀`, `loss_prev` at `W_prev` (before this mini-batch's step) and
  `loss_after` at the weights after its step, `W_prev − s_{M−1} Σ_j η_j ∇ℓ_j(W_prev)` (Sec. 2.5: every gradient
  of a mini-batch is taken at `W_prev`). `loss_prev ≤ loss_init` says the state learned something useful from the
  past; `loss_after < loss_prev` that the step descends.

These are the diagnostics the official JAX trainer plots per layer (the same three weights); it evaluates them on
the last token of each mini-batch only and as a mean over channels of the squared error. Here the loss is the
spec's and, by default, the mean over the mini-batch's tokens (`--loss-tokens last`: its last token, as the trainer).

How: the probe (`InnerLoopProbe`) wraps each layer's inner-loop op for the duration of the run (a forward pre-hook
swaps the op the model passes to the layer), so it sees exactly what the op gets — `x_k`, `x_v` after the
projections, convolutions and RoPE, the per-token learning rates `η`, the state — and the forward itself is
untouched (no cost when not probing). From those it recomputes the mini-batch steps with the spec's functions.

Outputs in `--output-dir`: `state.json` (per layer and head), `state.csv` (per layer and recorded position, heads
averaged), `state.png`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path

import torch

from modeling_ttt.evaluation.speed import DTYPES, write_files_atomically

OUTPUT_NAMES = ("state.json", "state.csv", "state.png")
#: How many times the training length `--tokens` defaults to.
DEFAULT_LENGTH_FACTOR = 8
#: Keys under which a training record in the model folder may give the training sequence length.
TRAINING_LENGTH_KEYS = ("seq_len", "sequence_length", "max_seq_len", "block_size", "context_length", "train_seq_len")
TRAINING_RECORD_FILES = ("training_args.json", "train_config.json", "ttt_train.json", "training.json")


class StateError(ValueError):
    """Bad input to `ttt-eval state` (reported as one line, exit status 2)."""


# -- the inner-loop diagnostics ----------------------------------------------------------------------------------


def inner_loss(weights, xk: torch.Tensor, xv: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor):
    """Per-token reconstruction loss `ℓ_t(W) = ½‖LN(f(x_k,t; W)) − (x_v,t − x_k,t)‖²` (`ops/naive.py`), `[..., L]`.

    weights: `(W1, b1[, W2, b2])`, broadcastable against `xk`, `xv` (`[B, H, L, d]`); ln_*: `[H, 1, d]`."""
    from modeling_ttt.ops.naive import inner_model, layer_norm

    prediction = layer_norm(inner_model(weights, xk), ln_weight, ln_bias)
    return 0.5 * ((prediction - (xv - xk)) ** 2).sum(dim=-1)


def mini_batch_diagnostics(initial_weights, xk, xv, inner_lr, params, state, loss_tokens: str = "all"):
    """The diagnostics of every whole mini-batch of one op call (see the module docstring), per row and head.

    initial_weights: the layer's learned `(W1, b1, ...)` (`[H, ...]`); xk, xv `[B, H, T, d]`, inner_lr `[B, H, T]`,
    params (`InnerLoopParams`), state (`InnerState`, at a mini-batch boundary): what the op receives.
    Returns a dict of `[n, B, H]` tensors (`n = T // M` mini-batches) and the weights after the last step."""
    from modeling_ttt.ops.naive import loss_grads_per_token, weighted_grad_sum
    from modeling_ttt.ops.state import in_inner_dtype

    _, xk, xv, inner_lr, params, state = in_inner_dtype(xk, xk, xv, inner_lr, params, state)
    mini_batch_size = params.token_scale.shape[0]
    if bool((state.seen % mini_batch_size != 0).any()):
        raise ValueError("the probe needs chunks that start at a mini-batch boundary")
    heads, head_dim = xk.shape[1], xk.shape[-1]
    ln_weight, ln_bias = params.ln_weight.view(heads, 1, head_dim), params.ln_bias.view(heads, 1, head_dim)
    initial = tuple(w.to(xk.dtype) for w in initial_weights)
    initial_norms = [w.flatten(-2).norm(dim=-1) for w in initial[0::2]]  # ‖W1₀‖, ‖W2₀‖ per head

    def reduce(losses):  # [B, H, M] -> [B, H]
        return losses.mean(dim=-1) if loss_tokens == "all" else losses[..., -1]

    records = {name: [] for name in ("loss_init", "loss_prev", "loss_after")}
    for k in range(len(initial) // 2):
        records[f"norm_W{k + 1}"], records[f"change_W{k + 1}"] = [], []
    weights = state.weights
    for start in range(0, xk.shape[2] - mini_batch_size + 1, mini_batch_size):
        batch = slice(start, start + mini_batch_size)
        tokens_k, tokens_v, lr = xk[:, :, batch], xv[:, :, batch], inner_lr[:, :, batch]
        for k, (w, w0, norm0) in enumerate(zip(weights[0::2], initial[0::2], initial_norms)):
            records[f"norm_W{k + 1}"].append(w.flatten(-2).norm(dim=-1))
            records[f"change_W{k + 1}"].append((w - w0).flatten(-2).norm(dim=-1) / norm0)
        records["loss_init"].append(reduce(inner_loss(initial, tokens_k, tokens_v, ln_weight, ln_bias)))
        records["loss_prev"].append(reduce(inner_loss(weights, tokens_k, tokens_v, ln_weight, ln_bias)))
        # the step of Sec. 2.5: all gradients at W_prev, weighted by η_j, scaled by the last position's s_{M-1}
        maps = loss_grads_per_token(weights, tokens_k, tokens_v, ln_weight, ln_bias)
        steps = weighted_grad_sum(maps, lr)
        weights = tuple(w - params.token_scale[-1] * g for w, g in zip(weights, steps))
        records["loss_after"].append(reduce(inner_loss(weights, tokens_k, tokens_v, ln_weight, ln_bias)))
    return {name: torch.stack(values) for name, values in records.items()}, weights


class InnerLoopProbe:
    """While active (`with InnerLoopProbe(model) as probe:`), every TTT layer's inner-loop op is wrapped: the op runs
    as usual and `mini_batch_diagnostics` is computed from its arguments. `probe.records[layer]` is a list of the
    per-call dicts; `probe.last_weights[layer]` the probe's own weights after the last call (for checks against the
    cache). The layers and the model are not modified; the hooks are removed on exit."""

    def __init__(self, model, loss_tokens: str = "all"):
        from modeling_ttt.layers import TTTLayerBase

        self.layers = [m for m in model.modules() if isinstance(m, TTTLayerBase)]
        if not self.layers:
            raise ValueError("the model has no TTT layers")
        self.loss_tokens = loss_tokens
        self.records = {layer.layer_idx: [] for layer in self.layers}
        self.last_weights = {}
        self._handles = []

    def _wrap(self, layer, op):
        def probed_op(xq, xk, xv, inner_lr, params, state, num_tokens=None):
            result = op(xq, xk, xv, inner_lr, params, state, num_tokens)
            if num_tokens is not None:
                raise ValueError("the probe takes unpadded streams (num_tokens=None)")
            with torch.no_grad():
                record, self.last_weights[layer.layer_idx] = mini_batch_diagnostics(
                    layer.inner_weights(), xk, xv, inner_lr, params, state, self.loss_tokens)
            self.records[layer.layer_idx].append(record)
            return result

        return probed_op

    def _pre_hook(self, layer, args, kwargs):
        # TTTLayerBase.forward(hidden_states, layer_state=None, num_tokens=None, inner_loop=None)
        from modeling_ttt.ops import get_ttt_ops

        args = list(args)
        op = args[3] if len(args) > 3 else kwargs.get("inner_loop")
        if op is None:  # what the layer would pick itself
            op = get_ttt_ops(layer.config.ttt_impl, layer.layer_type, args[0].device, layer.head_dim)
        if len(args) > 3:
            args[3] = self._wrap(layer, op)
        else:
            kwargs["inner_loop"] = self._wrap(layer, op)
        return tuple(args), kwargs

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def stacked(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per layer, every metric as `[num_mini_batches, B, H]` over all calls so far."""
        return {idx: {name: torch.cat([r[name] for r in calls]) for name in calls[0]}
                for idx, calls in self.records.items() if calls}


@torch.inference_mode()
def stream_state_statistics(model, input_ids: torch.Tensor, chunk_size: int, loss_tokens: str = "all",
                            progress: bool = False):
    """Feed `input_ids` (`[B, N]`, N a multiple of the mini-batch size) through a `TTTCache` in chunks of
    `chunk_size` tokens (a multiple of the mini-batch size) with the probe on. Returns `(per-layer metrics
    [n, B, H], probe, cache)`."""
    from tqdm.auto import tqdm

    from modeling_ttt import TTTCache

    cache = TTTCache(model.config)
    starts = range(0, input_ids.shape[1], chunk_size)
    with InnerLoopProbe(model, loss_tokens) as probe:
        for start in tqdm(starts, desc="state", disable=not progress):
            model(input_ids[:, start : start + chunk_size], cache=cache, use_cache=True, logits_to_keep=1)
    return probe.stacked(), probe, cache


# -- positions and outputs ---------------------------------------------------------------------------------------


def record_indices(num_mini_batches: int, points: int, every: int | None) -> list[int]:
    """Mini-batch indices to keep: every `every`-th, or about `points` log-spaced ones; the first and last always."""
    if every:
        indices = set(range(0, num_mini_batches, every))
    else:
        indices = {round(math.exp(math.log(num_mini_batches) * j / max(points - 1, 1))) - 1 for j in range(points)}
    return sorted(indices | {0, num_mini_batches - 1})


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None


def build_outputs(metrics: dict[int, dict[str, torch.Tensor]], indices: list[int], mini_batch_size: int):
    """(JSON layers, CSV rows): per layer and head, and per (layer, position) with heads averaged (row 0 of the batch)."""
    layers, rows = [], []
    for layer_idx in sorted(metrics):
        values = {name: tensor[indices, 0].float() for name, tensor in metrics[layer_idx].items()}  # [P, H]
        layers.append(dict(layer=layer_idx, positions=[i * mini_batch_size for i in indices],
                           **{name: [[_finite_or_none(v) for v in row] for row in tensor.tolist()]
                              for name, tensor in values.items()}))
        for p, index in enumerate(indices):
            row = dict(layer=layer_idx, mini_batch=index, position=index * mini_batch_size)
            for name, tensor in values.items():
                row[name] = _finite_or_none(tensor[p].mean().item())
                if name.startswith("norm_"):
                    row[name + "_max_head"] = _finite_or_none(tensor[p].max().item())
            rows.append(row)
    return layers, rows


def _plot(rows: list[dict], mini_batch_size: int, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layer_ids = sorted({r["layer"] for r in rows})
    norm_names = [n for n in ("norm_W1", "norm_W2") if n in rows[0]]
    figure, axes = plt.subplots(1, 2 + len(norm_names), figsize=(5 * (2 + len(norm_names)), 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(layer_ids)))
    by_layer = {layer: [r for r in rows if r["layer"] == layer] for layer in layer_ids}
    # x: tokens seen at the end of the mini-batch, so that the first mini-batch sits at M on the log axis
    x = [r["position"] + mini_batch_size for r in by_layer[layer_ids[0]]]

    def column(layer, key):
        return np.array([np.nan if r[key] is None else r[key] for r in by_layer[layer]], dtype=float)

    titles = {"norm_W1": "‖W1‖_F of the state (mean over heads)", "norm_W2": "‖W2‖_F of the state (mean over heads)",
              "change_W1": "‖W1 − W1₀‖_F / ‖W1₀‖_F (mean over heads)"}
    for axis, key in zip(axes, norm_names + ["change_W1"]):
        for color, layer in zip(colors, layer_ids):
            axis.plot(x, column(layer, key), color=color, lw=1, label=f"layer {layer}")
        axis.set_title(titles[key], fontsize=10)
    loss_axis = axes[-1]
    for key, color, name in (("loss_init", "tab:orange", "at W₀ (learned init)"),
                             ("loss_prev", "tab:blue", "at W_prev (before the step)"),
                             ("loss_after", "tab:red", "after the step")):
        table = np.stack([column(layer, key) for layer in layer_ids])  # [layers, positions]
        loss_axis.plot(x, np.nanmean(table, axis=0), color=color, label=name)
        loss_axis.fill_between(x, np.nanmin(table, axis=0), np.nanmax(table, axis=0), color=color, alpha=0.15)
    loss_axis.set_title("inner loss of the mini-batch (mean over layers; band: min-max)", fontsize=10)
    loss_axis.set_yscale("log")
    loss_axis.legend(fontsize=8)
    if len(layer_ids) <= 12:
        axes[0].legend(fontsize=7)
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xlabel("tokens seen at the end of the mini-batch")
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _csv_bytes(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


# -- inputs ------------------------------------------------------------------------------------------------------


def training_length(model_dir: str | None, config) -> tuple[int, str]:
    """The training sequence length of a model and where it comes from: a training record in the folder
    (`TRAINING_RECORD_FILES`, one of `TRAINING_LENGTH_KEYS`), else the config's `max_position_embeddings`."""
    if model_dir:
        for name in TRAINING_RECORD_FILES:
            path = Path(model_dir) / name
            if not path.is_file():
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for key in TRAINING_LENGTH_KEYS:
                value = record.get(key) if isinstance(record, dict) else None
                if isinstance(value, int) and value > 0:
                    return value, f"{name}:{key}"
    return config.max_position_embeddings, "max_position_embeddings"


def load_model(args, device: torch.device, dtype: torch.dtype):
    import modeling_ttt  # noqa: F401  (registers TTT with the auto classes)
    from modeling_ttt import PRESET_NAMES, TTTConfig, TTTForCausalLM

    if bool(args.model) == bool(args.preset):
        raise StateError("give exactly one of --model PATH or --preset NAME")
    if args.preset:
        if args.preset not in PRESET_NAMES:
            raise StateError(f"--preset {args.preset!r} is not one of {', '.join(PRESET_NAMES)}")
        torch.manual_seed(args.seed)
        model = TTTForCausalLM(TTTConfig.from_preset(args.preset))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not os.path.isdir(args.model):
            raise StateError(f"--model {args.model}: not a folder")
        try:
            if AutoConfig.from_pretrained(args.model).model_type != "ttt":
                raise StateError(f"--model {args.model}: not a TTT model (the state statistics need TTT layers)")
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        except (OSError, KeyError) as error:
            raise StateError(f"--model {args.model}: cannot load ({str(error).splitlines()[0]})") from None
    if args.ttt_impl:
        from modeling_ttt.ops import resolve_ttt_impl

        try:
            resolve_ttt_impl(args.ttt_impl, device)
        except (RuntimeError, ValueError) as error:
            raise StateError(f"--ttt-impl {args.ttt_impl}: {error}") from None
        model.config.ttt_impl = args.ttt_impl
    return model.to(device=device, dtype=dtype).eval()


def token_stream(args, model, num_tokens: int) -> tuple[torch.Tensor, str]:
    """`[1, num_tokens]` token ids and a description of where they come from."""
    if args.random_tokens:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=generator), "random token ids"
    from transformers import AutoTokenizer

    from modeling_ttt.data import DEFAULT_CORPUS, DataError, iter_documents

    source = args.tokenizer or args.model
    if not source:
        raise StateError("no tokenizer: give --tokenizer PATH (or a --model folder with one, or --random-tokens)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise StateError(f"cannot load a tokenizer from {source} ({str(error).splitlines()[0]})") from None
    ids, documents = [], 0
    try:
        for document in iter_documents(args.data or None, text_field=args.text_field):
            if documents and args.first_document:
                break
            if documents and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            ids.extend(tokenizer(document.text, add_special_tokens=False)["input_ids"])
            documents += 1
            if len(ids) >= num_tokens:
                break
    except DataError as error:
        raise StateError(str(error)) from None
    where = ", ".join(args.data) if args.data else DEFAULT_CORPUS
    if len(ids) < num_tokens:
        what = "the first document" if args.first_document else "the data"
        raise StateError(f"{what} ({where}) has {len(ids)} tokens, fewer than --tokens {num_tokens}")
    if any(i >= model.config.vocab_size for i in ids[:num_tokens]):
        raise StateError(f"the tokenizer of {source} gives ids beyond the model's vocabulary "
                         f"({model.config.vocab_size})")
    return torch.tensor([ids[:num_tokens]]), f"{documents} document(s) of {where}"


# -- command -----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", default=None, metavar="PATH", help="a saved TTT model folder")
    parser.add_argument("--preset", default=None, metavar="NAME", help="a random-initialised TTT preset instead")
    parser.add_argument("--data", action="append", default=[], metavar="SOURCE",
                        help="text/JSONL file, folder or dataset; repeatable (default: the CPython stdlib sources)")
    parser.add_argument("--text-field", default="text", help="JSONL/dataset field with the text (default text)")
    parser.add_argument("--first-document", action="store_true",
                        help="stream the first document only (default: documents joined by EOS)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="default: the --model folder")
    parser.add_argument("--random-tokens", action="store_true", help="a stream of random token ids instead of data")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"stream length (default {DEFAULT_LENGTH_FACTOR}x the training length recorded in the "
                             "folder, else max_position_embeddings); rounded down to whole mini-batches")
    parser.add_argument("--chunk-size", type=int, default=2048,
                        help="tokens per forward (rounded down to whole mini-batches; default 2048)")
    parser.add_argument("--points", type=int, default=64, help="log-spaced mini-batches to record (default 64)")
    parser.add_argument("--every", type=int, default=None, help="record every k-th mini-batch instead")
    parser.add_argument("--loss-tokens", default="all", choices=("all", "last"),
                        help="inner loss over the mini-batch's tokens (mean) or its last token (official trainer)")
    parser.add_argument("--ttt-impl", default=None, help="inner-loop backend (default: the model's config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("ttt-eval-state"),
                        help="where state.json, state.csv and state.png go (default ./ttt-eval-state)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare(args):
    for name in ("points", "chunk_size"):
        if getattr(args, name) < 1:
            raise StateError(f"--{name.replace('_', '-')} must be at least 1")
    if args.every is not None and args.every < 1:
        raise StateError("--every must be at least 1")
    if args.tokens is not None and args.tokens < 1:
        raise StateError("--tokens must be at least 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise StateError(f"--device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StateError(f"--device {args.device}: CUDA is not available here")
    model = load_model(args, device, DTYPES[args.dtype])
    mini_batch_size = model.config.mini_batch_size
    train_length, length_source = training_length(args.model, model.config)
    requested = args.tokens or DEFAULT_LENGTH_FACTOR * train_length
    num_tokens = requested // mini_batch_size * mini_batch_size
    if num_tokens == 0:
        raise StateError(f"--tokens {requested} is less than one mini-batch ({mini_batch_size} tokens)")
    chunk = max(mini_batch_size, args.chunk_size // mini_batch_size * mini_batch_size)
    input_ids, data_source = token_stream(args, model, num_tokens)
    return device, model, input_ids.to(device), chunk, dict(training_length=train_length,
                                                           training_length_source=length_source,
                                                           data=data_source)


def run(args) -> int:
    try:
        device, model, input_ids, chunk, info = _prepare(args)
    except StateError as error:
        print(f"ttt-eval state: error: {error}", file=sys.stderr)
        return 2
    config = model.config
    metrics, _, _ = stream_state_statistics(model, input_ids, chunk, args.loss_tokens, not args.no_progress)
    num_mini_batches = input_ids.shape[1] // config.mini_batch_size
    indices = record_indices(num_mini_batches, args.points, args.every)
    layers, rows = build_outputs(metrics, indices, config.mini_batch_size)
    meta = dict(command="ttt-eval state", model=args.model or f"preset {args.preset} (random init)",
                ttt_layer_type=config.ttt_layer_type, num_hidden_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads, mini_batch_size=config.mini_batch_size,
                ttt_base_lr=config.ttt_base_lr, tokens=input_ids.shape[1], chunk_size=chunk, device=str(device),
                dtype=args.dtype, loss_tokens=args.loss_tokens,
                loss="0.5 * ||LN(f(x_k; W)) - (x_v - x_k)||^2 per token (ops/naive.py), "
                     + ("mean over the mini-batch" if args.loss_tokens == "all" else "the mini-batch's last token"),
                position="index of the first token of the mini-batch; norms are of the state it starts from",
                **info)
    title = (f"ttt-eval state: {meta['model']}, TTT-{config.ttt_layer_type}, {input_ids.shape[1]} tokens "
             f"(training length {info['training_length']}), mini-batch {config.mini_batch_size}")
    write_files_atomically(args.output_dir, {
        "state.json": json.dumps(dict(meta, layers=layers), indent=1).encode(),
        "state.csv": _csv_bytes(rows),
        "state.png": _plot(rows, config.mini_batch_size, title),
    })
    last = [r for r in rows if r["mini_batch"] == indices[-1]]
    mean = lambda key: sum(r[key] for r in last if r[key] is not None) / len(last)  # noqa: E731
    print(f"{input_ids.shape[1]} tokens ({info['data']}); at position {indices[-1] * config.mini_batch_size}, mean "
          f"over layers: ‖W1‖ {mean('norm_W1'):.4g}, change {mean('change_W1'):.4g}, inner loss init "
          f"{mean('loss_init'):.4g} / before step {mean('loss_prev'):.4g} / after {mean('loss_after'):.4g}")
    print(f"wrote {', '.join(str(args.output_dir / n) for n in OUTPUT_NAMES)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ttt-eval state")
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["InnerLoopProbe", "StateError", "add_arguments", "inner_loss", "main", "mini_batch_diagnostics",
           "record_indices", "run", "stream_state_statistics", "training_length"]
