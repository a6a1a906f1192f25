"""Failures reach Python as OSError with errno and path, never as success, and the engine keeps
working afterwards. Also the buffered fallback where O_DIRECT is refused."""

import errno
import os
import subprocess
import sys
import textwrap
import uuid
import warnings

import pytest
import torch

from memfit.io import AsyncFile
from memfit.io import file as file_module


@pytest.fixture(autouse=True)
def fresh_warning_registry():
    """The O_DIRECT fallback warns once per path per process; each test starts afresh."""
    file_module._warned_paths.clear()


def test_no_space_left(io_backend):
    # /dev/full fails every write with ENOSPC and refuses O_DIRECT: both paths in one real device.
    with pytest.warns(RuntimeWarning, match="/dev/full: the file system refuses O_DIRECT"):
        f = AsyncFile("/dev/full", "rw", backend=io_backend)
    with f:
        assert not f.direct
        with pytest.raises(OSError) as info:
            f.pwrite(torch.ones(100_000, dtype=torch.uint8), 0).wait()
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == "/dev/full"


def test_engine_usable_after_error(tmp_path, io_backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = AsyncFile("/dev/full", "rw", backend=io_backend)
    with full, AsyncFile(tmp_path / "ok", "w", backend=io_backend) as ok:
        failing = [full.pwrite(bytes(50_000), i * 50_000) for i in range(4)]
        good = [ok.pwrite(bytes([i]) * 50_000, i * 50_000) for i in range(4)]
        for request in failing:
            with pytest.raises(OSError):
                request.wait()
        assert [request.wait() for request in good] == [50_000] * 4
        back = bytearray(200_000)
        assert ok.pread(back, 0).wait() == 200_000
        assert back == b"".join(bytes([i]) * 50_000 for i in range(4))


def run_isolated(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_file_too_large(tmp_path, io_backend):
    result = run_isolated(
        f"""
        import resource, signal, errno
        from memfit.io import AsyncFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        with AsyncFile({str(tmp_path / "big")!r}, "w", backend={io_backend!r}) as f:
            f.pwrite(bytes(512 << 10), 0).wait()
            try:
                f.pwrite(bytes(2 << 20), 0).wait()
            except OSError as e:
                print("errno", errno.errorcode[e.errno], e.filename)
            else:
                print("no error")
        """
    )
    assert result.returncode == 0, result.stderr
    assert f"errno EFBIG {tmp_path / 'big'}" in result.stdout


def test_missing_path(tmp_path, io_backend):
    missing = tmp_path / "no" / "such" / "dir" / "f"
    with pytest.raises(FileNotFoundError) as info:
        AsyncFile(missing, "w", backend=io_backend)
    assert info.value.filename == str(missing)
    with pytest.raises(FileNotFoundError):
        AsyncFile(tmp_path / "absent", "r", backend=io_backend)


def test_permission_denied(tmp_path, io_backend):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 10)
    secret.chmod(0o600)
    tmp_path.chmod(0o755)
    # Root ignores file modes, so where we are root the attempt runs as an unprivileged user
    # (after the imports, which may live under /root).
    drop = "import os; os.setgid(65534); os.setuid(65534)" if os.geteuid() == 0 else "pass"
    if os.geteuid() != 0:
        secret.chmod(0o000)
    result = run_isolated(
        f"""
        from memfit.io import AsyncFile
        {drop}
        try:
            AsyncFile({str(secret)!r}, "r", backend={io_backend!r})
        except PermissionError as e:
            print("denied", e.errno, e.filename)
        """,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert f"denied {errno.EACCES} {secret}" in result.stdout


def test_write_to_read_only_file_is_refused(tmp_path, io_backend):
    (tmp_path / "f").write_bytes(b"abc")
    with AsyncFile(tmp_path / "f", "r", backend=io_backend) as f:
        with pytest.raises(ValueError, match="read-only"):
            f.pwrite(b"x", 0)


def test_tmpfs_round_trip(io_backend):
    path = f"/dev/shm/memfit-test-{uuid.uuid4().hex}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # older kernels refuse O_DIRECT on tmpfs
            f = AsyncFile(path, "w", backend=io_backend, block_size="8K")
        data = torch.randint(0, 255, (123_457,), dtype=torch.uint8)
        with f:
            f.pwrite(data, 5).wait()
            back = torch.empty_like(data)
            f.pread(back, 5).wait()
        assert torch.equal(back, data)
    finally:
        os.unlink(path)


def test_buffered_fallback_round_trip_where_odirect_refused(tmp_path, io_backend):
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount_point)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here; /dev/full covers the refusal in test_no_space_left")
    try:
        path = mount_point / "f"
        with pytest.warns(RuntimeWarning, match=f"{path}: the file system refuses O_DIRECT"):
            f = AsyncFile(path, "w", backend=io_backend, block_size="8K")
        data = torch.randint(0, 255, (70_001,), dtype=torch.uint8)
        with f:
            assert not f.direct
            f.pwrite(data, 4096).wait()
            back = torch.empty_like(data)
            f.pread(back, 4096).wait()
        assert torch.equal(back, data)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
