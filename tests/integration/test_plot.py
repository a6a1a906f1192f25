"""`memfit plot`: runs written by the engine's monitors (a JSONL file and a csv_monitor directory)
overlaid in one PNG; a path that is not a run is one line naming it."""

import os
import subprocess
import sys

import torch

import memfit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plot(*args, cwd):
    return subprocess.run([sys.executable, "-m", "memfit.launcher.cli", "plot", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip


def write_run(directory):
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "csv_monitor": {"enabled": True, "output_path": str(directory), "job_name": "csv_run"},
        "memfit": {"jsonl_monitor": {"enabled": True, "path": str(directory / "run.jsonl")}},
    }
    torch.manual_seed(0)
    engine = memfit.initialize(
        torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Flatten(), torch.nn.Linear(32, 16)), config
    )
    for step in range(1, 7):
        tokens = torch.randint(0, 16, (2, 4))
        engine.backward(torch.nn.functional.cross_entropy(engine(tokens), tokens[:, 0]))
        engine.step()
        if step % 3 == 0:
            engine.log_metrics({"val_loss": 2.0})
    engine.monitor.close()


def test_plot_overlays_a_jsonl_run_and_a_csv_run(tmp_path):
    import matplotlib.image

    write_run(tmp_path)
    result = plot(tmp_path / "run.jsonl", tmp_path / "csv_run", "-o", tmp_path / "out" / "runs.png",
                  "--label", "jsonl", "--label", "csv", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("2 run(s) (jsonl: 6 loss points, csv: 6 loss points)")
    assert matplotlib.image.imread(tmp_path / "out" / "runs.png").shape == (800, 1200, 4)


def test_a_path_that_is_not_a_run_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    for path, message in (
        (tmp_path / "missing.jsonl", "no such file or directory"),
        (tmp_path / "bad.jsonl", "bad.jsonl:2: not JSON"),
        (tmp_path, "a directory without csv_monitor files"),
    ):
        result = plot(path, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("memfit plot: ") and message in result.stderr


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    from memfit.launcher.cli import main

    (tmp_path / "run.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without matplotlib imports
    assert main(["plot", str(tmp_path / "run.jsonl"), "-o", str(tmp_path / "out.png")]) == 2
    assert (
        capsys.readouterr().err
        == 'memfit plot: matplotlib is not installed: pip install matplotlib (or "memfit[plot]")\n'
    )
