"""`ttt-train`: pre-train a TTT language model (or a Llama / Mamba2 baseline of the same size) from scratch with
Accelerate, on one process or several (DDP).

    ttt-train --config 5m-linear --max-steps 300 --output-dir out/ttt-5m --sample-prompt "def fibonacci(n):"
    accelerate launch -m modeling_ttt.train --config 125m-linear --data corpus/ --output-dir out/ttt-125m

The recipe follows the paper's (Sun et al., 2024, arXiv 2407.04620, Sec. 3 and Appendix C) and the official JAX
trainer (test-time-training/ttt-lm-jax, `ttt/infra/optimizers.py`, `ttt/train.py`): AdamW with betas (0.9, 0.95) and
weight decay 0.1, gradient clipping at 1.0, a linear warm-up then a cosine decay to `--min-lr`, and for TTT-MLP the
inner base learning rate warmed up from 0.01 to its configured value over the outer warm-up.

Data: documents (files, folders, JSONL, a `datasets` dataset; the CPython standard library by default) are split by
document into training and validation, tokenized with an end-of-document token after each, and packed into rows
of `--seq-len` tokens whose position ids restart at every document start and at every row start
(`modeling_ttt.data.packed_row`): the TTT state starts afresh there, and no target crosses a document start.

Everything the run writes lives in `--output-dir`: `metrics.jsonl` (one line per step), `checkpoint-<step>/`
(the model's `save_pretrained` folder plus the Accelerate state, written atomically) and, at the end, the final
model as a Hub-ready folder (remote code, tokenizer, generation config, model card).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "ttt-train"
ARCHS = ("ttt", "llama", "mamba2")
CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into a checkpoint (before its rename): the step it holds and the run's settings.
TRAINER_STATE = "trainer_state.json"
ACCELERATE_STATE = "accelerate_state"
METRICS = "metrics.jsonl"
#: TTT-MLP's inner base learning rate starts here and reaches `config.ttt_base_lr` at the end of the outer
#: warm-up (the official 125m-1.3b TTT-MLP scripts: ttt_base_lr_init=0.01, ttt_base_lr_warmup=lr_warmup_steps).
TTT_BASE_LR_INIT = 0.01
#: config.json keys that say nothing about the architecture (left out when a resumed run's config is compared).
CONFIG_KEYS_NOT_COMPARED = {"transformers_version", "architectures", "auto_map", "_name_or_path", "dtype",
                            "torch_dtype"}
#: Run settings that must not change across a resume: they decide the data order and the loss of every step.
RESUME_KEYS = ("arch", "seq_len", "global_batch_size", "grad_accum", "packing", "seed", "data", "text_field",
               "validation_fraction")


class UsageError(Exception):
    """A wrong command line or output folder: reported as one line, exit code 2, before any compute."""


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Pre-train a TTT language model with Accelerate.")
    model = parser.add_argument_group("model")
    model.add_argument("--config", default="5m-linear",
                       help="a preset name (configuration/ttt-<name>.json, e.g. 5m-linear, 125m-mlp) or a JSON file "
                            "(default: %(default)s)")
    model.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable); VALUE is parsed as JSON, else kept as a string, "
                            "e.g. --set num_hidden_layers=2 --set ttt_layer_type=mlp")
    model.add_argument("--arch", choices=ARCHS, default="ttt",
                       help="ttt, or a transformers Llama / Mamba2 sized to the TTT config's parameter count")
    model.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each block in the backward pass (and use --set scan_checkpoint_group_size=4 "
                            "for the inner scan)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH",
                      help="text/JSONL files or folders, a saved `datasets` folder or a `datasets` name "
                           "(default: the CPython standard library's .py sources)")
    data.add_argument("--text-field", default="text", help="JSONL/dataset field holding the text")
    data.add_argument("--streaming", action="store_true", help="read a `datasets` dataset as a stream")
    data.add_argument("--tokenizer", metavar="DIR",
                      help="a saved tokenizer folder (default: train a byte-level BPE on the training split)")
    data.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE tokenizer")
    data.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    data.add_argument("--no-packing", dest="packing", action="store_false",
                      help="plain rows cut from the token stream (position ids 0..seq_len-1, no state resets)")
    data.add_argument("--validation-fraction", type=float, default=0.02, help="share of documents held out")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--batch-size", type=int, default=8, help="rows per process and micro-step")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    optim.add_argument("--max-steps", type=int, help="optimizer steps (default 1000 unless --max-tokens)")
    optim.add_argument("--max-tokens", type=int, help="train on this many tokens (rounded up to whole steps)")
    optim.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    optim.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    optim.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 10%% of the steps)")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="out/ttt-train")
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    run.add_argument("--eval-every", type=int, default=100, help="validate every N steps (and at 0 and the end)")
    run.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per evaluation (a cap)")
    run.add_argument("--resume", action="store_true", help="continue from the output dir's last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir")
    run.add_argument("--report-to", nargs="+", default=["none"],
                     help="Accelerate trackers (tensorboard, wandb, ...; default none); metrics.jsonl is always "
                          "written")
    run.add_argument("--sample-prompt", metavar="TEXT", help="at the end, stream a continuation of TEXT")
    run.add_argument("--sample-tokens", type=int, default=64)
    run.add_argument("--sample-temperature", type=float, default=0.0, help="0: greedy")
    # Slows each step down so that tests can kill a run between two checkpoints.
    run.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


def check_args(args) -> None:
    positive = ["seq_len", "batch_size", "grad_accum", "vocab_size", "eval_tokens", "sample_tokens"]
    for name in positive + ["max_steps", "max_tokens"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    for name in ("save_every", "eval_every", "warmup_steps"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}.")
    for name in ("lr", "min_lr", "weight_decay", "max_grad_norm", "sample_temperature"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number {'>' if name == 'lr' else '>='} 0, "
                             f"got {value}.")
    if args.max_steps is not None and args.max_tokens is not None:
        raise UsageError("give --max-steps or --max-tokens, not both.")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --output-dir, --overwrite replaces it: give one.")
    if args.streaming and not args.data:
        raise UsageError("--streaming reads a `datasets` dataset: name it with --data.")


# ----------------------------------------------------------------------------------------------------------------
# Model configuration
# ----------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set takes KEY=VALUE, got {text!r}.")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word: a string field such as ttt_layer_type=mlp
    return key.strip(), value


def load_ttt_config(name_or_path: str, overrides: list[str]):
    """The TTT config of `--config` (a preset name or a JSON file) with the `--set` overrides applied, each checked
    by `TTTConfig` itself (field rules and the rules between fields)."""
    from .configuration_ttt import FIELD_RULES, PRESET_NAMES, TTTConfig

    preset = name_or_path[len("ttt-"):] if name_or_path.startswith("ttt-") else name_or_path
    preset = preset[:-len(".json")] if preset.endswith(".json") and not os.path.isfile(name_or_path) else preset
    try:
        if preset in PRESET_NAMES:
            config = TTTConfig.from_preset(preset)
        elif os.path.isfile(name_or_path):
            config = TTTConfig.from_json_file(name_or_path)
        else:
            close = difflib.get_close_matches(preset, PRESET_NAMES, n=3, cutoff=0.4)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(f"--config {name_or_path!r} is neither a preset{hint} nor a JSON file; presets: "
                             f"{', '.join(PRESET_NAMES)}.")
    except (ValueError, OSError) as error:
        if isinstance(error, UsageError):
            raise
        raise UsageError(f"--config {name_or_path}: {one_line(error)}") from error
    known = set(FIELD_RULES) | set(config.to_dict())
    for text in overrides:
        key, value = parse_override(text)
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "."
            raise UsageError(f"--set {key}: TTTConfig has no field {key!r}{hint}")
        try:
            setattr(config, key, value)
        except ValueError as error:
            raise UsageError(f"--set {text}: {one_line(error)}") from error
    try:
        config.check_ttt_fields()
    except ValueError as error:
        raise UsageError(f"--set: {one_line(error)}") from error
    return config


def set_token_ids(config, tokenizer) -> None:
    """The model's vocabulary and special tokens follow the tokenizer."""
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id


def count_parameters(config) -> int:
    """Parameters of the causal LM `config` describes (tied weights once), built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.num_parameters()


def baseline_config(arch: str, ttt_config, seq_len: int):
    """A transformers Llama or Mamba2 config with (about) the TTT config's parameter count: the same width, vocabulary,
    embedding tying and special tokens; Llama matches the count with its MLP width (same depth and heads), Mamba2
    (which has no MLP) with its depth and then its state size. Each count is linear in the size being solved for, so
    two meta-device counts give it. Returns (config, TTT parameters, baseline parameters, what was sized)."""
    from transformers import LlamaConfig, Mamba2Config

    target = count_parameters(ttt_config)
    common = dict(vocab_size=ttt_config.vocab_size, hidden_size=ttt_config.hidden_size,
                  tie_word_embeddings=ttt_config.tie_word_embeddings, bos_token_id=ttt_config.bos_token_id,
                  eos_token_id=ttt_config.eos_token_id, pad_token_id=ttt_config.pad_token_id,
                  initializer_range=ttt_config.initializer_range)
    if arch == "llama":
        def make(intermediate):
            return LlamaConfig(intermediate_size=intermediate, num_hidden_layers=ttt_config.num_hidden_layers,
                               num_attention_heads=ttt_config.num_attention_heads,
                               num_key_value_heads=ttt_config.num_attention_heads,
                               max_position_embeddings=max(seq_len, ttt_config.max_position_embeddings),
                               rms_norm_eps=ttt_config.rms_norm_eps, rope_theta=ttt_config.rope_theta, **common)
        free, step, minimum = "intermediate_size", 8, 8
    elif arch == "mamba2":
        head_dim = ttt_config.head_dim
        def make(layers, state_size=64):
            return Mamba2Config(num_hidden_layers=layers, num_heads=2 * ttt_config.hidden_size // head_dim,
                                head_dim=head_dim, expand=2, n_groups=1, state_size=state_size,
                                chunk_size=min(256, seq_len), layer_norm_epsilon=ttt_config.rms_norm_eps, **common)
        # the depth first (at state size 64, rounded down), then the state size closes the gap a whole layer leaves
        low, high = count_parameters(make(1)), count_parameters(make(17))
        layers = max(1, 1 + math.floor((target - low) / ((high - low) / 16)))
        low, high = count_parameters(make(layers, 16)), count_parameters(make(layers, 144))
        state_size = min(256, max(16, 16 + 8 * round((target - low) / ((high - low) / 16))))
        config = make(layers, state_size)
        return config, target, count_parameters(config), f"num_hidden_layers={layers}, state_size={state_size}"
    else:
        raise ValueError(f"unknown baseline architecture {arch!r}")
    low, high = count_parameters(make(minimum)), count_parameters(make(minimum + 16 * step))
    per_unit = (high - low) / 16
    size = max(minimum, minimum + step * round((target - low) / per_unit))
    config = make(size)
    return config, target, count_parameters(config), f"{free}={size}"


# ----------------------------------------------------------------------------------------------------------------
# Schedules and optimizer
# ----------------------------------------------------------------------------------------------------------------


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate of update `step` (0-based) over the peak: linear warm-up, then cosine to `min_lr` at
    `max_steps` (optax.warmup_cosine_decay_schedule in the official trainer, whose decay spans all steps). The
    warm-up's first update uses 1/warmup_steps of the peak rather than 0, so that no update is wasted."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr


def ttt_base_lr_at(step: int, warmup_steps: int, target: float) -> float:
    """TTT-MLP's inner base learning rate at update `step` (0-based): the official trainer's `get_ttt_lr_mult`,
    `init + min(1, (step - 1) / warmup) * (target - init)` with its 1-based step."""
    if warmup_steps <= 0:
        return target
    return TTT_BASE_LR_INIT + min(1.0, step / warmup_steps) * (target - TTT_BASE_LR_INIT)


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW, betas (0.9, 0.95), decay on every parameter: the official JAX trainer passes the model's
    `get_weight_decay_exclusions()`, an empty tuple for the TTT models, as optax's weight-decay mask, so biases,
    norms and embeddings are decayed too. Fused where the build supports it (CPU and CUDA in recent torch)."""
    import torch

    params = [param for param in model.parameters() if param.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, foreach=True)


# ----------------------------------------------------------------------------------------------------------------
# Output folder, checkpoints, metrics
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_steps(output_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (a checkpoint gets its final name only once complete)."""
    steps = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
            if match and path.is_dir() and (path / TRAINER_STATE).is_file():
                steps.append(int(match.group(1)))
    return sorted(steps)


def holds_run(output_dir: Path) -> bool:
    if not output_dir.is_dir():
        return False
    return (output_dir / METRICS).exists() or bool(checkpoint_steps(output_dir)) or any(
        path.name.startswith((CHECKPOINT_PREFIX, ".tmp-" + CHECKPOINT_PREFIX)) for path in output_dir.iterdir())


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"Cannot read {path}: {one_line(error)}") from error


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (the checkpoint resumed from): a resumed run logs each later step
    again, so that the file holds every step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("step") is None or record["step"] <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class MetricsLog:
    """`metrics.jsonl`, one JSON object per line, flushed at once (a killed run keeps every line it logged)."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Setup: everything checked before any compute
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    args: Any
    output_dir: Path
    config: Any  # the model config to build (TTT or baseline)
    ttt_config: Any
    tokenizer: Any
    train_stream: Any
    val_stream: Any
    train_rows: int
    val_rows: int
    max_steps: int
    warmup_steps: int
    resume_step: int
    resume_dir: Path | None
    run_settings: dict
    notes: list


def prepare(args, accelerator) -> Setup:
    from . import data as data_lib

    check_args(args)
    output_dir = Path(args.output_dir)
    notes: list[str] = []

    # The output folder: refuse to mix two runs.
    resume_step, resume_dir = 0, None
    if args.resume:
        steps = checkpoint_steps(output_dir)
        if not steps:
            raise UsageError(f"--resume: no complete checkpoint in {output_dir} ({CHECKPOINT_PREFIX}<step>/ with "
                             f"{TRAINER_STATE}).")
        resume_step = steps[-1]
        resume_dir = output_dir / f"{CHECKPOINT_PREFIX}{resume_step}"
    elif holds_run(output_dir) and not args.overwrite:
        raise UsageError(f"{output_dir} already holds a run (metrics or checkpoints): pass --resume to continue it "
                         "or --overwrite to replace it.")

    ttt_config = load_ttt_config(args.config, args.overrides)
    global_batch = args.batch_size * accelerator.num_processes
    run_settings = dict(arch=args.arch, seq_len=args.seq_len, global_batch_size=global_batch,
                        grad_accum=args.grad_accum, packing=args.packing, seed=args.seed,
                        data=list(args.data) if args.data else None, text_field=args.text_field,
                        validation_fraction=args.validation_fraction)
    if resume_dir is not None:
        saved = read_json(resume_dir / TRAINER_STATE).get("run", {})
        changed = [f"{key} (checkpoint {saved.get(key)!r}, now {run_settings[key]!r})" for key in RESUME_KEYS
                   if saved.get(key) != run_settings[key]]
        if changed:
            raise UsageError(f"--resume from {resume_dir} with other settings: {'; '.join(changed)}.")

    # Data: documents, split by document, tokenizer, tokens, rows.
    try:
        documents = data_lib.load_documents(args.data, args.text_field, streaming=args.streaming)
        train_docs, val_docs = data_lib.split_documents(documents, args.validation_fraction, seed=args.seed)
    except data_lib.DataError as error:
        raise UsageError(one_line(error)) from error
    if not train_docs:
        raise UsageError(f"No training documents: all {len(documents)} went to validation "
                         f"(--validation-fraction {args.validation_fraction}).")
    if not val_docs:
        raise UsageError(f"No validation documents among {len(documents)} (--validation-fraction "
                         f"{args.validation_fraction}): give more documents or a larger fraction.")

    tokenizer = load_tokenizer(args, resume_dir, train_docs, accelerator, notes)
    train_stream = data_lib.tokenize_documents(train_docs, tokenizer)
    val_stream = data_lib.tokenize_documents(val_docs, tokenizer)
    train_rows = data_lib.num_rows(train_stream, args.seq_len)
    val_rows = data_lib.num_rows(val_stream, args.seq_len)
    if train_rows < global_batch:
        raise UsageError(f"--seq-len {args.seq_len}: the training split has {len(train_stream)} tokens, "
                         f"{train_rows} rows, fewer than one batch of {global_batch} rows "
                         f"({args.batch_size} x {accelerator.num_processes} processes).")
    if val_rows < 1:
        raise UsageError(f"--seq-len {args.seq_len}: the validation split has {len(val_stream)} tokens, fewer than "
                         "one row: lower --seq-len or raise --validation-fraction.")

    # The model: the vocabulary follows the tokenizer.
    configured_vocab = ttt_config.vocab_size
    try:
        set_token_ids(ttt_config, tokenizer)
    except ValueError as error:
        raise UsageError(f"tokenizer {args.tokenizer}: {one_line(error)}") from error
    notes.append(f"vocab_size = {ttt_config.vocab_size} (from the tokenizer; the config said {configured_vocab})")
    if ttt_config.max_position_embeddings < args.seq_len:
        ttt_config.max_position_embeddings = args.seq_len  # informational for TTT; kept honest in the card
    config = ttt_config
    if args.arch != "ttt":
        config, ttt_params, params, sized = baseline_config(args.arch, ttt_config, args.seq_len)
        notes.append(f"{args.arch}: {params:,} parameters ({sized}) for the TTT config's {ttt_params:,} "
                     f"({100 * (params - ttt_params) / ttt_params:+.1f}%)")
        if args.arch == "mamba2" and args.packing:
            notes.append("mamba2 has no state reset: it reads the packed rows straight through (the labels still "
                         "skip document starts)")
        if args.arch == "llama" and args.packing:
            notes.append("llama: packed rows attend within their document (transformers builds a block-diagonal "
                         "mask from the restarting position ids)")
    if resume_dir is not None:
        # both through the config class, so that fields left at their defaults in config.json compare equal
        try:
            saved = type(config).from_json_file(str(resume_dir / "config.json")).to_dict()
        except (OSError, ValueError) as error:
            raise UsageError(f"--resume: cannot read {resume_dir / 'config.json'}: {one_line(error)}") from error
        now = config.to_dict()
        keys = sorted((set(saved) | set(now)) - CONFIG_KEYS_NOT_COMPARED)
        differing = [key for key in keys if saved.get(key) != now.get(key)]
        if differing:
            shown = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, now {now.get(key)!r}" for key in differing[:5])
            raise UsageError(f"--resume from {resume_dir}: the checkpoint holds another model config ({shown}).")

    tokens_per_step = global_batch * args.grad_accum * args.seq_len
    if args.max_tokens is not None:
        max_steps = math.ceil(args.max_tokens / tokens_per_step)
    else:
        max_steps = args.max_steps if args.max_steps is not None else 1000
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max_steps // 10
    return Setup(args, output_dir, config, ttt_config, tokenizer, train_stream, val_stream, train_rows, val_rows,
                 max_steps, warmup_steps, resume_step, resume_dir, run_settings, notes)


def load_tokenizer(args, resume_dir, train_docs, accelerator, notes):
    """The checkpoint's tokenizer when resuming, else `--tokenizer`, else a byte-level BPE trained on the training
    split by the main process and sent to the others (every process must use the very same vocabulary)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .data import train_bpe_tokenizer

    source = resume_dir or args.tokenizer
    if source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as error:
            raise UsageError(f"Cannot load the tokenizer {source}: {one_line(error)}") from error
        if tokenizer.eos_token_id is None:
            raise UsageError(f"The tokenizer {source} has no eos token (needed between documents).")
        notes.append(f"tokenizer: {source} ({len(tokenizer)} tokens)")
        return tokenizer
    serialized = [None]
    if accelerator.is_main_process:
        tokenizer = train_bpe_tokenizer((document.text for document in train_docs), vocab_size=args.vocab_size,
                                        show_progress=False)
        serialized = [tokenizer.backend_tokenizer.to_str()]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(serialized, from_process=0)
    if not accelerator.is_main_process:
        from tokenizers import Tokenizer

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(serialized[0]),
                                            bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                            model_max_length=1_000_000)
    notes.append(f"tokenizer: byte-level BPE trained on the training split ({len(tokenizer)} tokens)")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class BatchOrder:
    """Which rows each process reads at each micro-step: epoch `e` visits the training rows in the order of
    `torch.randperm(rows, generator seeded with seed + e)`, cut into global batches of `global_batch` rows (an
    incomplete last batch is dropped); process `rank` takes its slice of `batch_size` rows. The order depends only on
    the micro-step index and the global batch size, so one process with batch 2b reads exactly the rows two
    processes with batch b read, and a resumed run reads exactly what the interrupted one would have."""

    def __init__(self, rows: int, global_batch: int, batch_size: int, rank: int, seed: int):
        self.rows, self.global_batch, self.batch_size, self.rank, self.seed = rows, global_batch, batch_size, rank, seed
        self.per_epoch = rows // global_batch
        self._epoch, self._order = None, None

    def indices(self, micro_step: int):
        import torch

        epoch, index = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.rows, generator=generator)
        begin = index * self.global_batch + self.rank * self.batch_size
        return self._order[begin:begin + self.batch_size].tolist()


def model_inputs(arch: str, batch: dict) -> dict:
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if arch != "mamba2":  # Mamba2 takes no position ids (and has no state reset)
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def nll_sum(logits, labels):
    """Summed next-token NLL and the number of targets (labels shifted by one; -100 ignored)."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


class InnerLrSchedule:
    """TTT-MLP's inner base learning rate warm-up (the layers read `config.ttt_base_lr` at every forward). The
    config always goes back to the target value before anything is saved or evaluated: the saved model is the one
    trained to run at its configured rate."""

    def __init__(self, config, warmup_steps: int):
        self.config = config
        self.target = getattr(config, "ttt_base_lr", None)
        self.active = getattr(config, "model_type", None) == "ttt" and config.ttt_layer_type == "mlp" and (
            warmup_steps > 0) and self.target is not None and self.target > TTT_BASE_LR_INIT
        self.warmup_steps = warmup_steps

    def at_step(self, step: int) -> None:
        if self.active:
            self.config.ttt_base_lr = ttt_base_lr_at(step, self.warmup_steps, self.target)

    def restore(self) -> None:
        if self.active:
            self.config.ttt_base_lr = self.target


def evaluate(model, setup: Setup, accelerator):
    """Token-weighted mean NLL over the first `ceil(eval_tokens / seq_len)` validation rows (each process scores
    every num_processes-th row; the sums are added across processes)."""
    import torch

    from .data import row_batch

    args = setup.args
    rows = min(setup.val_rows, math.ceil(args.eval_tokens / args.seq_len))
    mine = list(range(accelerator.process_index, rows, accelerator.num_processes))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for begin in range(0, len(mine), args.batch_size):
            batch = row_batch(setup.val_stream, mine[begin:begin + args.batch_size], args.seq_len, args.packing)
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accelerator.autocast():
                logits = model(**model_inputs(args.arch, batch)).logits
            loss, count = nll_sum(logits, batch["labels"])
            total += torch.stack([loss.double(), count.double()])
    model.train(was_training)
    total = accelerator.reduce(total, reduction="sum")
    val_loss = float(total[0] / total[1])
    return val_loss, math.exp(min(val_loss, 700.0))


def save_model_folder(model, setup: Setup, directory: Path, with_code: bool, state_dict=None) -> None:
    """save_pretrained (weights, config, generation config; the TTT modeling code when `with_code`) + tokenizer.
    `state_dict`: the full weights gathered by `accelerator.get_state_dict` (under FSDP each process holds a shard)."""
    if getattr(model.config, "model_type", None) == "ttt":
        model.save_pretrained(directory, with_code=with_code, state_dict=state_dict)
    else:
        model.save_pretrained(directory, state_dict=state_dict)
    setup.tokenizer.save_pretrained(directory)


def save_checkpoint(accelerator, model, setup: Setup, step: int, tokens: int, inner: InnerLrSchedule) -> Path:
    """`checkpoint-<step>/`: the model folder and the Accelerate state (optimizer, scheduler, RNG; the data position
    is the step itself, see `BatchOrder`), written under a temporary name and renamed when complete, so that a killed
    run never leaves a folder that looks like a checkpoint."""
    final = setup.output_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = setup.output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    inner.restore()
    accelerator.save_state(str(staging / ACCELERATE_STATE))  # every process writes its RNG state
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if accelerator.is_main_process:
        save_model_folder(accelerator.unwrap_model(model), setup, staging, with_code=False, state_dict=state_dict)
        state = dict(step=step, tokens=tokens, max_steps=setup.max_steps, warmup_steps=setup.warmup_steps,
                     run=setup.run_settings, world_size=accelerator.num_processes)
        with open(staging / TRAINER_STATE, "w", encoding="utf-8") as file:
            json.dump(state, file, indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final


def write_final_folder(accelerator, model, setup: Setup, step: int, tokens: int, val_ppl: float | None) -> None:
    """The final model in `--output-dir`: a Hub-ready folder (remote code, tokenizer, generation config, model card)."""
    from .model_card import make_model_card

    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    save_model_folder(unwrapped, setup, setup.output_dir, with_code=True, state_dict=state_dict)
    args = setup.args
    if getattr(unwrapped.config, "model_type", None) != "ttt":
        return  # the TTT model card describes TTT layers only
    layout = "packed documents, state reset at each document" if args.packing else "rows cut from the token stream"
    notes = (f"Trained from scratch with `ttt-train` for {step} steps of {setup.run_settings['global_batch_size']} x "
             f"{args.grad_accum} rows of {args.seq_len} tokens ({layout}); "
             f"AdamW (0.9, 0.95), lr {args.lr} with {setup.warmup_steps} warm-up steps and cosine decay to "
             f"{args.min_lr}, weight decay {args.weight_decay}, gradient clipping {args.max_grad_norm}.")
    datasets = list(args.data) if args.data else ["CPython standard library (.py sources)"]
    results = None
    if val_ppl is not None and val_ppl >= 1:
        results = dict(perplexity=val_ppl, dataset=datasets[0], split="validation", context_length=args.seq_len)
    card = make_model_card(unwrapped.config, num_parameters=unwrapped.num_parameters(),
                           training=dict(datasets=datasets, tokens=tokens, steps=step,
                                         sequence_length=args.seq_len, notes=notes),
                           results=results, model_name=setup.output_dir.name or None)
    card.save(str(setup.output_dir / "README.md"))


def stream_sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float) -> str:
    import torch
    from transformers import TextStreamer

    model.eval()
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    kwargs = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        # one token first, unstreamed: a first decoding step may build the C++ kernels, whose note would otherwise
        # land in the middle of the streamed text
        model.generate(input_ids, max_new_tokens=1, do_sample=False)
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, streamer=streamer, **kwargs)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def train(setup: Setup, accelerator) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, GenerationConfig, set_seed
    from transformers.utils import logging as transformers_logging

    from . import TTTForCausalLM
    from .data import row_batch

    args = setup.args
    log = accelerator.print
    output_dir = setup.output_dir
    # Checkpoints would otherwise print a "Writing model shards" bar and, for tied embeddings, accelerate's note
    # that the tied copy is not stored twice (load_state ties it again) through the training bar.
    transformers_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    if accelerator.is_main_process:
        if args.overwrite and holds_run(output_dir):
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # left by a run killed while checkpointing
            shutil.rmtree(stale, ignore_errors=True)
        if setup.resume_dir is not None:
            truncate_metrics(output_dir / METRICS, setup.resume_step)
    accelerator.wait_for_everyone()

    set_seed(args.seed)  # the same initial weights on every process and every run with this seed
    if args.arch == "ttt":
        model = TTTForCausalLM(setup.config)
    else:
        model = AutoModelForCausalLM.from_config(setup.config)
    model.generation_config = GenerationConfig(bos_token_id=setup.tokenizer.bos_token_id,
                                               eos_token_id=setup.tokenizer.eos_token_id,
                                               pad_token_id=setup.tokenizer.pad_token_id)
    if args.activation_checkpointing:
        # transformers 5.x name (gradient_checkpointing_enable is the deprecated alias)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    num_parameters = model.num_parameters()
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: Accelerate's scheduler wrapper steps num_processes times per step (for a schedule measured in
    # per-process batches); ours is measured in optimizer steps. Registered so that save_state/load_state keep it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        lambda step: lr_multiplier(step, setup.warmup_steps, setup.max_steps, args.lr, args.min_lr))
    accelerator.register_for_checkpointing(scheduler)
    inner = InnerLrSchedule(accelerator.unwrap_model(model).config, setup.warmup_steps)

    step, tokens = 0, 0
    if setup.resume_dir is not None:
        accelerator.load_state(str(setup.resume_dir / ACCELERATE_STATE))
        state = read_json(setup.resume_dir / TRAINER_STATE)
        step, tokens = int(state["step"]), int(state["tokens"])

    metrics = MetricsLog(output_dir / METRICS, accelerator.is_main_process)
    world = accelerator.num_processes
    tokens_per_step = setup.run_settings["global_batch_size"] * args.grad_accum * args.seq_len
    header = dict(event="resume" if setup.resume_dir is not None else "start", step=None, resumed_from=step or None,
                  world_size=world, arch=args.arch, num_parameters=num_parameters,
                  vocab_size=setup.config.vocab_size, max_steps=setup.max_steps, tokens_per_step=tokens_per_step,
                  train_tokens=len(setup.train_stream), val_tokens=len(setup.val_stream),
                  train_documents=setup.train_stream.num_documents, val_documents=setup.val_stream.num_documents,
                  packing=args.packing, mixed_precision=args.mixed_precision)
    metrics.write(header)
    log(f"{PROG}: {args.arch} model, {num_parameters:,} parameters; world size {world}; "
        f"{setup.train_stream.num_documents} training documents ({len(setup.train_stream):,} tokens, "
        f"{setup.train_rows} rows of {args.seq_len}), {setup.val_stream.num_documents} validation documents "
        f"({len(setup.val_stream):,} tokens); {setup.max_steps} steps of {tokens_per_step:,} tokens; "
        f"{'packed rows, position ids restart at each document' if args.packing else 'no packing'}")
    for note in setup.notes:
        log(f"{PROG}: {note}")
    if args.report_to and args.report_to != ["none"]:
        # trackers take scalars only (tensorboard's hparams): lists and None as text
        scalars = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in vars(args).items()}
        accelerator.init_trackers(PROG, config=scalars)

    def log_metrics(record: dict) -> None:
        metrics.write(record)
        accelerator.log({key: value for key, value in record.items() if key != "step" and value is not None},
                        step=record["step"])

    val_loss = val_ppl = None
    if step == 0:
        val_loss, val_ppl = evaluate(model, setup, accelerator)
        log(f"{PROG}: step 0: validation loss {val_loss:.4f}, perplexity {val_ppl:.2f}")
        log_metrics(dict(step=0, tokens=0, val_loss=val_loss, val_ppl=val_ppl))

    order = BatchOrder(setup.train_rows, setup.run_settings["global_batch_size"], args.batch_size,
                       accelerator.process_index, args.seed)
    progress = tqdm(total=setup.max_steps, initial=step, desc=PROG, unit="step", dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    while step < setup.max_steps:
        started = time.perf_counter()
        inner.at_step(step)
        batches = []
        for micro in range(args.grad_accum):
            batch = row_batch(setup.train_stream, order.indices(step * args.grad_accum + micro), args.seq_len,
                              args.packing)
            batches.append({key: value.to(accelerator.device) for key, value in batch.items()})
        # The loss of a step is the mean over all its targets (every micro-step, every process): each micro-step's
        # summed NLL is divided by the global target count, and multiplied by the world size because DDP averages
        # the gradients of the processes.
        local_count = sum((batch["labels"][:, 1:] != -100).sum() for batch in batches)
        global_count = accelerator.reduce(local_count.clone(), reduction="sum").clamp(min=1)
        loss_total = torch.zeros((), device=accelerator.device)
        for micro, batch in enumerate(batches):
            last = micro == len(batches) - 1
            context = accelerator.no_sync(model) if not last else _null_context()
            with context:
                with accelerator.autocast():
                    logits = model(**model_inputs(args.arch, batch)).logits
                loss_sum, _ = nll_sum(logits, batch["labels"])
                accelerator.backward(loss_sum * world / global_count)
            loss_total += loss_sum.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        loss = float(accelerator.reduce(loss_total, reduction="sum") / global_count)
        elapsed = time.perf_counter() - started
        record = dict(step=step, tokens=tokens, loss=loss, lr=lr, grad_norm=float(grad_norm),
                      tokens_per_s=tokens_per_step / elapsed)
        if inner.active:
            record["ttt_base_lr"] = ttt_base_lr_at(step - 1, setup.warmup_steps, inner.target)
        if step == setup.max_steps or (args.eval_every and step % args.eval_every == 0):
            inner.restore()
            val_loss, val_ppl = evaluate(model, setup, accelerator)
            record.update(val_loss=val_loss, val_ppl=val_ppl)
            if accelerator.is_main_process:
                progress.write(f"{PROG}: step {step}: validation loss {val_loss:.4f}, perplexity {val_ppl:.2f}")
        log_metrics(record)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if step == setup.max_steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(accelerator, model, setup, step, tokens, inner)
        if args.debug_step_delay:
            time.sleep(args.debug_step_delay)
    progress.close()
    inner.restore()
    if val_ppl is None:  # resumed from the last step: nothing was evaluated in this process
        val_loss, val_ppl = evaluate(model, setup, accelerator)

    write_final_folder(accelerator, model, setup, step, tokens, val_ppl)
    if accelerator.is_main_process:
        log(f"{PROG}: final validation perplexity {val_ppl:.2f} after {step} steps, {tokens:,} tokens; model saved "
            f"to {output_dir}")
    accelerator.wait_for_everyone()
    metrics.close()
    accelerator.end_training()
    if args.sample_prompt and accelerator.is_main_process:
        how = "greedy" if args.sample_temperature == 0 else f"temperature {args.sample_temperature}"
        log(f"{PROG}: sample ({how}):")
        stream_sample(accelerator.unwrap_model(model), setup.tokenizer, args.sample_prompt, args.sample_tokens,
                      args.sample_temperature)
    return dict(step=step, tokens=tokens, val_loss=val_loss, val_ppl=val_ppl)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to == ["none"] else args.report_to
    try:
        accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=report_to,
                                  project_config=ProjectConfiguration(
                                      project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")))
    except (ValueError, ImportError) as error:  # e.g. fp16 without a GPU, a tracker that is not installed
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 2
    if report_to and "all" not in report_to:
        # Accelerate drops a requested tracker whose package is missing with a warning only: refuse instead
        kept = {str(getattr(tracker, "value", None) or getattr(tracker, "name", tracker)).lower()
                for tracker in accelerator.log_with}
        missing = [name for name in report_to if str(name).lower() not in kept]
        if missing:
            print(f"{PROG}: error: --report-to {' '.join(missing)}: not available here (is its package installed? "
                  "e.g. pip install tensorboard)", file=sys.stderr)
            return 2
    try:
        setup = prepare(args, accelerator)
    except UsageError as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 2
    train(setup, accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
