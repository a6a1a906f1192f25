"""A short run of the example model makes the loss fall with each optimizer and precision config,
the host offload tier included."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "config",
    ["zero2.json"]  # the README's main job; the other configs in the slow tier
    + [
        pytest.param(name, marks=pytest.mark.slow)
        for name in ["galore.json", "frugal.json", "zero2_bf16.json", "zero2_fp16.json", "cpu_offload.json"]
    ],
)
def test_loss_falls(tmp_path, config):
    metrics = tmp_path / "metrics.jsonl"
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "train_gpt.py"),
            "--config",
            os.path.join(ROOT, "examples", "configs", config),
            "--max-steps",
            "12",
            "--eval-every",
            "12",
            "--metrics",
            str(metrics),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=tmp_path,
    )
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(records) == 12
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert records[-1]["val_loss"] < records[0]["loss"]
