"""The config contract: DeepSpeed key names, strict parsing, every problem reported with its JSON
path in one ConfigError."""

import glob
import json
import os
import warnings

import pytest

from memfit.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = {"train_micro_batch_size_per_gpu": 2}

INVALID = [
    ({"zero_optimization": {"stgae": 2}}, "zero_optimization.stgae: unknown key (did you mean 'stage'?)"),
    (
        {"train_micro_batch_size": 2},
        "train_micro_batch_size: unknown key (did you mean 'train_micro_batch_size_per_gpu'?)",
    ),
    ({"gradient_clip": 1.0}, "gradient_clip: unknown key (did you mean 'gradient_clipping'?)"),
    ({"bf16": {"enable": True}}, "bf16.enable: unknown key (did you mean 'enabled'?)"),
    ({"aio": {"queue_dept": 8}}, "aio.queue_dept: unknown key (did you mean 'queue_depth'?)"),
    (
        {"zero_optimization": {"offload_optimizer": {"devise": "cpu"}}},
        "zero_optimization.offload_optimizer.devise: unknown key (did you mean 'device'?)",
    ),
    ({"completely_new": 1}, "completely_new: unknown key"),
    ({"fp16": {"enabled": True}}, "fp16: supported by DeepSpeed, not by memfit"),
    ({"activation_checkpointing": {}}, "activation_checkpointing: supported by DeepSpeed, not by memfit"),
    (
        {"zero_optimization": {"offload_param": {"device": "cpu"}}},
        "zero_optimization.offload_param: supported by DeepSpeed, not by memfit",
    ),
    (
        {"zero_optimization": {"stage3_max_live_parameters": 1}},
        "zero_optimization.stage3_max_live_parameters: supported by DeepSpeed, not by memfit",
    ),
    ({"aio": {"use_gds": True}}, "aio.use_gds: supported by DeepSpeed, not by memfit"),
    (
        {"zero_optimization": {"stage": 3}},
        "zero_optimization.stage: stage 3 is supported by DeepSpeed, not by memfit (memfit implements stages 0, 1 and 2)",
    ),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage: expected 0, 1 or 2, got 7"),
    (
        {"zero_optimization": {"stage": "two"}},
        "zero_optimization.stage: expected a valid integer, unable to parse string as an integer, got 'two'",
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
        "zero_optimization.offload_optimizer.device: offload to 'cpu' is not available yet in this memfit release; use 'none'",
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
        "zero_optimization.offload_optimizer.device: offload to 'nvme' is not available yet in this memfit release; use 'none'",
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
        "zero_optimization.offload_optimizer.device: expected 'none', 'cpu' or 'nvme', got 'gpu'",
    ),
    (
        {"zero_optimization": {"reduce_bucket_size": 0}},
        "zero_optimization.reduce_bucket_size: expected greater than 0, got 0",
    ),
    ({"gradient_clipping": -1}, "gradient_clipping: expected greater than or equal to 0, got -1"),
    (
        {"gradient_clipping": "x"},
        "gradient_clipping: expected a valid number, unable to parse string as a number, got 'x'",
    ),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu: expected greater than 0, got 0"),
    ({"train_batch_size": "auto"}, 'train_batch_size: "auto" is not accepted by memfit; give a value'),
    (
        {"bf16": {"enabled": "yes please"}},
        "bf16.enabled: expected a valid boolean, unable to interpret input, got 'yes please'",
    ),
    ({"bf16": True}, "bf16: expected a valid dictionary or instance of Bf16Config, got True"),
    ({"aio": {"block_size": 1000}}, "aio.block_size: expected a multiple of 4096, got 1000"),
    ({"aio": {"queue_depth": 0}}, "aio.queue_depth: expected greater than or equal to 1, got 0"),
    ({"steps_per_print": 0}, "steps_per_print: expected greater than 0, got 0"),
    (
        {"optimizer": {"type": "Adamw"}},
        "optimizer.type: unknown optimizer 'Adamw' (did you mean 'AdamW'?); known: Adam, AdamW, CPUAdamW, FRUGAL, GaLoreAdamW, SGD",
    ),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type: 'Lamb' is supported by DeepSpeed, not by memfit"),
    (
        {"optimizer": {"type": "AdamW", "params": {"betas2": [0.9, 0.9]}}},
        "optimizer.params.betas2: unknown key (did you mean 'betas'?)",
    ),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -1}}}, "optimizer.params: Invalid learning rate: -1"),
    (
        {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": -0.5}}},
        "optimizer.params: Invalid momentum value: -0.5",
    ),
    (
        {"optimizer": {"type": "GaLoreAdamW", "params": {"rnak": 8}}},
        "optimizer.params.rnak: unknown key (did you mean 'rank'?)",
    ),
    (
        {"optimizer": {"type": "GaLoreAdamW", "params": {"projector": "qr"}}},
        "optimizer.params: Invalid projector: 'qr' (expected one of ('svd', 'randomized', 'random'))",
    ),
    (
        {"optimizer": {"type": "FRUGAL", "params": {"density": 2}}},
        "optimizer.params: Invalid density: 2 (expected 0 to 1)",
    ),
    ({"optimizer": {"typ": "AdamW"}}, "optimizer.typ: unknown key (did you mean 'type'?)"),
    (
        {"scheduler": {"type": "OneCycle"}},
        "scheduler.type: expected 'WarmupLR', 'WarmupDecayLR' or 'WarmupCosineLR', got 'OneCycle'",
    ),
    ({"scheduler": {"type": "WarmupDecayLR"}}, "scheduler.params.total_num_steps: required key missing"),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_steps": 10}}},
        "scheduler.params.warmup_steps: unknown key (did you mean 'warmup_num_steps'?)",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cubic"}}},
        "scheduler.params: warmup_type must be 'log' or 'linear', got 'cubic'",
    ),
    (
        {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": -5}}},
        "scheduler.params: total_num_steps must be a positive integer, got -5",
    ),
    ({"scheduler": {"params": {}}}, "scheduler.type: required key missing"),
]


@pytest.mark.parametrize(
    "overrides,message", INVALID, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(INVALID)]
)
def test_invalid_config_message(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, **overrides})
    assert info.value.problems == [message]


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stgae": 2}, "fp16": {"enabled": True}, "seed": "x"}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert len(info.value.problems) == 3
    assert str(info.value).startswith(f"{path}: 3 problems\n")


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  "seed": 1,,\n}')
    with pytest.raises(ConfigError, match=rf"^{path}: line 3, column 13: invalid JSON: Expecting property name"):
        load_config(str(path))


def test_duplicate_keys_rejected(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(ConfigError, match=r"duplicate keys \['seed'\]"):
        load_config(str(path))


def test_cosmetic_deepspeed_keys_warn_and_parse():
    with pytest.warns(UserWarning, match="wall_clock_breakdown is ignored by memfit"):
        config = load_config({**BASE, "wall_clock_breakdown": True})
    assert config.train_micro_batch_size_per_gpu == 2


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.json"))))
def test_example_configs_parse(path):
    config = load_config(path)
    assert config.batch_sizes(2)[0] > 0


def test_deepspeed_zero1_and_zero2_configs_parse():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        zero1 = load_config(os.path.join(ROOT, "tests", "configs", "deepspeed_zero1.json"))
        zero2 = load_config(os.path.join(ROOT, "tests", "configs", "deepspeed_zero2.json"))
    assert zero1.zero_optimization.stage == 1 and zero1.bf16.enabled
    assert zero1.batch_sizes(2) == (32, 8, 2)
    assert zero2.zero_optimization.stage == 2 and zero2.zero_optimization.overlap_comm
    assert zero2.aio.queue_depth == 8


def test_deepspeed_zero3_offload_config_fails_naming_each_key():
    with pytest.raises(ConfigError) as info:
        load_config(os.path.join(ROOT, "tests", "configs", "deepspeed_zero3_offload.json"))
    assert sorted(info.value.problems) == sorted(
        [
            "zero_optimization.offload_param: supported by DeepSpeed, not by memfit",
            "zero_optimization.stage3_max_live_parameters: supported by DeepSpeed, not by memfit",
            "zero_optimization.stage: stage 3 is supported by DeepSpeed, not by memfit (memfit implements stages 0, 1 and 2)",
            "zero_optimization.offload_optimizer.device: offload to 'cpu' is not available yet in this memfit release; use 'none'",
        ]
    )


@pytest.mark.parametrize(
    "batch,world,expected",
    [
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 4, (32, 4, 2)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_batch_size": 8}, 2, (8, 4, 1)),
        ({"train_micro_batch_size_per_gpu": 3}, 2, (6, 3, 1)),
    ],
)
def test_batch_rule(batch, world, expected):
    assert load_config(batch).batch_sizes(world) == expected


def test_inconsistent_batch_shows_arithmetic():
    config = load_config(
        {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    )
    with pytest.raises(
        ConfigError,
        match=r"train_batch_size: 32 != train_micro_batch_size_per_gpu 4 x "
        r"gradient_accumulation_steps 1 x world size 4 = 16",
    ):
        config.batch_sizes(4)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu: required"):
        load_config({}).batch_sizes(1)


def test_schema_has_descriptions():
    from memfit.config import MemfitConfig

    schema = MemfitConfig.model_json_schema()
    assert schema["additionalProperties"] is False
    assert "ranks" in schema["properties"]["train_batch_size"]["description"]
    assert schema["$defs"]["ZeroConfig"]["properties"]["stage"]["description"]
