"""The config as memfit.initialize uses it (one process, world size 1): "auto" resolved from what it
is passed, the resolved values and a description of the run logged on rank 0, settings the engine
cannot run yet refused, and `memfit config check` agreeing with it on every corpus file."""

import logging
import math
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

import memfit
from memfit.config import ConfigError
from memfit.launcher.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "tests", "configs")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MEMFIT_CONFIG", raising=False)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(attn=torch.nn.Linear(4, 4), mlp=torch.nn.Linear(4, 4)))


def test_initialize_logs_resolved_values_and_the_description_on_rank_0(caplog):
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "adamw", "params": {"lr": 3e-5}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": 10}},
    }
    with caplog.at_level(logging.INFO, logger="memfit"):
        engine = memfit.initialize(model(), config)
    messages = [record.getMessage() for record in caplog.records if record.name == "memfit"]
    assert messages[:4] == [
        "config: gradient_clipping = 1.0 (auto: 1.0, the Hugging Face Trainer's max_grad_norm)",
        "config: scheduler.params.warmup_max_lr = 3e-05 (auto: the optimizer's lr)",
        "config: train_batch_size = 2 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
        "world size 1)",
        "config: gradient_accumulation_steps = 1 (derived: 1 with train_micro_batch_size_per_gpu alone)",
    ]
    assert messages[4].startswith("memfit config:\n  batch: global 2 = micro batch 2 x accumulation 1 x 1 rank\n")
    assert "  optimizer: AdamW lr=3e-05 betas=[0.9, 0.999] eps=1e-08 weight_decay=0.01\n" in messages[4]
    assert engine.config.train_batch_size == 2 and engine.gradient_accumulation_steps == 1
    assert engine.lr_scheduler.max_lrs == [3e-5]


def test_auto_lr_follows_the_passed_optimizer_class():
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"params": {"lr": "auto", "momentum": 0.9}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": 4}},
    }
    engine = memfit.initialize(model(), config, optimizer=torch.optim.SGD)
    assert isinstance(engine.optimizer, torch.optim.SGD)
    assert engine.optimizer.defaults["lr"] == 1e-3 and engine.lr_scheduler.max_lrs == [1e-3]


def test_warmup_without_max_lr_reaches_a_factorys_lr():
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}},
    }
    engine = memfit.initialize(model(), config, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-5))
    assert engine.lr_scheduler.max_lrs == [3e-5]


@pytest.mark.parametrize(
    "overrides,text",
    [
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": math.nan}}},
            "config: scheduler.params.warmup_max_lr: expected a finite number, got NaN",
        ),
        ({"seed": 2**64}, "config: seed: expected an integer from 0 to 9223372036854775807, got 18446744073709551616"),
        (
            {"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}},
            "config: optimizer.params.betas: expected a list of 2 numbers, got [0.9]",
        ),
        (
            {"train_batch_size": 4},
            "config: train_batch_size: 4 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 1 x "
            "world size 1 = 2",
        ),
    ],
)
def test_initialize_refuses_with_one_clear_error(overrides, text):
    with pytest.raises(ConfigError) as info:
        memfit.initialize(model(), {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, **overrides})
    assert str(info.value) == text


def config_check(path, capsys) -> tuple[int, list[str]]:
    code = cli_main(["config", "check", path, "--world-size", "1"])
    captured = capsys.readouterr()
    problems = [line.split(": ", 1)[1] for line in captured.err.splitlines()] if code else []
    return code, problems


@pytest.mark.filterwarnings("ignore::UserWarning")  # the same warnings config check prints
@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".json")))
def test_config_check_agrees_with_initialize(name, capsys):
    path = os.path.join(CONFIGS, name)
    code, problems = config_check(path, capsys)
    try:
        memfit.initialize(model(), path)
    except ConfigError as error:
        assert (code, problems) == (2, error.problems)
    else:
        assert (code, problems) == (0, [])


@pytest.mark.slow
def test_the_example_shows_the_description(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "train_gpt.py"),
            "--config",
            os.path.join(ROOT, "examples", "configs", "zero0.json"),
            "--max-steps",
            "1",
            "--eval-every",
            "1",
            "--eval-batches",
            "1",
            "--metrics",
            str(tmp_path / "metrics.jsonl"),
            "--model-out",
            str(tmp_path / "model.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "memfit: memfit config:\n  batch: global 16 = micro batch 8 x accumulation 2 x 1 rank\n" in result.stderr
    assert "\r" not in result.stdout + result.stderr  # no progress-bar frames when the output is not a terminal
