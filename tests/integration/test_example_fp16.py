"""fp16 with dynamic loss scaling trains the example as well as bf16: 2 ranks under torchrun,
ZeRO stage 2, the same data and steps; the fp16 run's loss stays within 0.05 nats of the bf16
run's over the last steps, and its loss scale is recorded (a short run in the fast tier, the
comparison in the slow one)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, LAST = 40, 10


def train(tmp_path, config: str, steps: int = STEPS) -> list[dict]:
    metrics = tmp_path / f"{config}.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(ROOT, "examples", "train_gpt.py"), "--config", os.path.join(ROOT, "examples", "configs", config),
               "--max-steps", str(steps), "--eval-every", str(steps), "--metrics", str(metrics)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.mark.slow
def test_fp16_reaches_the_bf16_loss(tmp_path):
    bf16, fp16 = train(tmp_path, "zero2_bf16.json"), train(tmp_path, "zero2_fp16.json")
    assert len(bf16) == len(fp16) == STEPS
    mean_bf16 = sum(r["loss"] for r in bf16[-LAST:]) / LAST
    mean_fp16 = sum(r["loss"] for r in fp16[-LAST:]) / LAST
    assert abs(mean_fp16 - mean_bf16) <= 0.05, (mean_fp16, mean_bf16)
    assert mean_fp16 < fp16[0]["loss"] - 1.0  # it trained
    assert all("loss_scale" in r for r in fp16) and "loss_scale" not in bf16[0]
    assert fp16[-1]["skipped_steps"] <= 3  # a few overflows while the scale settles, as in DeepSpeed
    assert abs(fp16[-1]["val_loss"] - bf16[-1]["val_loss"]) <= 0.05


def test_fp16_example_records_its_loss_scale(tmp_path):
    """A short fp16 run: every step reports its loss scale, from 2^initial_scale_power (16) down
    by halvings only, and the losses are finite."""
    fp16 = train(tmp_path, "zero2_fp16.json", steps=4)
    assert [r["step"] for r in fp16] == [1, 2, 3, 4]
    scales = [r["loss_scale"] for r in fp16]
    assert scales[0] <= 2.0**16 and all(scale in {2.0**k for k in range(17)} for scale in scales)
    assert all(later <= earlier for earlier, later in zip(scales, scales[1:]))
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in fp16)  # finite (NaN != NaN)
