"""`memfit plot` (its entry point, in this process): runs written by the engine's monitors (a JSONL file and a csv_monitor directory)
overlaid in one PNG; a path that is not a run is one line naming it."""

import contextlib
import io
import sys

import torch

import memfit
from memfit.launcher.cli import main


def plot(*args):
    """`memfit plot ARGS` through the command's entry point, in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["plot", *map(str, args)])
    return status, out.getvalue(), err.getvalue()


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
    status, stdout, stderr = plot(tmp_path / "run.jsonl", tmp_path / "csv_run", "-o", tmp_path / "out" / "runs.png",
                                  "--label", "jsonl", "--label", "csv")  # fmt: skip
    assert status == 0, stderr
    assert stdout.strip().endswith("2 run(s) (jsonl: 6 loss points, csv: 6 loss points)")
    assert matplotlib.image.imread(tmp_path / "out" / "runs.png").shape == (800, 1200, 4)


def test_a_path_that_is_not_a_run_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    for path, message in (
        (tmp_path / "missing.jsonl", "no such file or directory"),
        (tmp_path / "bad.jsonl", "bad.jsonl:2: not JSON"),
        (tmp_path, "a directory without csv_monitor files"),
    ):
        status, _, stderr = plot(path, "-o", tmp_path / "out.png")
        assert status == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith("memfit plot: ") and message in stderr


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "run.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without matplotlib imports
    assert main(["plot", str(tmp_path / "run.jsonl"), "-o", str(tmp_path / "out.png")]) == 2
    assert (
        capsys.readouterr().err
        == 'memfit plot: matplotlib is not installed: pip install matplotlib (or "memfit[plot]")\n'
    )
