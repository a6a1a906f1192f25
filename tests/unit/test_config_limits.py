"""Values `memfit config check` used to accept and memfit.initialize then refused with a
traceback (or took wrongly): a GaLore rank that is negative or not a count, sizes past any
machine, floats too large to be the integer they stand for, NUL bytes in a path, an empty path
(which meant the working directory). Both now refuse them with the same one line naming the key."""

import json

import pytest
import torch

import memfit
from memfit.config import ConfigError, load_config
from tests.unit.test_config_cli import check

BASE = {"train_micro_batch_size_per_gpu": 1}
NVME = {"device": "nvme"}

# (config overrides on top of BASE, the problem line)
CASES = [
    ({"optimizer": {"type": "GaLoreAdamW", "params": {"rank": -5}}}, "optimizer.params.rank: Invalid rank: -5"),
    ({"optimizer": {"type": "GaLoreAdamW", "params": {"rank": 0}}}, "optimizer.params.rank: Invalid rank: 0"),
    (
        {"optimizer": {"type": "GaLoreAdamW", "params": {"rank": 1e20}}},
        "optimizer.params.rank: expected an integer, got 1e+20",
    ),
    ({"aio": {"block_size": 4096e18}}, "aio.block_size: expected an integer, got 4.096e+21"),
    ({"aio": {"block_size": 1 << 31}}, "aio.block_size: expected an integer from 4096 to 1073741824, got 2147483648"),
    ({"train_micro_batch_size_per_gpu": 1e300}, "train_micro_batch_size_per_gpu: expected an integer, got 1e+300"),
    (
        {"train_micro_batch_size_per_gpu": 1 << 40},
        "train_micro_batch_size_per_gpu: expected an integer from 1 to 2147483647, got 1099511627776",
    ),
    ({"gradient_accumulation_steps": 1e19}, "gradient_accumulation_steps: expected an integer, got 1e+19"),
    (
        {"zero_optimization": {"reduce_bucket_size": 1e300}},
        "zero_optimization.reduce_bucket_size: expected an integer, got 1e+300",
    ),
    (
        {"zero_optimization": {"offload_optimizer": {"buffer_count": 1 << 20}}},
        "zero_optimization.offload_optimizer.buffer_count: expected an integer from 1 to 1024, got 1048576",
    ),
    (
        {"fp16": {"enabled": True, "initial_scale_power": 2000}},
        "fp16.initial_scale_power: expected an integer from 0 to 64, got 2000",
    ),
    ({"collective_timeout_s": 1e300}, "collective_timeout_s: expected a number from 1 to 2592000, got 1e+300"),
    ({"snapshot": {"interval_steps": 1e300}}, "snapshot.interval_steps: expected an integer, got 1e+300"),
    (
        {"snapshot": {"interval_steps": 1, "persist": {"path": "ckpt\x00/x"}}},
        'snapshot.persist.path: expected a path without NUL bytes, got "ckpt\\u0000/x"',
    ),
    (
        {"snapshot": {"interval_steps": 1, "persist": {"path": ""}}},
        'snapshot.persist.path: expected a non-empty path, got ""',
    ),
    (
        {"snapshot": {"interval_steps": 1, "shm_dir": "/dev/shm/a\x00b"}},
        'snapshot.shm_dir: expected a path without NUL bytes, got "/dev/shm/a\\u0000b"',
    ),
    (
        {"zero_optimization": {"stage": 1, "offload_optimizer": {**NVME, "nvme_path": "/tmp/\x00"}}},
        'zero_optimization.offload_optimizer.nvme_path: expected a path without NUL bytes, got "/tmp/\\u0000"',
    ),
]


@pytest.mark.parametrize("overrides,problem", CASES, ids=[problem.split(":")[0] for _, problem in CASES])
def test_config_and_initialize_refuse_alike_naming_the_key(overrides, problem):
    config = {**BASE, **overrides}
    with pytest.raises(ConfigError) as checked:
        load_config(config)
    assert str(checked.value) == f"config: {problem}"
    with pytest.raises(ConfigError) as initialized:
        memfit.initialize(torch.nn.Linear(4, 4), config)
    assert str(initialized.value) == str(checked.value)


def test_whole_valued_floats_within_range_still_count_as_integers():
    config = load_config({**BASE, "zero_optimization": {"reduce_bucket_size": 5e8}, "aio": {"block_size": 4096e2}})
    assert config.zero_optimization.reduce_bucket_size == 500_000_000
    assert config.aio.block_size == 409_600


def test_config_check_names_every_such_key_in_a_file(tmp_path):
    path = tmp_path / "ds_config.json"
    config = {**BASE}
    for overrides, _ in [CASES[0], CASES[3], CASES[5], CASES[13]]:
        config.update(overrides)
    path.write_text(json.dumps(config))
    result = check(str(path))
    assert result.returncode == 2
    assert sorted(result.stderr.splitlines()) == sorted(
        f"{path}: {problem}" for _, problem in [CASES[0], CASES[3], CASES[5], CASES[13]]
    )
