"""The Accelerate config files in configuration/accelerate/: they parse with Accelerate's own loader, name the
TTT block as the FSDP unit, and train on 2 CPU processes to the losses of one process with the same global batch."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

accelerate = pytest.importorskip("accelerate")
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from modeling_ttt import TTTForCausalLM  # noqa: E402
from modeling_ttt.modeling_ttt import TTTBlock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configuration" / "accelerate"
SCRIPT = Path(__file__).resolve().parent / "scripts" / "fsdp_step.py"
sys.path.insert(0, str(SCRIPT.parent))
import fsdp_step  # noqa: E402

reference_losses = functools.cache(fsdp_step.reference_losses)  # one process, the whole global batch per step


def test_ddp_cpu_config_parses_as_two_processes_on_the_cpu():
    config = load_config_from_file(str(CONFIGS / "ddp-cpu.yaml"))
    assert isinstance(config, ClusterConfig)
    # MULTI_GPU + use_cpu is what makes `accelerate launch` start num_processes workers (MULTI_CPU would start one)
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.use_cpu is True
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (2, 1, "no")


def test_fsdp_config_wraps_each_ttt_block():
    config = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    # the wrap class is the model's block, which is also what the model declares as not to be split
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == TTTBlock.__name__
    assert TTTForCausalLM._no_split_modules == [TTTBlock.__name__]

    # Accelerate's own plugin accepts these settings (the launcher passes them as FSDP_* environment variables)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"],
        state_dict_type=fsdp["fsdp_state_dict_type"],
    )
    assert plugin.transformer_cls_names_to_wrap == ["TTTBlock"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One `accelerate launch` of tests/scripts/fsdp_step.py with ddp-cpu.yaml (about 11 s of start-up)."""
    output = tmp_path_factory.mktemp("distributed") / "result.json"
    wrap_class = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    # the launcher does not pass the config's `use_cpu` on to the workers: without ACCELERATE_USE_CPU=1 they find no
    # GPU and each runs alone (world size 1)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp-cpu.yaml"),
               "--main_process_port", "0", str(SCRIPT), "--output", str(output), "--wrap-class", wrap_class]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(output.read_text())


def test_ddp_cpu_config_really_starts_two_gloo_processes(two_process_run):
    assert two_process_run["world_size"] == 2
    assert two_process_run["distributed_type"] == "MULTI_CPU"
    assert two_process_run["backend"] == "gloo"


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(two_process_run):
    reference = reference_losses()
    assert len(reference) == fsdp_step.STEPS and reference[0] != reference[-1]
    assert two_process_run["accelerate_losses"] == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_fsdp_sharding_of_ttt_blocks_matches_one_process(two_process_run):
    # Accelerate 1.15 runs an FSDP config on the CPU as DDP (its FSDP state is for accelerator devices only), so the
    # script shards as Accelerate's FSDP2 does on GPUs: fully_shard on every fsdp.yaml wrap-class module, then on the
    # whole model, over gloo
    sharded = two_process_run["fully_shard"]
    assert sharded["units"] == 2  # both blocks of the tiny model are shard units
    assert sharded["local_numels"] < 0.6 * sharded["numels"]  # each process holds about half of the parameters
    assert sharded["losses"] == pytest.approx(reference_losses(), rel=1e-5, abs=1e-6)
