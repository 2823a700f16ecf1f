"""Every example config validates offline, and the launcher/Docker files parse."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from newtune.config.load import load_config
from newtune.config.resolve import resolve
from newtune.train.distributed import distributed_kwargs

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
FAMILIES = ("llama-3", "qwen2.5", "qwen3", "mistral", "gemma", "phi")
VISION_FAMILIES = ("qwen2.5-vl", "gemma3-vision", "llama-3.2-vision", "smolvlm2")  # lora.yml
CONFIGS = sorted(
    p for p in EXAMPLES.glob("*/*.yml") if p.parent.name not in ("accelerate", "quickstart", "dpo")
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"validation tried to open a connection: {args[1:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # an offline flag must not hide a call


def test_every_family_has_lora_qlora_and_full():
    found = {(p.parent.name, p.stem) for p in CONFIGS}
    text = {(f, k) for f in FAMILIES for k in ("lora", "qlora", "full")}
    assert found == text | {(f, "lora") for f in VISION_FAMILIES}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_validates_without_the_network(path, no_network):
    loaded = load_config(str(path))
    cfg = loaded.config
    kind = path.stem
    assert cfg.adapter == (None if kind == "full" else kind)
    assert bool(cfg.load_in_4bit) == (kind == "qlora")
    assert "/" in cfg.base_model and not Path(cfg.base_model).exists()  # a hub id
    assert Path(cfg.output_dir).name == f"{path.parent.name}-{kind}"
    vision = path.parent.name in VISION_FAMILIES
    assert (cfg.processor_type == "AutoProcessor") == vision
    assert not (vision and cfg.sample_packing)
    # the distributed keys map too (on the GPUs the example is written for)
    plan = resolve(cfg, env={"WORLD_SIZE": "8"}, probe=lambda: ("cuda", True))
    kwargs = distributed_kwargs(cfg, plan)
    if cfg.deepspeed:
        assert kwargs["deepspeed"]["bf16"]["enabled"] in (True, "auto")
    if cfg.fsdp_config:
        assert kwargs["fsdp_config"]["transformer_layer_cls_to_wrap"][0].endswith("DecoderLayer")


def test_quickstart_config_validates_without_the_network(no_network, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/quickstart/config.yml").config
    assert cfg.adapter == "lora"


LAUNCHERS = {  # configs/accelerate/<name>.yaml -> accelerate's distributed_type
    "single_gpu": "NO",
    "multi_gpu": "MULTI_GPU",
    "multi_node_rank0": "MULTI_GPU",
    "multi_node_rank1": "MULTI_GPU",
    "fsdp": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
}


def test_launcher_presets_are_in_configs_and_named_in_their_usage_line():
    folder = ROOT / "configs" / "accelerate"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(LAUNCHERS)
    assert not (EXAMPLES / "accelerate").exists()  # examples/ holds training configs only
    for name in LAUNCHERS:
        text = (folder / f"{name}.yaml").read_text()
        assert f"accelerate launch --config_file configs/accelerate/{name}.yaml" in text


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_accelerate_configs_parse_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cluster = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert cluster.distributed_type == LAUNCHERS[name]
    if name == "fsdp":
        assert cluster.fsdp_config["fsdp_version"] == 2
    if name.startswith("deepspeed"):
        shipped = ROOT / cluster.deepspeed_config["deepspeed_config_file"]
        stage = json.loads(shipped.read_text())["zero_optimization"]["stage"]
        assert stage == int(name[-1])
    if name.startswith("multi_node"):
        assert (cluster.num_machines, cluster.num_processes) == (2, 16)
        assert cluster.machine_rank == int(name[-1])
        assert cluster.main_process_ip and cluster.main_process_port == 29500


def test_compose_builds_the_dockerfile_with_gpus_and_host_ipc():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
    service = compose["services"]["newtune"]
    assert (
        ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]
    ).is_file()
    assert service["ipc"] == "host"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    base = next(line for line in dockerfile.splitlines() if line.startswith("ARG CUDA_IMAGE="))
    assert base.endswith("-cudnn-devel-ubuntu24.04") and ":latest" not in base
    for package in ("torch==", "flash-attn==", "deepspeed==", "bitsandbytes==", "pip install -e"):
        assert package in dockerfile, package


def test_dpo_example_validates_as_dpo(no_network):
    from newtune.config.schema.preference import training_method

    cfg = load_config(str(EXAMPLES / "dpo" / "config.yml")).config
    assert training_method(cfg) == "dpo" and cfg.adapter == "lora" and cfg.sample_packing
