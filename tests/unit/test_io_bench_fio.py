"""`memfit bench io` beside fio: the job it gives fio, the reading of fio's JSON report, what it
says when fio is absent or skipped, and one end-to-end run where fio is installed."""

import json
import shutil

import pytest

from memfit.io import available_backends
from memfit.launcher import bench_fio
from memfit.launcher.bench_fio import check_fio_engines, fio_command, parse_fio_json
from memfit.launcher.cli import main


def fio_report(op: str = "read", io_bytes: int = 1 << 30, runtime_ms: int = 500, error: int = 0) -> str:
    """fio 3.x's --output-format=json, cut to the fields memfit reads, behind a warning line as fio
    prints them."""
    other = "write" if op == "read" else "read"
    job = {
        "jobname": "memfit-bench",
        "error": error,
        op: {"io_bytes": io_bytes, "bw_bytes": io_bytes * 1000 // max(runtime_ms, 1), "runtime": runtime_ms},
        other: {"io_bytes": 0, "bw_bytes": 0, "runtime": 0},
    }
    return "fio: this platform does not support process shared mutexes\n" + json.dumps(
        {"fio version": "fio-3.33", "jobs": [job]}, indent=2
    )


@pytest.mark.parametrize("op", ["read", "write"])
def test_parse_takes_bytes_and_runtime_of_the_op(op):
    assert parse_fio_json(fio_report(op, io_bytes=16 << 20, runtime_ms=8), op) == (16 << 20, 0.008)


@pytest.mark.parametrize(
    "text, message",
    [
        ("fio: engine io_uring not loadable", "fio printed no JSON report"),
        ('{"jobs": []}', "fio's JSON report is malformed"),
        ('{"jobs": [', "fio's JSON report is malformed"),
        (fio_report(error=5), "fio's job failed with error 5"),
        (fio_report("write"), "fio's JSON report shows no read: 0 bytes in 0.0 ms"),
        ('{"jobs": [{"error": 0}]}', "fio's JSON report has no read figures"),
    ],
)
def test_parse_refuses_reports_without_figures(text, message):
    with pytest.raises(ValueError, match=message):
        parse_fio_json(text, "read")


def test_the_fio_job_is_memfits_transfer():
    command = fio_command(
        "/d/f", op="read", engine="io_uring", size_bytes=1 << 30, block_size=1 << 20, queue_depth=32, direct=True
    )
    for option in ["--filename=/d/f", "--rw=read", "--size=1073741824", "--bs=1048576", "--ioengine=io_uring"]:
        assert option in command
    for option in ["--iodepth=32", "--direct=1", "--numjobs=1", "--output-format=json"]:
        assert option in command


def test_fio_engines_are_checked():
    assert check_fio_engines("io_uring, libaio") == ["io_uring", "libaio"]
    with pytest.raises(ValueError, match="--fio-engine: expected one or more of io_uring, libaio, got ''"):
        check_fio_engines("")


def test_without_fio_on_path_memfit_runs_alone_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_fio.shutil, "which", lambda name: None)
    assert main(["bench", "io", "--path", str(tmp_path), "--size", "64K", "--backend", "python", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "fio: not found on PATH (apt-get install fio): memfit's figures only" in out
    assert "memfit / fio" not in out


def test_a_size_fio_cannot_cut_into_blocks_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_fio, "fio_version", lambda: "fio-3.33")
    monkeypatch.setattr("memfit.launcher.bench_io.fio_version", lambda: "fio-3.33")
    with pytest.raises(SystemExit) as info:
        main(["bench", "io", "--path", str(tmp_path), "--size", "68K", "--block-size", "64K"])
    assert str(info.value).startswith("memfit bench io: --size must be a multiple of --block-size for fio")
    assert "--no-fio" in str(info.value)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (apt-get install fio)")
def test_bench_io_runs_fio_beside_memfit(tmp_path, capsys):
    engine = available_backends()[0]
    assert main(["bench", "io", "--path", str(tmp_path), "--size", "16M", "--backend", engine, "--reps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = next(line.split() for line in lines if line.startswith(f"{engine} ") and " / " not in line)
    theirs = next(line.split() for line in lines if line.startswith("fio io_uring "))
    write_gibs, read_gibs = float(ours[1]), float(ours[2])
    fio_write_gibs, fio_read_gibs = float(theirs[2]), float(theirs[3])
    assert min(write_gibs, read_gibs, fio_write_gibs, fio_read_gibs) > 0
    ratio_line = next(line for line in lines if line.startswith(f"{engine} / fio io_uring"))
    write_ratio, read_ratio = (float(field.rstrip("x")) for field in ratio_line.split()[-2:])
    assert write_ratio == pytest.approx(write_gibs / fio_write_gibs, rel=0.02)
    assert read_ratio == pytest.approx(read_gibs / fio_read_gibs, rel=0.02)
    assert list(tmp_path.iterdir()) == []
