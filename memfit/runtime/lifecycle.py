"""Worker-side process lifetime: a worker does not outlive its launcher, and it ends the way the
launcher can report in one line.

A launcher killed with SIGKILL (the OOM killer, a scheduler) gets no chance to stop its workers,
and torchrun starts each worker in its own session, so nothing else stops them either: they would
train on as orphans. So each worker asks the kernel to SIGKILL it when its parent dies
(PR_SET_PDEATHSIG). That request covers only a parent still alive when it is made, so right after
it the worker checks that its launcher is still among its ancestors, and exits if not. The
launcher is the pid in MEMFIT_LAUNCHER_PID (set by `memfit run`) or, under plain torchrun, the
parent this process had when memfit was first imported: importing memfit is among the first
things a training script does, long before it builds its model and joins the process group.

Caveats: the kernel sends the signal when the parent *thread* that started the worker exits.
torchrun starts workers from its main thread; a launcher that starts workers from a short-lived
thread must set MEMFIT_EXIT_WITH_LAUNCHER=0. And the signal comes from the direct parent: a shell
script between the launcher and python (torchrun --no-python) must `exec` python.

On exit, an uncaught exception is written where torchrun's agent collects it
(TORCHELASTIC_ERROR_FILE), so the launcher's summary can quote it; a collective timeout is
explained by naming the ranks whose heartbeat stopped; and Ctrl-C (KeyboardInterrupt) ends the
worker without a traceback, since the launcher reports the interruption once for the whole job.
"""

import ctypes
import json
import os
import re
import signal
import sys
import time
import traceback
import warnings

LAUNCHER_PID_ENV = "MEMFIT_LAUNCHER_PID"
OPT_OUT_ENV = "MEMFIT_EXIT_WITH_LAUNCHER"
_PR_SET_PDEATHSIG = 1
PRECISE_TIME_KEY = "memfit_time"  # in the error file's extraInfo: when the error was recorded, to the microsecond
_TIMEOUT_PATTERN = re.compile(r"timed?[ -]?out", re.IGNORECASE)

_parent_at_import = os.getppid()
_hooks_installed = False


def started_by_launcher() -> bool:
    """True in a worker of torchrun or `memfit run` (both run torch's elastic agent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or LAUNCHER_PID_ENV in os.environ


def launcher_pid() -> int:
    value = os.environ.get(LAUNCHER_PID_ENV)
    if value is None:
        return _parent_at_import
    if not value.isdigit():
        raise ValueError(f"{LAUNCHER_PID_ENV}: expected the launcher's process id, got {value!r}")
    return int(value)


def exit_with_launcher() -> None:
    """In a launcher's worker: arm SIGKILL for when the launcher dies, and exit at once if it
    already has. Does nothing in a process no launcher started, off Linux, or when
    MEMFIT_EXIT_WITH_LAUNCHER=0."""
    if not started_by_launcher() or not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV) == "0":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        warnings.warn(
            f"memfit: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(ctypes.get_errno())}); this worker will not "
            "exit by itself if its launcher is killed",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    launcher = launcher_pid()
    if not _is_ancestor(launcher):
        rank = os.environ.get("RANK", "?")
        print(
            f"memfit: rank {rank}: its launcher (pid {launcher}) exited before the worker joined the job; exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def _is_ancestor(pid: int) -> bool:
    """Whether pid is this process's parent, grandparent, ... An orphan has been adopted by init or
    a subreaper, which is not the launcher, so the launcher drops out of the chain when it dies.
    Where /proc cannot be read, assumes it is (nothing can be decided)."""
    current = os.getppid()
    while current > 1:
        if current == pid:
            return True
        try:
            with open(f"/proc/{current}/stat") as f:
                current = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return True
    return current == pid


def install_exit_hooks(rank: int, explain_timeout=None) -> None:
    """Chains a sys.excepthook in front of the current one (install it after the process group,
    whose own hook prefixes each line with the rank). explain_timeout: a function returning a
    sentence about a collective timeout (which ranks stopped answering), or None."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    previous_hook = sys.excepthook

    def memfit_excepthook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            return  # Python still ends the process by SIGINT, so the exit status says what happened
        previous_hook(exc_type, exc, tb)
        message = f"{exc_type.__name__}: {exc}"
        python_traceback = "".join(traceback.format_exception(exc_type, exc, tb))
        if explain_timeout is not None and is_timeout(exc):
            message = explain_timeout()
            print(f"memfit: rank {rank}: {message}", file=sys.stderr, flush=True)
            python_traceback += f"memfit: {message}\n"  # torchrun's summary shows the traceback, not the message
        record_error(message, python_traceback)

    sys.excepthook = memfit_excepthook


def is_timeout(exc: BaseException) -> bool:
    """A collective or store operation that gave up waiting (gloo: "Timed out waiting 3000ms for
    recv operation to complete"; the store: "wait timeout after ...")."""
    return isinstance(exc, RuntimeError) and _TIMEOUT_PATTERN.search(str(exc)) is not None


def record_error(message: str, python_traceback: str) -> None:
    """Writes the error where torchrun's agent reads it (the format of torch's ErrorHandler), so
    the launcher's summary quotes message instead of a pointer to the docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": python_traceback,
                "timestamp": str(int(time.time())),  # torch's field, in whole seconds
                PRECISE_TIME_KEY: time.time(),  # orders failures that torch's field ties
            },
        }
    }
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError as error:
        print(f"memfit: cannot write the error file {path}: {error.strerror}", file=sys.stderr)
