import pytest

from memfit.io import available_backends


@pytest.fixture(params=["io_uring", "threads", "python"])
def io_backend(request):
    """Every I/O backend; a native one this machine lacks is skipped with the reason."""
    if request.param not in available_backends():
        pytest.skip(f"{request.param} backend not available here")
    return request.param
