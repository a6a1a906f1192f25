import os

# One intra-op thread per process, as torchrun gives each worker: the distributed tests run two or
# more ranks on two cores, and torch's threads spin-waiting on each other's cores made the small
# models of the equivalence table ten times slower. Set before torch is imported, and inherited by
# every spawned rank and subprocess. A test of threading passes its thread count explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from memfit.io import available_backends  # noqa: E402

TESTS_ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=["io_uring", "threads", "python"])
def io_backend(request):
    """Every I/O backend; a native one this machine lacks is skipped with the reason."""
    if request.param not in available_backends():
        pytest.skip(f"{request.param} backend not available here")
    return request.param


def _test_files_on_disk() -> set[str]:
    found = set()
    for directory, _, files in os.walk(TESTS_ROOT):
        found.update(os.path.join(directory, f) for f in files if f.startswith("test_") and f.endswith(".py"))
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """When the whole suite is asked for, in either tier, every test file on disk must have been
    collected: a folder that pytest skips by name (it skips `dist`, `build`, `venv`...) fails the
    run instead of silently dropping its tests. This runs before `-m` deselects a tier's tests, so a
    file whose tests are all in the other tier still counts as collected."""
    asked = [os.path.abspath(str(arg).split("::")[0]) for arg in config.args]
    if asked and any(path != TESTS_ROOT and path != os.path.dirname(TESTS_ROOT) for path in asked):
        return  # a subset was asked for
    if config.getoption("keyword"):
        return
    collected = {os.path.abspath(str(item.path)) for item in items}
    missing = sorted(os.path.relpath(path, TESTS_ROOT) for path in _test_files_on_disk() - collected)
    if missing:
        raise pytest.UsageError(f"test files on disk that pytest did not collect: {', '.join(missing)}")
