"""The config contract: DeepSpeed key names, strict parsing, every problem reported with its JSON
path in one ConfigError, the batch rule with and without the world size, the schema."""

import glob
import json
import os

import pytest

from memfit.config import ConfigError, MemfitConfig, load_config, resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stgae": 2}, "prescale_gradients": True, "seed": "x"}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"{path}: 4 problems\n"
        "  zero_optimization.stgae: unknown key (did you mean 'stage'?)\n"
        "  prescale_gradients: true is supported by DeepSpeed, not by memfit (memfit accepts false)\n"
        '  seed: expected an integer, got "x"\n'
        "  train_micro_batch_size_per_gpu: required key missing (or give train_batch_size)"
    )


def test_a_deepspeed_key_memfit_lacks_is_reported_before_auto_is_asked_for():
    with pytest.raises(ConfigError) as info:
        load_config({"train_micro_batch_size_per_gpu": 1, "hybrid_engine": {"enabled": True, "max_out_tokens": "auto"}})
    assert info.value.problems == [
        "hybrid_engine: supported by DeepSpeed, not by memfit (memfit accepts the section only with enabled false)"
    ]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.json"))))
def test_example_configs_parse(path):
    config = load_config(path)
    assert config.batch_sizes(2)[0] > 0


@pytest.mark.parametrize(
    "batch,world,expected",
    [
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 4, (32, 4, 2)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_batch_size": 8}, 2, (8, 4, 1)),
        ({"train_micro_batch_size_per_gpu": 3}, 2, (6, 3, 1)),
        ({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}, 1, (1, 1, 1)),
    ],
)
def test_batch_rule(batch, world, expected):
    assert load_config(batch).batch_sizes(world) == expected
    assert resolve_config(batch, world).config.batch_sizes(world) == expected


@pytest.mark.parametrize(
    "batch,world,problem",
    [
        (
            {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
            4,
            "train_batch_size: 32 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1 x world size 4 = 16",
        ),
        (
            {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4},
            4,
            "train_batch_size: 8 is not a multiple of train_micro_batch_size_per_gpu 4 x world size 4 = 16",
        ),
        ({"train_batch_size": 9}, 2, "train_batch_size: 9 is not a multiple of world size 2"),
    ],
)
def test_batch_that_fails_only_at_this_world_size(batch, world, problem):
    config = load_config(batch)  # fine at some world size
    with pytest.raises(ConfigError) as info:
        config.batch_sizes(world)
    assert info.value.problems == [problem]
    with pytest.raises(ConfigError) as info:
        resolve_config(batch, world)
    assert info.value.problems == [problem]


@pytest.mark.parametrize(
    "batch,problem",
    [
        (
            {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
            "train_batch_size: 30 is not a multiple of train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps "
            "2 = 8, at any world size",
        ),
        (
            {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4},
            "train_batch_size: 10 is not a multiple of train_micro_batch_size_per_gpu 4, at any world size",
        ),
        (
            {"train_batch_size": 9, "gradient_accumulation_steps": 2},
            "train_batch_size: 9 is not a multiple of gradient_accumulation_steps 2, at any world size",
        ),
        ({}, "train_micro_batch_size_per_gpu: required key missing (or give train_batch_size)"),
        (
            {"gradient_accumulation_steps": 4},
            "train_micro_batch_size_per_gpu: required key missing (or give train_batch_size)",
        ),
    ],
)
def test_batch_that_no_world_size_can_fix_fails_at_load(batch, problem):
    with pytest.raises(ConfigError) as info:
        load_config(batch)
    assert info.value.problems == [problem]


@pytest.mark.parametrize("world_size", [0, -1, True, 2.0, None])
def test_world_size_must_be_a_positive_integer(world_size):
    config = load_config({"train_micro_batch_size_per_gpu": 2})
    with pytest.raises(ValueError, match=rf"^world_size: expected a positive integer, got {world_size!r}$"):
        config.batch_sizes(world_size)
    if world_size is not None:
        with pytest.raises(ValueError, match="^world_size: expected a positive integer"):
            resolve_config({"train_micro_batch_size_per_gpu": 2}, world_size)


def test_seed_range_covers_every_rank():
    assert load_config({"train_micro_batch_size_per_gpu": 1, "seed": 2**63 - 1}).seed == 2**63 - 1
    assert load_config({"train_micro_batch_size_per_gpu": 1, "seed": 0}).seed == 0


def test_whole_valued_numbers_are_integers():
    config = load_config({"train_micro_batch_size_per_gpu": 2.0, "zero_optimization": {"reduce_bucket_size": 5e8}})
    assert config.train_micro_batch_size_per_gpu == 2 and isinstance(config.train_micro_batch_size_per_gpu, int)
    assert config.zero_optimization.reduce_bucket_size == 500_000_000


def test_list_keywords_take_any_length_unless_they_are_a_fixed_tuple_of_numbers():
    config = load_config(
        {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "GaLoreAdamW", "params": {"target_modules": ["q"]}}}
    )
    assert config.optimizer.params == {"target_modules": ["q"]}


def test_source_must_be_a_path_dict_or_config():
    with pytest.raises(TypeError, match="^config: expected a file path, a dict or a MemfitConfig, got int$"):
        load_config(5)
    config = load_config({"train_micro_batch_size_per_gpu": 2})
    assert load_config(config) is config


def test_schema_has_descriptions():
    schema = MemfitConfig.model_json_schema()
    assert schema["additionalProperties"] is False
    assert "ranks" in schema["properties"]["train_batch_size"]["description"]
    assert schema["$defs"]["ZeroConfig"]["properties"]["stage"]["description"]
    assert schema["$defs"]["Fp16Config"]["properties"]["initial_scale_power"]["default"] == 16
    assert schema["$defs"]["OffloadOptimizerConfig"]["properties"]["device"]["enum"] == ["none", "cpu", "nvme"]
    assert '"auto": 1.0' in schema["properties"]["gradient_clipping"]["description"]
