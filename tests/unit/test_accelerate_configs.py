"""Every shipped accelerate config is loaded and validated by Accelerate's own launcher code (the arguments and
environment `accelerate launch --config_file FILE` would give the processes, without starting them), its
DeepSpeed file by DeepSpeed's config parser, its FSDP section by Accelerate's FSDP plugin; each file is headed
by the command that uses it and documented in docs/scaling.md. The CPU-runnable ones are also exercised by
real 2-process runs in tests/integration/test_distributed_runs.py."""

from __future__ import annotations

import json
import re
import socket

import pytest
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from deepspeed.runtime.config import DeepSpeedConfig

from runs import REPO
from launcher.distributed.accelerator import recipe_owned_deepspeed_values, reconcile_deepspeed_config
from launcher.recipe.loading import load_recipe

CONFIGS = REPO / "accelerate_configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))
# What each file promises: distributed type, processes, ZeRO stage (DeepSpeed files), offload (optimizer, params).
EXPECTED = {
    "single.yaml": ("NO", 1, None, None),
    "ddp.yaml": ("MULTI_GPU", 8, None, None),
    "cpu_ddp.yaml": ("MULTI_GPU", 2, None, None),
    "zero2.yaml": ("DEEPSPEED", 8, 2, (False, False)),
    "zero3.yaml": ("DEEPSPEED", 8, 3, (False, False)),
    "zero3_offload.yaml": ("DEEPSPEED", 8, 3, (True, True)),
    "fsdp2.yaml": ("FSDP", 8, None, None),
    "npu_single.yaml": ("NO", 1, None, None),
    "npu_ddp.yaml": ("MULTI_NPU", 8, None, None),
    "npu_zero3.yaml": ("DEEPSPEED", 8, 3, (False, False)),
    "multi_node.yaml": ("MULTI_GPU", 16, None, None),
}


@pytest.fixture(autouse=True)
def run_from_repository_root(monkeypatch):
    """The files name their DeepSpeed json relative to the repository root, where the documented commands run."""
    monkeypatch.chdir(REPO)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_environment(path) -> dict[str, str]:
    """The environment `accelerate launch --config_file PATH launcher/run.py` gives the processes, from
    Accelerate's launcher code. The port is a free one, as a caller passes for a real launch."""
    argv = ["--config_file", str(path), "--main_process_port", str(free_port()), "launcher/run.py"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return prepare_multi_gpu_env(args)
    return {"ACCELERATE_MIXED_PRECISION": args.mixed_precision}


def test_every_shipped_config_is_listed_here():
    assert sorted(path.name for path in CONFIG_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_is_headed_by_its_command_and_loads_in_accelerate(path):
    raw = yaml.safe_load(path.read_text())
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"--config_file accelerate_configs/{path.name}" in first
    assert "launcher/run.py" in path.read_text().split("\n\n")[0]  # the command block names the entry point
    assert "mixed_precision" not in raw, "precision comes from the recipe"
    distributed_type, processes, _, _ = EXPECTED[path.name]
    assert (raw["distributed_type"], raw["num_processes"]) == (distributed_type, processes)
    environment = launch_environment(path)
    assert environment["ACCELERATE_MIXED_PRECISION"] == "no"  # the recipe's precision is not overridden


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if EXPECTED[p.name][0] == "DEEPSPEED"], ids=lambda p: p.name)
def test_deepspeed_config_leaves_recipe_values_auto_and_parses_in_deepspeed(path, monkeypatch):
    for name, value in launch_environment(path).items():
        monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()  # reads the launch environment, as the training processes do
    config = plugin.hf_ds_config.config
    _, _, stage, (offload_optimizer, offload_params) = EXPECTED[path.name]
    zero = config["zero_optimization"]
    assert zero["stage"] == stage and plugin.zero3_init_flag == (stage == 3)
    assert ("offload_optimizer" in zero, "offload_param" in zero) == (offload_optimizer, offload_params)
    assert stage != 3 or zero["stage3_gather_16bit_weights_on_model_save"]
    recipe = load_recipe(REPO / "recipes" / "llama3_yelp.yaml")
    for dotted in recipe_owned_deepspeed_values(recipe.training, "bf16", 1):
        *parents, key = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        assert node[key] == "auto", dotted
    reconcile_deepspeed_config(config, recipe.training, "bf16", 1)
    # Accelerate fills the bucket sizes from the model's hidden size at prepare(); any number parses here.
    filled = json.loads(json.dumps(config).replace('"auto"', "1000000"))
    DeepSpeedConfig(filled)


def test_fsdp2_config_gives_full_shard_per_transformer_layer_and_sharded_checkpoints(monkeypatch):
    for name, value in launch_environment(CONFIGS / "fsdp2.yaml").items():
        monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert str(plugin.state_dict_type) == "StateDictType.SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading  # rank 0 reads the weights, FSDP2 broadcasts them (no sync flag)
    assert plugin.transformer_cls_names_to_wrap is None  # wraps the model's _no_split_modules


def test_npu_configs_pin_devices_through_ascend_visibility():
    assert yaml.safe_load((CONFIGS / "npu_single.yaml").read_text())["gpu_ids"] == "0"
    environment = launch_environment(CONFIGS / "npu_ddp.yaml")
    assert environment.get("ASCEND_RT_VISIBLE_DEVICES") is None  # gpu_ids: all leaves every NPU visible


def test_multi_node_template_takes_rank_and_address_from_the_command_line():
    argv = ["--config_file", "accelerate_configs/multi_node.yaml", "--num_machines", "2", "--num_processes", "16",
            "--machine_rank", "1", "--main_process_ip", "10.0.0.7", "--main_process_port", "29555", "launcher/run.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert "10.0.0.7:29555" in (getattr(args, "rdzv_endpoint", "") or f"{args.master_addr}:{args.master_port}")


def test_docs_name_every_config_and_only_existing_ones():
    docs = (REPO / "docs" / "scaling.md").read_text()
    named = set(re.findall(r"accelerate_configs/([\w./-]+\.(?:yaml|json))", docs))
    assert {path.name for path in CONFIG_FILES} <= named
    assert all((CONFIGS / name).is_file() for name in named), named
