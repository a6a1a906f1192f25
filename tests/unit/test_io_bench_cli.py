"""`memfit bench io`: creates the directory it is pointed at, and prints every size and rate in the
one unit convention of memfit.units (binary: KiB, MiB, GiB, GiB/s)."""

import re
import warnings

import pytest

from memfit.io import available_backends
from memfit.io.engine import _registrations
from memfit.launcher.cli import build_parser, main
from memfit.units import GiB, format_bytes, parse_size

DECIMAL_UNITS = re.compile(r"\b[kKMGT]B\b|\b[kKMGT]B/s\b")


def test_path_is_created_and_output_uses_binary_units(tmp_path, capsys):
    target = tmp_path / "not" / "there" / "yet"
    assert (
        main(
            ["bench", "io", "--path", str(target), "--size", "1M", "--block-size", "64K", "--backend", "python"]
            + ["--reps", "1", "--no-fio"]
        )
        == 0
    )
    assert target.is_dir()
    assert list(target.iterdir()) == []  # the test file is removed, the directory kept
    out, err = capsys.readouterr()
    assert DECIMAL_UNITS.search(out + err) is None, out + err
    assert "1.0 MiB" in out and "block 64.0 KiB" in out
    assert "fio: skipped (--no-fio)" in out
    header, row, loads = out.splitlines()[-3:]
    assert header.split()[:6] == ["engine", "write", "GiB/s", "read", "GiB/s", "O_DIRECT"]
    assert row.split()[0] == "python"
    assert loads.startswith("load average (1, 5, 15 min): before ")


def test_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(SystemExit, match="--path .*file: not a directory"):
        main(["bench", "io", "--path", str(tmp_path / "file"), "--size", "1M"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backend", "nvme"], "memfit bench io: backend: unknown backend 'nvme'"),
        (["--queue-depth", "0"], "memfit bench io: queue_depth: must be an integer from 1 to 4096"),
        (["--block-size", "3K"], "memfit bench io: block_size: must be a multiple of 4096"),
        (["--size", "lots"], "memfit bench io: --size: not a size: 'lots'"),
        (["--size", "5000"], "memfit bench io: --size must be a positive multiple of 4096"),
        (["--reps", "0"], "memfit bench io: --reps must be a positive integer, got 0"),
        (["--fio-engine", "psync"], "memfit bench io: --fio-engine: expected one or more of io_uring, libaio"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit) as info:
        main(["bench", "io", "--path", str(tmp_path), "--size", "1M", *flags])
    assert str(info.value).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_help_says_the_directory_is_created(capsys):
    with pytest.raises(SystemExit):
        build_parser(["bench", "io", "--help"]).parse_args(["bench", "io", "--help"])
    assert "created if missing" in " ".join(capsys.readouterr().out.split())


def test_units_are_binary_everywhere():
    assert parse_size("1M") == parse_size("1MiB") == parse_size("1MB") == 1 << 20
    assert format_bytes(1 << 20) == "1.0 MiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(3 << 40) == "3.0 TiB"
    assert GiB == 1 << 30


def test_register_sends_fixed_transfers_and_checks_every_byte(tmp_path, capsys):
    if "io_uring" not in available_backends():
        pytest.skip("io_uring backend not available here")
    flags = ["--size", "2M", "--block-size", "64K", "--backend", "io_uring", "--reps", "2", "--no-fio", "--register"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        assert main(["bench", "io", "--path", str(tmp_path), *flags]) == 0
    out = capsys.readouterr().out
    if caught:  # a kernel before 5.19 or a low RLIMIT_MEMLOCK
        assert "buffers not registered (refused, see the warning)" in out
    else:
        assert "io_uring: buffers registered with the ring: fixed reads and writes" in out
    assert not _registrations  # released at the end of every repetition
