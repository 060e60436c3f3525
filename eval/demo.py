"""Demo (the README's main job until the training script lands): convert an official JAX checkpoint, check it
against the JAX model's logits, and generate with the recurrent cache.

    python eval/demo.py [--checkpoint-dir tests/fixtures/ttt_jax/ttt_linear] [--output out/demo-model]

The default checkpoint is one of the small models written by the official JAX code that ship with the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import modeling_ttt  # noqa: F401  (registers model_type "ttt" with the Auto classes)
from modeling_ttt.conversion.jax import convert_jax_checkpoint

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "tests/fixtures/ttt_jax/ttt_linear",
                        help="folder with streaming_params, config.json and (optionally) input_ids.npy/logits.npy")
    parser.add_argument("--output", type=Path, default=REPO / "out/demo-model", help="Hugging Face folder to write")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    print(f"1. converting {args.checkpoint_dir / 'streaming_params'} -> {args.output}")
    convert_jax_checkpoint(args.checkpoint_dir / "streaming_params", args.checkpoint_dir / "config.json",
                           args.output, overwrite=True)

    print("2. loading with AutoModelForCausalLM.from_pretrained")
    model = AutoModelForCausalLM.from_pretrained(args.output).eval()
    config = model.config
    print(f"   {type(model).__name__}: TTT-{config.ttt_layer_type}, {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, mini-batch {config.mini_batch_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    input_ids_file, logits_file = args.checkpoint_dir / "input_ids.npy", args.checkpoint_dir / "logits.npy"
    if input_ids_file.exists() and logits_file.exists():
        input_ids = torch.from_numpy(np.load(input_ids_file)).long()
        jax_logits = torch.from_numpy(np.load(logits_file))
        with torch.no_grad():
            logits = model(input_ids).logits
        diff = (logits - jax_logits).abs().max().item()
        print(f"3. logits vs the official JAX model on {tuple(input_ids.shape)} tokens: max |diff| = {diff:.2e}")
        prompt = input_ids[:1, :21]
    else:
        prompt = torch.randint(3, config.vocab_size, (1, 21))

    print(f"4. greedy generation of {args.max_new_tokens} tokens from a {prompt.shape[1]}-token prompt")
    timings = {}
    outputs = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        outputs[use_cache] = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                                            use_cache=use_cache, pad_token_id=0)
        timings[use_cache] = time.perf_counter() - start
    same = torch.equal(outputs[True], outputs[False])
    print(f"   with the recurrent cache: {timings[True]:.2f}s; recomputing everything: {timings[False]:.2f}s; "
          f"identical tokens: {same}")
    print(f"   tokens: {outputs[True][0, prompt.shape[1]:].tolist()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
