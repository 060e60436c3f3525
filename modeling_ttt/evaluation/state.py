"""`ttt-eval state`: what the inner models of a TTT model do along a long stream — the size of the inner weights
and the inner (TTT) loss by position, per layer and head — to see the state explode or collapse past the training
length.

    ttt-eval state --model runs/ttt --data corpus/ --tokens 16384 --output out/state.json

The stream — the first `--tokens` tokens of the selected documents (`common.py`'s rule: `--data`, the validation
side of the training split when the folder records one, each document starting with the BOS token) joined one
after the other, or with `--single-document` the first document that long alone — is fed through the recurrent
`TTTCache` in chunks of whole mini-batches (`--chunk-size`). For every mini-batch `i` (tokens `i·M … i·M+M−1`)
and every layer and head this records

* the state the mini-batch starts from, `W_prev` (the weights after the `i·M` tokens before it): `‖W1‖_F` (and
  `‖W2‖_F` for TTT-MLP) and the relative change from the learned initial weights `‖W1 − W1₀‖_F / ‖W1₀‖_F`;
* the self-supervised reconstruction loss of the mini-batch's tokens (Eq. 4 of Sun et al. 2024 with the inner
  LayerNorm of Sec. 2.7, as `modeling_ttt.ops.naive` defines it:
  `ℓ_t(W) = ½‖LN(f(x_k,t; W)) − (x_v,t − x_k,t)‖²`) at three weights: `loss_init` at the learned `W₀`,
  `loss_prev` at `W_prev` (before this mini-batch's step) and `loss_after` at the weights after its step,
  `W_prev − s_{M−1} Σ_j η_j ∇ℓ_j(W_prev)` (Sec. 2.5: every gradient of a mini-batch is taken at `W_prev`).
  `loss_prev < loss_init` says the state learned something useful from the past; `loss_after < loss_prev` that
  the step descends.

These are the diagnostics the official JAX trainer plots per layer (the same three weights); it evaluates them on
the last token of each mini-batch only, as a mean over channels of the squared error, and also logs the spread of
the reconstruction target around its mean (not recorded here). Here the loss is the spec's and, by default, the
mean over the mini-batch's tokens (`--loss-tokens last`: its last token, as the trainer does).

How: the probe (`InnerLoopProbe`) wraps each layer's inner-loop op for the duration of the run (a forward pre-hook
swaps the op the model passes to the layer), so it sees exactly what the op gets — `x_k`, `x_v` after the
projections, convolutions and RoPE, the per-token learning rates `η`, the state — and the forward itself is
untouched (no cost when not probing). From those it recomputes the mini-batch steps with the spec's functions.

Outputs: `--output FILE.json` (default `state.json`: the settings, and per layer and head every recorded value),
`--csv` (per layer and recorded position, heads averaged) and `--plot`, both beside it by default, written together
or not at all. Recorded positions: about `--points` log-spaced mini-batches, or every `--every`-th.
"""

from __future__ import annotations

import argparse
import math

import torch

from . import common
from .common import EvaluationError

#: How many times the training length `--tokens` defaults to.
DEFAULT_LENGTH_FACTOR = 8
DTYPES = {name: common.DTYPES[name] for name in ("float32", "bfloat16", "float16", "float64")}


# -- the inner-loop diagnostics ----------------------------------------------------------------------------------


def inner_loss(weights, xk: torch.Tensor, xv: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor):
    """Per-token reconstruction loss `ℓ_t(W) = ½‖LN(f(x_k,t; W)) − (x_v,t − x_k,t)‖²` (`ops/naive.py`),
    `[..., L]`.

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

    # the inner loop's precision (ops/state.py): float32 for 16-bit models; xk stands in for the unused xq
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
            if num_tokens is not None:
                raise ValueError("the probe takes unpadded streams (num_tokens=None)")
            result = op(xq, xk, xv, inner_lr, params, state, num_tokens)
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
    from modeling_ttt import TTTCache

    cache = TTTCache(model.config)
    starts = range(0, input_ids.shape[1], chunk_size)
    with InnerLoopProbe(model, loss_tokens) as probe:
        for start in common.progress(starts, enabled=progress, desc="state"):
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
    """(JSON layers, CSV rows): per layer and head, and per (layer, position) with heads averaged (the stream is
    row 0 of the batch)."""
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


def plot(rows: list[dict], mini_batch_size: int, title: str):
    """The figure: the state's norms and change, and the three inner losses, against the position (log x)."""
    import matplotlib.ticker
    import numpy as np

    plt = common.pyplot()

    layer_ids = sorted({r["layer"] for r in rows})
    norm_names = [n for n in ("norm_W1", "norm_W2") if n in rows[0]]
    figure, axes = plt.subplots(1, 2 + len(norm_names), figsize=(5 * (2 + len(norm_names)), 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(layer_ids)))
    by_layer = {layer: [r for r in rows if r["layer"] == layer] for layer in layer_ids}
    # x: tokens seen at the end of the mini-batch, so that the first mini-batch sits at M on the log axis
    x = [r["position"] + mini_batch_size for r in by_layer[layer_ids[0]]]

    def column(layer, key):
        return np.array([np.nan if r[key] is None else r[key] for r in by_layer[layer]], dtype=float)

    titles = {"norm_W1": "‖W1‖_F of the state (mean over heads)",
              "norm_W2": "‖W2‖_F of the state (mean over heads)",
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
        axis.set_xscale("log", base=2)
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # unlabelled minor ticks: no clutter
        axis.set_xlabel("tokens seen at the end of the mini-batch")
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


# -- inputs ------------------------------------------------------------------------------------------------------


def load_model(args, device: torch.device, dtype: torch.dtype):
    """The TTT model of `--model` (a folder) or `--preset` (random weights), in eval mode on `device`."""
    import modeling_ttt  # noqa: F401  (registers model_type "ttt" with the auto classes)
    from modeling_ttt import PRESET_NAMES, TTTConfig, TTTForCausalLM

    if bool(args.model) == bool(args.preset):
        raise EvaluationError("give exactly one of --model PATH or --preset NAME.")
    if args.preset:
        if args.preset not in PRESET_NAMES:
            raise EvaluationError(f"--preset {args.preset!r} is not one of {', '.join(PRESET_NAMES)}.")
        torch.manual_seed(args.seed if args.seed is not None else 0)
        model = TTTForCausalLM(TTTConfig.from_preset(args.preset))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = common.check_model_folder(args.model)
        try:
            model_type = AutoConfig.from_pretrained(folder).model_type
        except Exception as error:  # an unreadable config.json: the folder's problem, in one line
            raise EvaluationError(f"cannot read the config of {args.model!r}: {type(error).__name__}") from error
        if model_type != "ttt":
            raise EvaluationError(f"{args.model!r} is a {model_type!r} model; the state statistics need TTT layers.")
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except Exception as error:
            message = " ".join(str(error).split())[:300]
            raise EvaluationError(f"cannot load {args.model!r}: {type(error).__name__}: {message}") from error
    if args.ttt_impl:
        from modeling_ttt.ops import resolve_ttt_impl

        try:
            resolve_ttt_impl(args.ttt_impl, device)
        except (RuntimeError, ValueError) as error:
            raise EvaluationError(f"--ttt-impl {args.ttt_impl} cannot run on {device}: {error}") from None
        model.config.ttt_impl = args.ttt_impl
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(args):
    from transformers import AutoTokenizer

    source = args.tokenizer or args.model
    if not source:
        raise EvaluationError("no tokenizer for --preset: give --tokenizer PATH, or --random-tokens.")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError... for a folder without one
        raise EvaluationError(f"{source!r} has no usable tokenizer (give --tokenizer PATH, or --random-tokens): "
                              f"{type(error).__name__}") from error


def document_stream(selection: "common.DocumentSelection", tokenizer, num_tokens: int, single_document: bool
                    ) -> tuple[list[int], list[str]]:
    """The first `num_tokens` ids of the documents `selection` picks, joined (each with its BOS token when the
    selection adds one), or of the first document that long alone; and the names of the documents used. Reads only
    as far as it needs to."""
    from ..data import DEFAULT_CORPUS, DataError, is_validation_document, iter_documents

    ids, names, longest = [], [], 0
    for document in iter_documents(selection.sources, selection.text_field, selection.split, selection.streaming):
        if selection.validation_fraction > 0 and not is_validation_document(
                document.name, selection.validation_fraction, selection.seed):
            continue
        document_ids = common.encode(tokenizer, document.text, selection.add_bos)
        if len(document_ids) < selection.min_tokens:
            continue
        if selection.max_tokens_per_document is not None:
            document_ids = document_ids[: selection.max_tokens_per_document]
        longest = max(longest, len(document_ids))
        if single_document:
            if len(document_ids) >= num_tokens:
                return document_ids[:num_tokens], [document.name]
        else:
            ids.extend(document_ids)
            names.append(document.name)
            if len(ids) >= num_tokens:
                return ids[:num_tokens], names
        if selection.max_documents is not None and len(names) >= selection.max_documents:
            break
    where = ", ".join(selection.sources) if selection.sources else DEFAULT_CORPUS
    if single_document:
        raise DataError(f"no document of {where} has {num_tokens} tokens (the longest has {longest}); lower "
                        "--tokens or drop --single-document.")
    raise DataError(f"the documents of {where} hold {len(ids)} tokens, fewer than --tokens {num_tokens}.")


# -- command -----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, metavar="PATH", help="a saved TTT model folder")
    group.add_argument("--preset", default=None, metavar="NAME",
                       help="a random-initialised TTT preset instead of --model (e.g. 125m-linear)")
    group.add_argument("--ttt-impl", default=None, help="inner-loop backend (default: the model's config)")
    group.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="default float32")
    group.add_argument("--device", default=None,
                       help="torch device (default: this process's accelerate device: a GPU if there is one)")
    common.add_data_arguments(parser)
    stream = parser.add_argument_group("stream")
    stream.add_argument("--tokenizer", default=None, metavar="PATH", help="default: the --model folder's")
    stream.add_argument("--single-document", action="store_true",
                        help="stream one document (the first with --tokens tokens) instead of the documents joined")
    stream.add_argument("--random-tokens", action="store_true",
                        help="stream random token ids (seeded by --seed) instead of documents")
    stream.add_argument("--tokens", type=int, default=None, metavar="N",
                        help=f"stream length (default {DEFAULT_LENGTH_FACTOR}x the training length: the folder's "
                             "training_args.json, else max_position_embeddings); rounded down to whole mini-batches")
    stream.add_argument("--chunk-size", type=int, default=2048, metavar="N",
                        help="tokens per forward, rounded down to whole mini-batches (default 2048)")
    stream.add_argument("--points", type=int, default=64, help="log-spaced mini-batches to record (default 64)")
    stream.add_argument("--every", type=int, default=None, metavar="K",
                        help="record every K-th mini-batch instead of log-spaced ones")
    stream.add_argument("--loss-tokens", default="all", choices=("all", "last"),
                        help="inner loss: mean over the mini-batch's tokens (default), or its last token only (as "
                             "the official trainer logs it)")
    parser.add_argument("--output", default="state.json", metavar="FILE.json",
                        help="settings and per-head values (default state.json)")
    parser.add_argument("--csv", default=None, metavar="FILE.csv",
                        help="per (layer, position) rows (default: beside --output)")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="the plot (default: beside --output)")
    common.add_common_arguments(parser)


def _prepare(args):
    """Everything checked and loaded before the stream starts: `(device, model, input_ids [1, N], chunk, info)`."""
    for name in ("points", "chunk_size"):
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be at least 1.")
    if args.every is not None and args.every < 1:
        raise EvaluationError("--every must be at least 1.")
    if args.tokens is not None and args.tokens < 1:
        raise EvaluationError("--tokens must be at least 1.")
    state = common.process_state()
    if state.num_processes > 1:  # one stream: nothing to share out
        raise EvaluationError("ttt-eval state runs in one process; run it without accelerate launch.")
    device = common.resolve_device(args.device, state)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {args.device}: CUDA is not available here.")
    model = load_model(args, device, DTYPES[args.dtype])
    mini_batch_size = model.config.mini_batch_size
    training_args = common.read_training_args(args.model) if args.model else {}
    train_length = common.training_length(model, training_args)
    recorded = any(isinstance(training_args.get(key), int) for key in common.TRAINING_LENGTH_KEYS)
    requested = args.tokens or DEFAULT_LENGTH_FACTOR * train_length
    num_tokens = requested // mini_batch_size * mini_batch_size
    if num_tokens == 0:
        raise EvaluationError(f"--tokens {requested} is less than one mini-batch ({mini_batch_size} tokens).")
    chunk = max(mini_batch_size, args.chunk_size // mini_batch_size * mini_batch_size)
    info = dict(training_length=train_length,
                training_length_source=common.TRAINING_ARGS_FILE if recorded else "max_position_embeddings")
    if args.random_tokens:
        generator = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
        input_ids = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=generator)
        info.update(data="random token ids", documents=[])
    else:
        tokenizer = load_tokenizer(args)
        selection = common.DocumentSelection.from_args(args, args.model)
        ids, names = document_stream(selection, tokenizer, num_tokens, args.single_document)
        if max(ids) >= model.config.vocab_size:
            raise EvaluationError(f"the tokenizer gives ids up to {max(ids)}, beyond the model's vocabulary "
                                  f"({model.config.vocab_size}).")
        input_ids = torch.tensor([ids])
        info.update(data=selection.describe(), documents=names)
    return device, model, input_ids.to(device), chunk, info


def run(args: argparse.Namespace) -> int:
    device, model, input_ids, chunk, info = _prepare(args)
    config = model.config
    metrics, _, _ = stream_state_statistics(model, input_ids, chunk, args.loss_tokens, not args.no_progress)
    num_mini_batches = input_ids.shape[1] // config.mini_batch_size
    indices = record_indices(num_mini_batches, args.points, args.every)
    layers, rows = build_outputs(metrics, indices, config.mini_batch_size)
    model_name = args.model or f"preset {args.preset} (random weights)"
    results = dict(
        command="ttt-eval state", model=model_name, ttt_layer_type=config.ttt_layer_type,
        num_hidden_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mini_batch_size=config.mini_batch_size, ttt_base_lr=config.ttt_base_lr, tokens=input_ids.shape[1],
        chunk_size=chunk, device=str(device), dtype=args.dtype, loss_tokens=args.loss_tokens,
        loss="0.5 * ||LN(f(x_k; W)) - (x_v - x_k)||^2 per token (ops/naive.py), "
             + ("mean over the mini-batch" if args.loss_tokens == "all" else "the mini-batch's last token"),
        position="index of the mini-batch's first token; the norms are of the state the mini-batch starts from",
        **info, layers=layers)
    title = (f"ttt-eval state: {model_name}, TTT-{config.ttt_layer_type}, {input_ids.shape[1]} tokens (training "
             f"length {info['training_length']}), mini-batch {config.mini_batch_size}")
    csv_path = args.csv or common.default_path(args.output, ".csv")
    plot_path = args.plot or common.default_path(args.output, ".png")
    common.write_results([common.json_output(args.output, results), common.csv_output(csv_path, rows, list(rows[0])),
                          common.figure_output(plot_path, plot(rows, config.mini_batch_size, title))])
    last = [r for r in rows if r["mini_batch"] == indices[-1]]

    def mean(key):
        values = [r[key] for r in last if r[key] is not None]
        return sum(values) / len(values) if values else float("nan")

    print(f"{input_ids.shape[1]} tokens; at position {indices[-1] * config.mini_batch_size}, mean over layers: "
          f"‖W1‖ {mean('norm_W1'):.4g} (change {mean('change_W1'):.4g}); inner loss at W0 {mean('loss_init'):.4g}, "
          f"before the step {mean('loss_prev'):.4g}, after {mean('loss_after'):.4g}")
    print(f"wrote {args.output}, {csv_path}, {plot_path}")
    return 0


__all__ = ["InnerLoopProbe", "add_arguments", "build_outputs", "document_stream", "inner_loss", "load_model",
           "mini_batch_diagnostics", "plot", "record_indices", "run", "stream_state_statistics"]
