"""`memfit config check` as a real subprocess: a bad file exits 2 with one stderr line per problem
and nothing on stdout; a good one prints "ok", with the resolved "auto" values on stderr."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(*args):
    return subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "config", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


@pytest.mark.parametrize(
    "content,world_size,problems",
    [
        (
            b'{"train_micro_batch_size_per_gpu": "8", "bf16": {"enabled": "on"}, "gradient_clipping": NaN}',
            None,
            [
                'train_micro_batch_size_per_gpu: expected an integer, got "8"',
                "gradient_clipping: expected a finite number, got NaN",
                'bf16.enabled: expected true or false, got "on"',
            ],
        ),
        (
            b'{"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}',
            None,
            [
                "train_batch_size: 30 is not a multiple of train_micro_batch_size_per_gpu 4 x "
                "gradient_accumulation_steps 2 = 8, at any world size"
            ],
        ),
        (b'{"seed": "\xff"}', None, ["line 1: not UTF-8 text (byte 0xff at offset 10)"]),
        (
            b'{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}',
            "2",
            [
                'zero_optimization.offload_optimizer.device: "cpu" needs ZeRO stage 1 or 2 on more than one rank '
                "(at stage 0 every rank would keep all the state)"
            ],
        ),
        (
            b'{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": 5, "params": {"betas": [0.9]}}}',
            "2",
            ["optimizer.type: expected a string, got 5"],
        ),
    ],
)
def test_bad_file_exits_2_with_one_line_per_problem(tmp_path, content, world_size, problems):
    path = tmp_path / "ds_config.json"
    path.write_bytes(content)
    result = check(str(path), *(["--world-size", world_size] if world_size else []))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{path}: {problem}" for problem in problems]


@pytest.mark.parametrize("world_size", ["0", "-1", "two"])
def test_world_size_must_be_positive(tmp_path, world_size):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    result = check(str(path), "--world-size", world_size)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].endswith(
        f"error: argument --world-size: expected a positive integer, got '{world_size}'"
    )


def test_good_file_prints_ok_and_what_auto_became(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
                "gradient_clipping": "auto",
                "wall_clock_breakdown": True,
            }
        )
    )
    result = check(str(path), "--world-size", "4")
    assert result.returncode == 0 and result.stdout == "ok\n"
    lines = result.stderr.splitlines()
    assert lines[:3] == [
        f"warning: {path}: wall_clock_breakdown: true is ignored by memfit: memfit does not time step phases",
        "resolved: gradient_clipping = 1.0 (auto: 1.0, the Hugging Face Trainer's max_grad_norm)",
        "resolved: train_batch_size = 32 (derived: train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
        "world size 4)",
    ]
    assert lines[3:5] == ["memfit config:", "  batch: global 32 = micro batch 4 x accumulation 2 x 4 ranks"]


def test_memfit_run_refuses_what_initialize_refuses_before_starting_workers(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}, "seed": "1"}))
    result = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "2", "--config", str(path), "x.py"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f'memfit run: {path}: seed: expected an integer, got "1"']
    path.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    )
    result = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "2", "--config", str(path), "x.py"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f'memfit run: {path}: zero_optimization.offload_optimizer.device: "cpu" needs ZeRO stage 1 or 2 on more than '
        "one rank (at stage 0 every rank would keep all the state)"
    ]
