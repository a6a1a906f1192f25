"""Resource failures inside the engines (no memory for a bounce buffer, no thread for a worker, a
ring the kernel stops accepting) become OSError(errno, path) on the request that hit them; the
process never aborts and the engine keeps working afterwards. Every case runs in its own
interpreter, under a real address-space limit or a real seccomp filter, so that an abort fails the
test instead of killing pytest."""

import platform
import subprocess
import sys
import textwrap

import pytest

from memfit.io import available_backends

PRELUDE = """
import errno, resource, psutil, torch
from memfit.io import AsyncFile, HostArena

def limit_address_space(headroom_bytes):
    # Counted from what is mapped now, so that only new large mappings fail.
    used = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom_bytes, resource.RLIM_INFINITY))

def lift_limit():
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

def outcome(action):
    try:
        return f"ok {action()}"
    except OSError as error:
        return f"OSError {errno.errorcode.get(error.errno, error.errno)} {error.filename}"
"""


def run_isolated(code: str, setup: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + setup + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def assert_clean_exit(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def test_bounce_buffer_allocation_failure_is_enomem_on_the_request(tmp_path, io_backend):
    path = tmp_path / "f"
    result = run_isolated(
        f"""
        arena = HostArena("4M")
        backing = arena.alloc(2 << 20)
        data = backing[1 : (1 << 20) + 1]  # misaligned memory: O_DIRECT needs the bounce buffer
        data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8))
        f = AsyncFile({str(path)!r}, "w", size="2M", backend={io_backend!r}, block_size="1G", queue_depth=2)
        assert f.direct
        limit_address_space(256 << 20)  # the 1 GiB bounce buffer cannot be mapped
        print("write", outcome(lambda: f.pwrite(data, 4096).wait()))
        print("read", outcome(lambda: f.pread(data, 4096).wait()))
        lift_limit()
        print("write after", outcome(lambda: f.pwrite(data, 4096).wait()))
        back = torch.zeros(data.numel() + 1, dtype=torch.uint8)[1:]
        print("read after", outcome(lambda: f.pread(back, 4096).wait()), torch.equal(back, data))
        f.close()
        """
    )
    assert_clean_exit(result)
    assert result.stdout.splitlines() == [
        f"write OSError ENOMEM {path}",
        f"read OSError ENOMEM {path}",
        f"write after ok {1 << 20}",
        f"read after ok {1 << 20} True",
    ]


@pytest.mark.parametrize("io_backend", ["io_uring", "threads"])
def test_memory_running_out_anywhere_in_a_submit_is_enomem_and_never_loses_a_piece(tmp_path, io_backend):
    """16384 pieces per request; the address space is capped a little higher each round, so that
    each allocation of the submit path (piece plan, queue, request objects) is the one that fails
    in some round. Every round ends in bytes written or ENOMEM with the path, never in another
    exception, a crash or a hang, and the engine works afterwards. Native backends only: the
    Python backend runs its pieces as Python code, and with a few MiB left the interpreter itself
    cannot allocate an exception, whatever the engine does."""
    if io_backend not in available_backends():
        pytest.skip(f"{io_backend} backend not available here")
    path = tmp_path / "f"
    result = run_isolated(
        f"""
        data = torch.ones(64 << 20, dtype=torch.uint8)
        f = AsyncFile({str(path)!r}, "w", backend={io_backend!r}, block_size="4K", queue_depth=4)
        f.pwrite(b"warm", 0).wait()
        for headroom_kib in range(128, 40 << 10, 128):
            request = error = None
            limit_address_space(headroom_kib << 10)
            try:  # nothing else runs under the limit: the test's own code would fail there too
                request = f.pwrite(data, 0)
            except BaseException as caught:
                error = caught
            lift_limit()
            if request is not None:
                line = outcome(request.wait)
                print("wait", line, flush=True)
                if line.startswith("ok"):
                    break  # from here on there is room for everything
            elif isinstance(error, OSError):
                print("submit OSError", errno.errorcode[error.errno], error.filename, flush=True)
            else:
                print("submit", repr(error), flush=True)
        print("after", outcome(lambda: f.pwrite(data, 0).wait()))
        back = torch.zeros_like(data)
        f.pread(back, 0).wait()
        print("bytes", torch.equal(back, data))
        f.close()
        """
    )
    assert_clean_exit(result)
    lines = result.stdout.splitlines()
    assert lines[-2:] == [f"after ok {64 << 20}", "bytes True"]
    allowed = {f"submit OSError ENOMEM {path}", f"wait OSError ENOMEM {path}", f"wait ok {64 << 20}"}
    assert set(lines[:-2]) <= allowed, lines


@pytest.mark.parametrize("backend", ["threads", "python"])
def test_worker_threads_that_cannot_start_give_oserror_with_the_path(tmp_path, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not available here")
    path = tmp_path / "f"
    result = run_isolated(
        f"""
        limit_address_space(40 << 20)  # room for a few 8 MiB thread stacks, not for 256
        def write_once():
            with AsyncFile({str(path)!r}, "w", backend={backend!r}, block_size="4K", queue_depth=256) as f:
                return f.pwrite(bytes(range(256)) * 4096, 0).wait()  # 256 pieces, one per worker
        print("limited", outcome(write_once))
        lift_limit()
        print("unlimited", outcome(write_once))
        """
    )
    assert_clean_exit(result)
    lines = result.stdout.splitlines()
    assert lines[0] in (f"limited OSError EAGAIN {path}", f"limited OSError ENOMEM {path}"), lines
    assert lines[1] == "unlimited ok 1048576"


SECCOMP_FILTER = """
import ctypes, struct

def fail_io_uring_enter_of_three():
    # A real seccomp filter, installed on every thread (TSYNC): io_uring_enter fails with EINVAL
    # when it is asked to submit exactly three entries; every other system call is untouched.
    nr_io_uring_enter, nr_seccomp = 426, 317
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    ret_allow, ret_errno = 0x7FFF0000, 0x00050000
    program = [
        (ld_w_abs, 0, 0, 0),  # the system call number
        (jeq_k, 0, 3, nr_io_uring_enter),
        (ld_w_abs, 0, 0, 24),  # low half of args[1], to_submit
        (jeq_k, 0, 1, 3),
        (ret_k, 0, 0, ret_errno | errno.EINVAL),
        (ret_k, 0, 0, ret_allow),
    ]
    global _filters, _fprog  # the kernel copies them, but keep them alive until it has
    _filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in program))
    _fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(program), ctypes.addressof(_filters)))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(nr_seccomp, 1, 1, _fprog) != 0:  # NO_NEW_PRIVS; TSYNC
        raise SystemExit(f"seccomp refused: errno {ctypes.get_errno()}")
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter uses x86_64 system call numbers")
def test_io_uring_enter_failure_fails_the_requests_and_the_ring_keeps_working(tmp_path):
    if "io_uring" not in available_backends():
        pytest.skip("io_uring backend not available here")
    path = tmp_path / "f"
    result = run_isolated(
        setup=SECCOMP_FILTER,
        code=f"""
        f = AsyncFile({str(path)!r}, "w", size="64K", backend="io_uring", block_size="4K", queue_depth=8)
        arena = HostArena("64K")
        data = arena.alloc(12288)
        data.copy_(torch.arange(12288) % 251)
        print("before", outcome(lambda: f.pwrite(data[:8192], 0).wait()))
        fail_io_uring_enter_of_three()
        print("three pieces", outcome(lambda: f.pwrite(data, 16384).wait()))
        print("two pieces", outcome(lambda: f.pwrite(data[:8192], 16384).wait()))
        back = arena.alloc(8192)
        print("read", outcome(lambda: f.pread(back, 16384).wait()), torch.equal(back, data[:8192]))
        f.close()
        """,
    )
    if "seccomp refused" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert_clean_exit(result)
    assert result.stdout.splitlines() == [
        "before ok 8192",
        f"three pieces OSError EINVAL {path}",
        "two pieces ok 8192",
        "read ok 8192 True",
    ]


def test_a_forked_child_neither_hangs_nor_crashes_and_opens_its_own_files(tmp_path, io_backend):
    """The engine's threads do not exist in a child of fork(): the child must not join them at exit,
    nor queue work for them, and it gets engines of its own."""
    result = run_isolated(
        f"""
        import os, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with engine threads running
        parent_file = AsyncFile({str(tmp_path / "parent")!r}, "w", backend={io_backend!r})
        parent_file.pwrite(b"parent", 0).wait()
        in_flight = parent_file.pwrite(bytes(8 << 20), 4096)  # may still be running at the fork
        child = os.fork()
        if child == 0:
            try:
                parent_file.pwrite(b"child", 0)
            except ValueError as error:
                print("refused:", error, flush=True)
            with AsyncFile({str(tmp_path / "child")!r}, "w", backend={io_backend!r}) as own:
                print("own file:", own.pwrite(b"child", 0).wait(), flush=True)
            sys.exit(0)  # a normal exit: destructors and atexit hooks run
        _, status = os.waitpid(child, 0)
        print("child status", status)
        print("parent still works:", in_flight.wait(), parent_file.pwrite(b"again", 0).wait())
        parent_file.close()
        """
    )
    assert_clean_exit(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused: ") and "opened by process" in lines[0] and "forked child" in lines[0]
    assert lines[1:] == ["own file: 5", "child status 0", f"parent still works: {8 << 20} 5"]
