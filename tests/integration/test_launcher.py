"""`memfit run` and plain `torchrun` start the same 2-rank job of the example, in subprocesses,
and produce the same training curve; the loss falls on the default corpus. `memfit run` refuses a
bad config, wherever --config is, in one line before any worker starts; `memfit --help` and
`memfit config schema` do not import torch."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt.py")
CONFIG = os.path.join(ROOT, "examples", "configs", "zero2.json")
STEPS = 8


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def launch(command, tmp_path, name):
    metrics = tmp_path / f"{name}.jsonl"
    result = subprocess.run(
        command + ["--max-steps", str(STEPS), "--eval-every", "4", "--metrics", str(metrics)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(metrics), result


@pytest.mark.slow
def test_memfit_run_and_torchrun_train_identically(tmp_path):
    memfit_cmd = [
        sys.executable,
        "-m",
        "memfit.launcher.cli",
        "run",
        "--nproc-per-node",
        "2",
        "--config",
        CONFIG,
        EXAMPLE,
    ]
    torchrun_cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        EXAMPLE,
        "--config",
        CONFIG,
    ]
    by_memfit, result = launch(memfit_cmd, tmp_path, "memfit")
    by_torchrun, _ = launch(torchrun_cmd, tmp_path, "torchrun")
    assert "2 rank(s), ZeRO stage 2" in result.stdout
    assert [r["step"] for r in by_memfit] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in by_memfit] == [r["loss"] for r in by_torchrun]
    assert by_memfit[-1]["loss"] < by_memfit[0]["loss"] - 0.5
    assert "val_loss" in by_memfit[3] and len(by_memfit[-1]["rss_bytes_per_rank"]) == 2
    assert all(r["tokens_per_s"] > 0 for r in by_memfit)


def test_memfit_run_rejects_bad_config_before_starting_workers(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stgae": 2}}')
    result = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "2", "--config", str(bad), EXAMPLE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{bad}: zero_optimization.stgae: unknown key (did you mean 'stage'?)" in result.stderr


def test_config_check_command(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "config", "check", CONFIG],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "ok"
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}')
    result = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "config", "check", str(bad), "--world-size", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        "train_batch_size: 10 is not a multiple of train_micro_batch_size_per_gpu 4 x world size 2 = 8" in result.stderr
    )
    schema = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "config", "schema"], capture_output=True, text=True, timeout=120
    )
    assert json.loads(schema.stdout)["properties"]["gradient_clipping"]["description"]


@pytest.mark.slow  # resume is checked bit for bit in tests/distributed/test_checkpoint.py
def test_resume_from_checkpoint_continues_the_curve(tmp_path):
    """Single process: 6 steps straight equal 3 steps, a restart, and 3 more."""
    base = [sys.executable, EXAMPLE, "--config", CONFIG, "--eval-every", "100", "--save-dir", str(tmp_path / "ckpt")]
    straight = tmp_path / "straight.jsonl"
    subprocess.run(
        base[:-2] + ["--max-steps", "6", "--metrics", str(straight)], check=True, capture_output=True, timeout=300
    )
    split = tmp_path / "split.jsonl"
    subprocess.run(base + ["--max-steps", "3", "--metrics", str(split)], check=True, capture_output=True, timeout=300)
    subprocess.run(
        base + ["--max-steps", "6", "--metrics", str(split), "--resume"], check=True, capture_output=True, timeout=300
    )
    assert [r["loss"] for r in read_metrics(split)] == [r["loss"] for r in read_metrics(straight)]


def memfit_cli(args, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.mark.parametrize("where", ["before the script", "after the script", "after the script, with ="])
def test_memfit_run_checks_the_config_wherever_it_is_given(tmp_path, where):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stgae": 2}}')
    launch = ["run", "--nproc-per-node", "2"]
    if where == "before the script":
        command = launch + ["--config", str(bad), EXAMPLE]
    elif where == "after the script":
        command = launch + [EXAMPLE, "--config", str(bad)]
    else:
        command = launch + [EXAMPLE, f"--config={bad}"]
    result = memfit_cli(command, tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"memfit run: {bad}: zero_optimization.stgae: unknown key (did you mean 'stage'?)"
    ]


@pytest.mark.parametrize(
    "launch, world_size",
    [
        (["--nproc-per-node", "2"], 2),
        (["--nnodes", "2", "--nproc-per-node", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"], 6),
    ],
)
def test_memfit_run_checks_the_batch_sizes_for_the_world_it_launches(tmp_path, launch, world_size):
    config = tmp_path / "batch.json"
    config.write_text('{"train_batch_size": 12, "train_micro_batch_size_per_gpu": 4}')  # fits 1 or 3 ranks
    result = memfit_cli(["run", *launch, EXAMPLE, "--config", str(config)], tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"memfit run: {config}: train_batch_size: 12 is not a multiple of train_micro_batch_size_per_gpu 4 x "
        f"world size {world_size} = {4 * world_size}"
    ]


LEAN_CLI = """
import sys
from memfit.launcher.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["--help"], ["config", "--help"], ["config", "schema"], ["bench", "--help"]])
def test_help_and_the_schema_do_not_import_torch(tmp_path, args):
    result = subprocess.run(
        [sys.executable, "-c", LEAN_CLI, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "torch imported: False"
