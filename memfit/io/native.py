"""Loads the native extension unless MEMFIT_NO_EXT=1 asks for the pure-Python fallbacks."""

import os
import warnings

_C = None
if os.environ.get("MEMFIT_NO_EXT") != "1":
    try:
        from memfit import _C
    except ImportError as error:  # an install without a compiler, or a source tree never built
        warnings.warn(f"memfit native extension unavailable ({error}); using pure-Python I/O", stacklevel=2)
        _C = None


def uring_available() -> bool:
    return _C is not None and _C.uring_available()
