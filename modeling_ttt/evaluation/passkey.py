"""`ttt-eval passkey`: passkey retrieval accuracy by context length and depth.

Each prompt is the standard passkey task: an instruction, a filler passage repeated to the target length (in tokens
of the model's own tokenizer), the pass key sentence inserted at the depth fraction of the filler (0: right after
the instruction, 1: right before the question), then the question. The model decodes a few tokens greedily; the
answer is the first integer in them (`score_passkey_answer`). Each cell (length × depth) runs `--trials` random
5-digit keys, seeded by `--seed`, the length and the depth (so a cell's keys do not depend on the other cells).

Accuracy is all or nothing, and a small model that has never seen the task scores 0 everywhere whether or not its
state holds the key. So every trial is also scored by likelihood: `key_nll`, the negative log-probability
(nats, summed over its tokens) of the answer " {key}" right after the prompt, and `decoy_nll`, the same for another
random 5-digit key that is not in the prompt (seeded like the keys). Their difference, `retrieval_gain =
decoy_nll − key_nll`, is the log-likelihood ratio of the true key over an arbitrary one: about 0 for a model that
ignores the key in its context, positive when the context makes the true key more likely. The text is read as
`ttt-eval perplexity` reads a document (`scoring.py`: a TTT model streams it through its cache; a Llama past its
positions reads it in a sliding window, so a key further back than the window is out of its sight).

Outputs: `--output FILE.json` (the cells and every trial: key, decoded text, correct, the likelihoods), the cells
as CSV beside it (`FILE.csv` or `--csv`: `CELL_COLUMNS`, the likelihoods as means over the cell's trials) and heat
maps of accuracy and retrieval gain (`FILE.png` or `--plot`: depths × lengths).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import torch

from . import common, scoring

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
CELL_COLUMNS = ("length", "depth", "trials", "correct", "accuracy", "prompt_tokens", "key_nll", "decoy_nll",
                "retrieval_gain")


def score_passkey_answer(text: str, key: int) -> bool:
    """Whether the decoded `text` answers `key`: its first integer (digits run together) is the key."""
    match = re.search(r"\d+", text)
    return match is not None and int(match.group()) == int(key)


def passkey_keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    """`trials` random 5-digit keys for one cell, the same on every run and machine."""
    generator = random.Random(f"{seed}:{length}:{depth}")
    return [generator.randint(10_000, 99_999) for _ in range(trials)]


def decoy_keys(seed: int, length: int, depth: float, keys: list[int]) -> list[int]:
    """One random 5-digit key per trial, other than that trial's key (the likelihood control)."""
    generator = random.Random(f"decoy:{seed}:{length}:{depth}")
    decoys = []
    for key in keys:
        decoy = generator.randint(10_000, 99_999)
        while decoy == key:
            decoy = generator.randint(10_000, 99_999)
        decoys.append(decoy)
    return decoys


def answer_ids(tokenizer, key: int) -> list[int]:
    """The token ids of the answer " {key}" that follows the prompt's last word, without special tokens."""
    return list(tokenizer(f" {key}", add_special_tokens=False)["input_ids"])


def continuation_nll(model, plan: scoring.ScoringPlan, prompt: list[int], continuation: list[int]) -> float:
    """`−log p(continuation | prompt)` in nats: the token NLLs of `continuation` read right after `prompt`, summed."""
    token_nll, _ = scoring.document_token_nll(model, torch.tensor(prompt + continuation), plan)
    return float(token_nll[-len(continuation):].double().sum())


def passkey_text(key: int, repeats: int, depth: float) -> str:
    before = round(depth * repeats)
    parts = [INTRO, *[FILLER] * before, NEEDLE.format(key=key), *[FILLER] * (repeats - before), QUESTION]
    return " ".join(parts)


def passkey_prompt(tokenizer, key: int, length: int, depth: float, add_bos: bool = False) -> list[int]:
    """The prompt's token ids, as long as possible without exceeding `length` tokens (an `EvaluationError` if
    even no filler at all is longer)."""
    base = len(common.encode(tokenizer, passkey_text(key, 0, depth), add_bos))
    if base > length:
        raise common.EvaluationError(f"context length {length} is shorter than the passkey prompt without filler "
                                     f"({base} tokens of this tokenizer); ask for longer --lengths.")
    # the tokenizer's own special tokens are counted once, in `base`
    per_repeat = max(1, len(common.encode(tokenizer, passkey_text(key, 1, depth), add_bos)) - base)
    repeats = max(0, (length - base) // per_repeat)
    ids = common.encode(tokenizer, passkey_text(key, repeats, depth), add_bos)
    # the estimate can be off by a few tokens where the filler joins its neighbours: step back until it fits
    while len(ids) > length and repeats > 0:
        repeats -= 1
        ids = common.encode(tokenizer, passkey_text(key, repeats, depth), add_bos)
    return ids


def _float_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _int_list(text: str) -> list[int]:
    values = _float_list(text)
    if any(value != int(value) or value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [int(value) for value in values]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    group = parser.add_argument_group("passkey")
    group.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192], metavar="N,N,...",
                       help="context lengths in tokens (default 1024,2048,4096,8192)")
    group.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="F,F,...",
                       help="where the key goes in the filler, fractions in [0, 1] (default 0,0.25,0.5,0.75,1)")
    group.add_argument("--trials", type=int, default=5, help="random keys per cell (default 5)")
    group.add_argument("--seed", type=int, default=0, help="seed of the keys")
    group.add_argument("--max-new-tokens", type=int, default=8, help="tokens decoded greedily per prompt")
    group.add_argument("--bos", action="store_true",
                       help="put the tokenizer's BOS token first where the tokenizer itself does not")
    parser.add_argument("--output", default="passkey.json", metavar="FILE.json",
                        help="the cells and every trial (default passkey.json)")
    parser.add_argument("--csv", default=None, metavar="FILE.csv", help="the cells (default: beside --output)")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="the heat map (default: beside --output)")
    common.add_common_arguments(parser)


@torch.no_grad()
def answer(model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of `prompt`, decoded."""
    device = model.get_input_embeddings().weight.device
    input_ids = torch.tensor([prompt], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                            min_new_tokens=1, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)


def plot_heatmap(cells: list[dict], lengths: list[int], depths: list[float], title: str):
    """Accuracy and retrieval gain as depths × lengths heat maps side by side, each cell labelled with its value."""
    plt = common.pyplot()
    figure, panels = plt.subplots(1, 2, figsize=(2 * (1.2 * len(lengths) + 2.5), 0.6 * len(depths) + 2.2))
    largest_gain = max([abs(c["retrieval_gain"]) for c in cells] + [1.0])
    for axes, (field, label, colormap, low, high) in zip(panels, (
            ("accuracy", "accuracy (greedy answer)", "RdYlGn", 0.0, 1.0),
            ("retrieval_gain", "retrieval gain (nats): decoy NLL − key NLL", "RdBu", -largest_gain, largest_gain))):
        grid = [[next(c[field] for c in cells if c["length"] == length and c["depth"] == depth)
                 for length in lengths] for depth in depths]
        image = axes.imshow(grid, cmap=colormap, vmin=low, vmax=high, aspect="auto")
        for row, values in enumerate(grid):
            for column, value in enumerate(values):
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
        axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        axes.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
        axes.set_xlabel("context length (tokens)")
        axes.set_ylabel("depth of the pass key")
        figure.colorbar(image, ax=axes, label=label)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def run(args: argparse.Namespace) -> int:
    if args.trials < 1 or args.max_new_tokens < 1:
        raise common.EvaluationError("--trials and --max-new-tokens must be >= 1.")
    if any(not 0 <= depth <= 1 for depth in args.depths):
        raise common.EvaluationError(f"--depths must be fractions in [0, 1], got {args.depths}.")
    lengths, depths = sorted(set(args.lengths)), sorted(set(args.depths))
    state = common.process_state()
    device = common.resolve_device(args.device, state)
    model, tokenizer = common.load_model_and_tokenizer(args.model, args.dtype, device, args.trust_remote_code,
                                                      not args.no_progress)
    limit = common.max_positions(model)
    jobs, decoys = [], {}
    for length in lengths:
        for depth in depths:
            keys = passkey_keys(args.seed, length, depth, args.trials)
            for trial, (key, decoy) in enumerate(zip(keys, decoy_keys(args.seed, length, depth, keys))):
                jobs.append((length, depth, trial, key))
                decoys[jobs[-1]] = decoy
    # every prompt is built (and a too-short length refused) before the first decode
    prompts = {job: passkey_prompt(tokenizer, job[3], job[0], job[1], args.bos) for job in jobs}
    plan = scoring.scoring_plan(model)

    trials = []
    mine = common.shard(jobs, state)
    for job in common.progress(mine, enabled=not args.no_progress, state=state, desc="passkey", unit="prompt"):
        length, depth, trial, key = job
        text = answer(model, tokenizer, prompts[job], args.max_new_tokens)
        key_nll = continuation_nll(model, plan, prompts[job], answer_ids(tokenizer, key))
        decoy_nll = continuation_nll(model, plan, prompts[job], answer_ids(tokenizer, decoys[job]))
        trials.append({"length": length, "depth": depth, "trial": trial, "key": key, "answer": text,
                       "correct": score_passkey_answer(text, key), "prompt_tokens": len(prompts[job]),
                       "key_nll": key_nll, "decoy": decoys[job], "decoy_nll": decoy_nll,
                       "retrieval_gain": decoy_nll - key_nll})
    trials = common.gather(trials, state)
    if not state.is_main_process:
        return 0

    cells = []
    for length in lengths:
        for depth in depths:
            cell = [t for t in trials if t["length"] == length and t["depth"] == depth]
            correct = sum(t["correct"] for t in cell)
            cells.append({"length": length, "depth": depth, "trials": len(cell), "correct": correct,
                          "accuracy": correct / len(cell),
                          "prompt_tokens": round(sum(t["prompt_tokens"] for t in cell) / len(cell)),
                          **{field: sum(t[field] for t in cell) / len(cell)
                             for field in ("key_nll", "decoy_nll", "retrieval_gain")}})
    accuracy = sum(t["correct"] for t in trials) / len(trials)
    retrieval_gain = sum(t["retrieval_gain"] for t in trials) / len(trials)
    results = {"model": str(args.model), "model_type": model.config.model_type, "seed": args.seed,
               "max_new_tokens": args.max_new_tokens, "max_positions": limit,
               "beyond_max_positions": [length for length in lengths if limit is not None and length > limit],
               "accuracy": accuracy, "retrieval_gain": retrieval_gain, "cells": cells, "trials": trials}
    output = Path(args.output)
    title = f"Passkey retrieval: {Path(args.model).name}"
    common.write_results([
        common.json_output(output, results),
        common.csv_output(Path(args.csv) if args.csv else output.with_suffix(".csv"), cells, CELL_COLUMNS),
        common.figure_output(Path(args.plot) if args.plot else output.with_suffix(".png"),
                             plot_heatmap(cells, lengths, depths, title)),
    ], state)
    print(f"passkey accuracy {accuracy:.3f}, mean retrieval gain {retrieval_gain:.2f} nats over {len(trials)} prompts "
          f"({len(lengths)} lengths x {len(depths)} depths x {args.trials} trials)", file=sys.stdout)
    return 0
