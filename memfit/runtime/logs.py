"""What memfit prints: a handler on the "memfit" logger when the script set up no logging, its
level (`"memfit": {"log_level": ...}` or MEMFIT_LOG_LEVEL), and memfit's own warnings as one log
line per job instead of one Python warning per rank with a source line under it."""

import json
import logging
import os
import sys
import warnings

LOG_LEVEL_ENV = "MEMFIT_LOG_LEVEL"
SHOWN_WARNINGS_ENV = "MEMFIT_SHOWN_WARNINGS"  # JSON list of the warnings `memfit run` printed already
LOG_LEVELS = ("debug", "info", "warning", "error")
FORMAT = "memfit: %(message)s"

_MEMFIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WARNINGS_FILE = os.path.abspath(warnings.__file__)

logger = logging.getLogger("memfit")


class _MemfitHandler(logging.StreamHandler):
    """memfit's own handler, told apart from one the script added."""


def env_log_level() -> str | None:
    value = os.environ.get(LOG_LEVEL_ENV)
    if value is None or value == "":
        return None
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"{LOG_LEVEL_ENV}={value!r}: expected one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def setup_logging(rank: int, config_level: str | None = None) -> None:
    """The "memfit" logger at the level asked for (MEMFIT_LOG_LEVEL, else the config's, else info)
    on rank 0 and at least warning on the others: the lines every rank would print (the config,
    the step lines), rank 0 prints once. A script that configured logging keeps its handlers."""
    level = getattr(logging, (env_log_level() or config_level or "info").upper())
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))
    ours = [handler for handler in logger.handlers if isinstance(handler, _MemfitHandler)]
    if not ours and (logging.getLogger().handlers or logger.handlers):
        return  # the script's logging setup prints memfit's records; its warnings stay Python warnings
    if not ours:
        handler = _MemfitHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
        logger.propagate = False  # a root handler the script adds later must not print each line twice
    _route_warnings(rank)


def _route_warnings(rank: int) -> None:
    """memfit's warnings (those raised from memfit's code) become one "memfit" log record per job:
    on rank 0, each text once, with no source line. Other warnings print as before. Replacing
    formatwarning (not showwarning) leaves warnings.catch_warnings(record=True) and pytest.warns
    recording every warning as usual."""
    original = getattr(warnings.formatwarning, "memfit_original", warnings.formatwarning)
    seen = set(json.loads(os.environ.get(SHOWN_WARNINGS_ENV) or "[]"))

    def formatwarning(message, category, filename, lineno, line=None):
        if not _raised_in_memfit():
            return original(message, category, filename, lineno, line)
        text = str(message)
        if rank == 0 and text not in seen:
            seen.add(text)
            logger.warning("warning: %s", text)
        return ""

    formatwarning.memfit_original = original
    warnings.formatwarning = formatwarning


def _raised_in_memfit() -> bool:
    """Whether the code that called warnings.warn is memfit's: the first frame above this one that
    is not the warnings module's (warnings.warn itself is C and has no frame)."""
    frame = sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == _WARNINGS_FILE:
        frame = frame.f_back
    if frame is None:
        return False
    return os.path.abspath(frame.f_code.co_filename).startswith(_MEMFIT_DIR + os.sep)
