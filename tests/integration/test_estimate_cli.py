"""`memfit estimate` as a real subprocess: a table per rank for a parameter count or a real model
built on the meta device (nothing allocated), the figures the engine's estimate gives, and one
clear line with exit 2 for every bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from memfit.config import resolve_config
from memfit.runtime.estimate import estimate
from memfit.runtime.model_shapes import decoder_shapes, parse_count
from memfit.units import format_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_MODULE = """
import torch

def build():
    # 10 billion parameters: allocated, this would need 40 GB
    return torch.nn.Sequential(torch.nn.Linear(100_000, 50_000), torch.nn.Linear(50_000, 100_000))

def not_a_model():
    return 3
"""


def estimate_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "estimate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["rank"])
    out = []
    for line in lines[header + 1 :]:
        if not line.strip() or not line.split()[0].isdigit():
            break
        cells = line.split()
        out.append([" ".join(cells[i : i + 2]) for i in range(1, len(cells), 2)])
    return out


def test_params_with_a_deepspeed_config_gives_a_row_per_rank(tmp_path):
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    result = estimate_cli("--params", "7e9", "--config", str(path), "--world-size", "8")
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert len(table) == 8
    shapes, _ = decoder_shapes(parse_count("7e9"))
    cfg = resolve_config({**config, "train_micro_batch_size_per_gpu": 1}, 8).config
    for row, expected in zip(table, estimate(shapes, cfg, 8)):
        params, grads, staging, masters, state, device, host = row
        assert params == format_bytes(expected.bytes["params"]) and masters == format_bytes(
            expected.bytes["master_weights"]
        )
        assert state == format_bytes(expected.bytes["optimizer_state"]) and host == format_bytes(expected.tiers["host"])
        assert staging == format_bytes(expected.grad_staging)
    total = sum(torch.Size(shape).numel() for _, shape, _ in shapes)
    states = [e.bytes["optimizer_state"] for e in estimate(shapes, cfg, 8)]
    assert abs(sum(states) - 8 * total) <= 0.001 * 8 * total  # Adam's two fp32 moments, sharded
    assert "DeepSpeed ZeRO-2 estimate for the same model" in result.stdout
    assert "offload_optimizer cpu" in result.stdout


def test_a_real_model_is_counted_on_the_meta_device(tmp_path):
    (tmp_path / "bigmodel.py").write_text(MODEL_MODULE)
    result = estimate_cli("--model", "bigmodel:build", "--world-size", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = 100_000 * 50_000 + 50_000 + 50_000 * 100_000 + 100_000
    assert f"{expected:,} parameters in 4 tensors" in result.stdout
    assert len(rows(result.stdout)) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--params", "seven"], "--params: expected a number like 7e9 or 7B, got 'seven'"),
        (["--params", "1e3"], "--params: expected at least 100,000 parameters, got '1e3'"),
        (["--params", "nan"], "--params: expected at least 100,000 parameters, got 'nan'"),
        (["--model", "nosuchmodule:build"], "--model: cannot import 'nosuchmodule'"),
        (["--model", "bigmodel"], "--model: expected module:factory"),
        (["--model", "bigmodel:missing"], "--model: 'bigmodel' has no callable 'missing'"),
        (["--model", "bigmodel:not_a_model"], "--model: bigmodel:not_a_model returned int, not a torch.nn.Module"),
        (["--params", "1e9", "--config", "missing.json"], "missing.json"),
        (["--params", "1e9", "--config", "bad.json"], "bad.json: zero_optimization.stage"),
        (["--params", "1e9", "--config", "offload0.json", "--world-size", "2"], "offload0.json: zero_optimization"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "bigmodel.py").write_text(MODEL_MODULE)
    (tmp_path / "bad.json").write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    (tmp_path / "offload0.json").write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    result = estimate_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args", [[], ["--params", "1e9", "--model", "m:f"], ["--params", "1e9", "--world-size", "0"]])
def test_argument_misuse_is_refused_by_the_parser(args):
    result = estimate_cli(*args)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr
