"""A few optimizer steps of a tiny TTT model on several processes, for tests/test_distributed_configs.py.

Launched with `accelerate launch --config_file configuration/accelerate/ddp-cpu.yaml` (with ACCELERATE_USE_CPU=1),
it trains the same model twice from the same initial weights on the same global batches:

- `accelerate`: `Accelerator().prepare(model, optimizer, loader)`, whatever the config made of it (DDP here);
- `fully_shard`: FSDP2 as Accelerate applies it on GPUs with `configuration/accelerate/fsdp.yaml`: torch's
  `fully_shard` on every module of the class given by `--wrap-class` (the config's
  `fsdp_transformer_layer_cls_to_wrap`), then on the whole model; parameters, gradients and optimizer state are then
  split over the processes. (Accelerate 1.15 runs an FSDP config on the CPU as plain DDP, so this is done here.)

`reference_losses` is the single-process run the test compares with: one process, the whole global batch per step.
Every row has the same number of tokens, so the mean of the per-process mean losses, which is what the gradient
averaging of DDP and FSDP optimises, is the mean over the global batch, and the losses must agree to float32
rounding. The main process writes JSON to `--output`.
"""

import argparse
import json

import torch

from modeling_ttt import TTTConfig, TTTForCausalLM

STEPS, GLOBAL_BATCH, SEQ_LEN, LR = 3, 4, 24, 1e-2


def tiny_model() -> TTTForCausalLM:
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, mini_batch_size=8, ttt_layer_type="linear", ttt_base_lr=1.0,
                       pre_conv=True, share_qk=True, use_gate=True)
    return TTTForCausalLM(config).train()


def global_batches() -> torch.Tensor:
    """`[STEPS, GLOBAL_BATCH, SEQ_LEN]` token ids, the same in every process."""
    return torch.randint(0, 97, (STEPS, GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def reference_losses() -> list[float]:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for input_ids in global_batches():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def accelerate_run(accelerator) -> list[float]:
    model = tiny_model()
    # no shuffling: process r reads the r-th slice of every global batch (accelerate's batch sharding)
    rows = global_batches().flatten(0, 1)
    loader = torch.utils.data.DataLoader(rows, batch_size=GLOBAL_BATCH // accelerator.num_processes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for input_ids in loader:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach().reshape(1)).mean().item())
    accelerator.free_memory(model, optimizer)
    return losses


def fully_shard_run(wrap_class: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = tiny_model()
    units = [module for module in model.modules() if type(module).__name__ == wrap_class]
    for module in units:
        fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)  # over the local shards (DTensors)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = GLOBAL_BATCH // world
    local_numels = sum(param.to_local().numel() for param in model.parameters())
    losses = []
    for input_ids in global_batches():
        rows = input_ids[rank * share:(rank + 1) * share]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()  # reduce-scatter: every process keeps the averaged gradient of its shard
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().reshape(1)
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return {
        "losses": losses,
        "units": sum(isinstance(module, FSDPModule) for module in units),
        "local_numels": local_numels,
        "numels": sum(param.numel() for param in model.parameters()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--wrap-class", default="TTTBlock")
    args = parser.parse_args()

    from accelerate import Accelerator

    accelerator = Accelerator()
    result = {
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "backend": accelerator.state.backend,
        "accelerate_losses": accelerate_run(accelerator),
        "fully_shard": fully_shard_run(args.wrap_class) if accelerator.num_processes > 1 else None,
    }
    if accelerator.is_main_process:
        with open(args.output, "w") as file:
            json.dump(result, file)
    accelerator.end_training()


if __name__ == "__main__":
    main()
