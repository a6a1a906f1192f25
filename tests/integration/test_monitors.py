"""Monitors from the engine, for a script that writes no metrics itself: a 2-rank `memfit run`
job with tensorboard, wandb (offline), csv_monitor and memfit's JSONL monitor enabled writes the
same per-step values to each, read back through TensorBoard's event reader, W&B's offline run
file, the CSV files and the JSON lines. A resumed run appends to the files of the first."""

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import memfit
from tests.integration.wandb_reader import history

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_script.py")
STEPS, SAMPLES_PER_STEP = 4, 4  # micro batch 2 x 2 ranks


def monitors_config(directory) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 1.0,  # a global norm is computed only when something needs it
        "steps_per_print": 2,
        "tensorboard": {"enabled": True, "output_path": str(directory / "tb"), "job_name": "job"},
        "wandb": {"enabled": True, "project": "memfit-test"},
        "csv_monitor": {"enabled": True, "output_path": str(directory / "csv"), "job_name": "job"},
        "memfit": {"jsonl_monitor": {"enabled": True, "path": str(directory / "metrics.jsonl")}},
    }


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as file:
        return list(csv.reader(file))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    directory = tmp_path_factory.mktemp("monitors")
    config = directory / "config.json"
    config.write_text(json.dumps(monitors_config(directory)))
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "2", "--config", str(config),
         SCRIPT, str(STEPS)],
        capture_output=True, text=True, timeout=300, cwd=directory, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return directory, records


def test_jsonl_has_one_line_per_step_with_every_metric(job):
    _, records = job
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["samples"] for r in records] == [4, 8, 12, 16]
    for record in records:
        assert {
            "train_loss",
            "lr",
            "tokens_per_s",
            "samples_per_s",
            "step_time_s",
            "grad_norm",
            "peak_rss_bytes",
        } <= set(record)


def test_csv_files_are_laid_out_as_deepspeed_writes_them(job):
    directory, records = job
    rows = read_csv(directory / "csv" / "job" / "Train_Samples_train_loss.csv")
    assert rows[0] == ["step", "train_loss"]
    assert [(int(step), float(value)) for step, value in rows[1:]] == [(r["samples"], r["train_loss"]) for r in records]
    assert read_csv(directory / "csv" / "job" / "Train_Samples_lr.csv")[0] == ["step", "lr"]
    assert len(read_csv(directory / "csv" / "job" / "memfit_tokens_per_s.csv")) == STEPS + 1


def test_tensorboard_events_read_back(job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directory, records = job
    events = EventAccumulator(str(directory / "tb" / "job"))
    events.Reload()
    assert {"Train/Samples/train_loss", "Train/Samples/lr", "memfit/grad_norm"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("Train/Samples/train_loss")
    assert [e.step for e in losses] == [r["samples"] for r in records]
    assert [e.value for e in losses] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)


def test_wandb_offline_run_holds_the_history(job):
    directory, records = job
    (run_file,) = glob.glob(str(directory / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = [row for row in history(run_file) if "Train/Samples/train_loss" in row]
    assert [row["_step"] for row in rows] == [r["samples"] for r in records]
    assert [row["Train/Samples/train_loss"] for row in rows] == pytest.approx([r["train_loss"] for r in records])


def train(engine, num_steps):
    for _ in range(num_steps):
        tokens = torch.randint(0, 16, (2, 4))
        engine.backward(torch.nn.functional.cross_entropy(engine(tokens), tokens[:, 0]))
        engine.step()
        engine.log_metrics({"val_loss": 1.5})


def plain_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Flatten(), torch.nn.Linear(32, 16))


def test_a_resumed_run_appends_and_a_fresh_one_starts_over(tmp_path):
    config = monitors_config(tmp_path)
    config.update(tensorboard={"enabled": False}, wandb={"enabled": False})
    first = memfit.initialize(plain_model(), config)
    train(first, 2)
    first.save_checkpoint(tmp_path / "ckpt")
    first.monitor.close()
    resumed = memfit.initialize(plain_model(), config)
    resumed.load_checkpoint(tmp_path / "ckpt")
    train(resumed, 2)
    resumed.monitor.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss"]) for r in records] == [(1, 1.5), (2, 1.5), (3, 1.5), (4, 1.5)]
    rows = read_csv(tmp_path / "csv" / "job" / "Train_Samples_train_loss.csv")
    assert [row[0] for row in rows] == ["step", "2", "4", "6", "8"]  # one header, every step
    assert len(read_csv(tmp_path / "csv" / "job" / "Train_Samples_val_loss.csv")) == 5
    fresh = memfit.initialize(plain_model(), config)
    train(fresh, 1)
    fresh.monitor.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb imports
    config = {"train_micro_batch_size_per_gpu": 1, "wandb": {"enabled": True}}
    with pytest.raises(ImportError, match=r"^wandb.enabled: true needs the wandb package .*pip install wandb"):
        memfit.initialize(plain_model(), config)


CRASHING_SCRIPT = """
import sys, torch, memfit
from tests.integration.test_monitors import plain_model
log_steps, crash_before_log = sys.argv[1] == "logs", sys.argv[2] == "before"
config = {"train_micro_batch_size_per_gpu": 2, "memfit": {"jsonl_monitor": {"enabled": True, "path": sys.argv[3]}}}
engine = memfit.initialize(plain_model(), config)
for step in range(3):
    tokens = torch.randint(0, 16, (2, 4))
    engine.backward(torch.nn.functional.cross_entropy(engine(tokens), tokens[:, 0]))
    engine.step()
    if step == 2 and crash_before_log:
        raise RuntimeError("a peer died in the script's all-reduce of the loss")
    if log_steps:
        engine.log_metrics({"loss": float(step)})
raise RuntimeError("a peer died in the final save")
"""


@pytest.mark.parametrize(
    "logs, crash, last_line",
    [
        ("logs", "after", {"step": 3, "loss": 2.0}),  # the step is complete: written
        ("logs", "before", {"step": 2, "loss": 1.0}),  # the loss never came: step 3 dropped
        ("silent", "after", {"step": 3}),  # a script that adds nothing: every step complete
    ],
)
def test_a_crash_keeps_each_complete_step_and_drops_the_unfinished_one(tmp_path, logs, crash, last_line):
    """A process ending on an uncaught exception: the last step's line is written when the script
    added its values to it (its snapshot may be what a restart resumes from, so it is not redone),
    dropped when the script was still working on it (a restart redoes the step and writes it)."""
    metrics = tmp_path / "metrics.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_SCRIPT, logs, crash, str(metrics)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert result.returncode == 1 and "RuntimeError: a peer died" in result.stderr, result.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, last_line["step"] + 1))
    assert {key: records[-1].get(key) for key in last_line} == last_line
