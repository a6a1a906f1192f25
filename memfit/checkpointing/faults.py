"""Deterministic fault injection for crash tests: MEMFIT_FAULT_AT="<phase>:<n>[:<rank>[:<attempt>]]"
makes the process SIGKILL itself the n-th time it reaches <phase> (on that rank only, if given and
not "*"; in that torchrun restart attempt only, if given, so a restarted job runs on). The
phases are named where they are reached (checkpoint saves, snapshot copies). Unset, the check
costs one dictionary lookup."""

import os
import signal

_ENV = "MEMFIT_FAULT_AT"
_counts: dict[str, int] = {}


def fault_point(phase: str, rank: int = 0) -> None:
    spec = os.environ.get(_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != phase or (len(parts) > 2 and parts[2] != "*" and int(parts[2]) != rank):
        return
    if len(parts) > 3 and parts[3] != os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"):
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    if _counts[phase] == int(parts[1]):
        os.kill(os.getpid(), signal.SIGKILL)
