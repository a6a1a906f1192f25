"""`memfit run` names the rank that failed first. torch orders failures by whole seconds, so a rank
that timed out and the peer that lost its connection a moment later tie; the precise time a memfit
worker writes into its error file decides."""

import json

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from memfit.launcher.run import describe_failures
from memfit.runtime.lifecycle import record_error


def recorded_failure(tmp_path, monkeypatch, rank: int, message: str, second: int) -> ProcessFailure:
    """A failure read back from the error file the worker wrote, its whole-second stamp set to second."""
    path = tmp_path / f"error.{rank}.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    record_error(message, "Traceback ...\n")
    data = json.loads(path.read_text())
    data["message"]["extraInfo"]["timestamp"] = str(second)
    path.write_text(json.dumps(data))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=1, error_file=str(path))


def test_a_tie_in_whole_seconds_goes_to_the_rank_that_recorded_first(tmp_path, monkeypatch):
    timed_out = recorded_failure(tmp_path, monkeypatch, 1, "collective timed out; rank 0 stopped answering", 100)
    lost_peer = recorded_failure(tmp_path, monkeypatch, 0, "RuntimeError: Connection closed by peer", 100)
    failed = ChildFailedError("train.py", {0: lost_peer, 1: timed_out})
    assert failed.get_first_failure()[0] == 0  # torch alone picks by dict order
    lines = describe_failures(failed)
    assert lines[0] == "rank 1 failed first (exit code 1, pid 1001): collective timed out; rank 0 stopped answering"
    assert lines[1:] == ["rank 0 also stopped (exit code 1, pid 1000)"]


def test_whole_seconds_still_decide_first(tmp_path, monkeypatch):
    earlier_second = recorded_failure(tmp_path, monkeypatch, 1, "ValueError: bad batch", 99)
    later_second = recorded_failure(tmp_path, monkeypatch, 0, "RuntimeError: peer gone", 100)
    later_second.message["extraInfo"]["memfit_time"] = 0.0  # a smaller precise time does not reorder seconds
    lines = describe_failures(ChildFailedError("train.py", {0: later_second, 1: earlier_second}))
    assert lines[0].startswith("rank 1 failed first")


def test_a_rank_without_an_error_file_comes_after_a_recorded_error_in_the_same_second(tmp_path, monkeypatch):
    recorded = recorded_failure(tmp_path, monkeypatch, 1, "MemoryError: host arena", 100)
    killed = ProcessFailure(local_rank=0, pid=1000, exitcode=-9, error_file=str(tmp_path / "none.json"))
    killed.timestamp = 100
    lines = describe_failures(ChildFailedError("train.py", {0: killed, 1: recorded}))
    assert lines[0].startswith("rank 1 failed first (exit code 1, pid 1001): MemoryError: host arena")
    assert lines[1] == "rank 0 also stopped (killed by SIGKILL, pid 1000)"
