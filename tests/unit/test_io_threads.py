"""AsyncFile and HostArena are thread-safe: real threads hammer one object with submits, fsyncs,
closes, allocations and frees, with the interpreter switching threads as often as it can. No
request is ever lost: close() waits for every request in flight, and a write that failed is
reported at least once, by wait(), fsync() or close()."""

import errno
import gc
import random
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

from memfit.io import AsyncFile, HostArena

CHUNK_BYTES = 700  # unaligned on purpose: every write has a buffered head and tail


@pytest.fixture(autouse=True)
def switch_threads_constantly():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def run_threads(targets) -> list[BaseException]:
    """Runs every target in its own thread and returns what they raised."""
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # collected and asserted on by the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors


def chunk(writer: int, index: int) -> bytes:
    return bytes([(writer * 31 + index) % 251]) * CHUNK_BYTES


def test_submits_fsyncs_and_reads_from_many_threads(tmp_path, io_backend):
    num_writers, num_writes = 4, 300
    f = AsyncFile(tmp_path / "f", "w", backend=io_backend, block_size="4K", queue_depth=4)
    mismatches = []

    def writer(k):
        requests = []
        for i in range(num_writes):
            requests.append(f.pwrite(chunk(k, i), (k * num_writes + i) * CHUNK_BYTES))  # no wait: fire and forget
            if i % 50 == 49:  # now and then read back what this thread has written so far
                for request in requests:
                    request.wait()
                back = bytearray(CHUNK_BYTES)
                f.pread(back, (k * num_writes + i) * CHUNK_BYTES).wait()
                if back != chunk(k, i):
                    mismatches.append((k, i))

    def syncer():
        for _ in range(100):
            f.fsync()

    errors = run_threads([lambda k=k: writer(k) for k in range(num_writers)] + [syncer])
    f.close()
    assert errors == []
    assert mismatches == []
    expected = b"".join(chunk(k, i) for k in range(num_writers) for i in range(num_writes))
    assert (tmp_path / "f").read_bytes() == expected


def test_close_while_other_threads_submit_loses_no_request(tmp_path, io_backend):
    f = AsyncFile(tmp_path / "f", "w", size=8 * 1000 * CHUNK_BYTES, backend=io_backend, block_size="4K")
    submitted: dict[int, list] = {k: [] for k in range(8)}
    refusals = []
    started = threading.Barrier(9)

    def writer(k):
        started.wait()
        for i in range(1000):
            offset = (k * 1000 + i) * CHUNK_BYTES
            try:
                request = f.pwrite(chunk(k, i), offset)
            except ValueError as error:  # the file was closed under us: refused, never half-done
                refusals.append(str(error))
                return
            submitted[k].append((request, offset, chunk(k, i)))

    def closer():
        started.wait()
        while sum(len(requests) for requests in submitted.values()) < 200:
            pass
        f.close()

    errors = run_threads([lambda k=k: writer(k) for k in range(8)] + [closer])
    assert errors == []
    assert refusals and all("I/O on a closed file" in message for message in refusals)
    on_disk = (tmp_path / "f").read_bytes()
    for requests in submitted.values():
        for request, offset, data in requests:
            assert request.done()  # close() returned only after every accepted request finished
            assert request.wait() == CHUNK_BYTES
            assert on_disk[offset : offset + CHUNK_BYTES] == data


def test_close_from_several_threads_at_once(tmp_path, io_backend):
    f = AsyncFile(tmp_path / "f", "w", backend=io_backend, block_size="4K")
    requests = [f.pwrite(chunk(1, i), i * CHUNK_BYTES) for i in range(200)]
    assert run_threads([f.close] * 4) == []
    assert all(request.done() for request in requests)
    with pytest.raises(ValueError, match="closed file"):
        f.fsync()


def full_device(io_backend) -> AsyncFile:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # /dev/full refuses O_DIRECT
        return AsyncFile("/dev/full", "rw", backend=io_backend)


def test_a_failed_write_nobody_waited_for_is_raised_by_fsync(io_backend):
    f = full_device(io_backend)
    f.pwrite(b"x" * 10_000, 0)  # the request is dropped: nobody will ever wait on it
    with pytest.raises(OSError) as info:
        f.fsync()
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == "/dev/full"
    assert "1 write failed" in info.value.strerror
    f.close()  # reported once already: close does not raise it again


def test_a_failed_write_nobody_waited_for_is_raised_by_close(io_backend):
    f = full_device(io_backend)
    for i in range(3):
        f.pwrite(b"x" * 10_000, i * 10_000)
    with pytest.raises(OSError, match="3 writes failed") as info:
        f.close()
    assert info.value.errno == errno.ENOSPC
    f.close()  # the file is closed even though close() raised


def test_fsync_raises_each_write_failure_once_on_a_regular_file(tmp_path, io_backend):
    # A real file-size limit makes writes past 1 MiB fail with EFBIG on a file fsync accepts.
    code = f"""
        import errno, resource, signal
        from memfit.io import AsyncFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        def outcome(action):
            try:
                action()
                return "ok"
            except OSError as error:
                return f"{{errno.errorcode[error.errno]}} {{error.strerror}}"
        f = AsyncFile({str(tmp_path / "f")!r}, "w", backend={io_backend!r})
        seen = f.pwrite(bytes(4096), 2 << 20)
        print("wait", outcome(seen.wait))
        print("fsync after wait", outcome(f.fsync))
        f.pwrite(bytes(4096), 2 << 20)
        f.pwrite(bytes(4096), 0)
        print("fsync unseen", outcome(f.fsync))
        print("fsync again", outcome(f.fsync))
        print("close", outcome(f.close))
        """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "wait EFBIG File too large",
        "fsync after wait ok",
        "fsync unseen EFBIG 1 write failed (first: File too large)",
        "fsync again ok",
        "close ok",
    ]


def test_garbage_collecting_a_file_with_a_failed_write_warns(io_backend):
    f = full_device(io_backend)
    f.pwrite(b"x" * 10_000, 0)
    with pytest.warns(RuntimeWarning, match=r"/dev/full: .* without close\(\); 1 write failed"):
        del f
        gc.collect()


def test_arena_alloc_and_free_from_many_threads():
    arena = HostArena("4M")
    overlaps = []

    def worker(seed):
        rng = random.Random(seed)
        held = []
        for _ in range(2000):
            if held and rng.random() < 0.5:
                tensor, value = held.pop(rng.randrange(len(held)))
                if not bool((tensor == value).all()):
                    overlaps.append(seed)  # another thread was handed the same bytes
                arena.free(tensor)
            else:
                try:
                    tensor = arena.alloc(rng.randrange(1, 20_000))
                except MemoryError:
                    continue
                value = rng.randrange(256)
                tensor.fill_(value)
                held.append((tensor, value))
        for tensor, _ in held:
            arena.free(tensor)

    assert run_threads([lambda s=s: worker(s) for s in range(8)]) == []
    assert overlaps == []
    assert arena.bytes_in_use == 0
    assert arena._extents.largest_free_bytes == arena.capacity_bytes
