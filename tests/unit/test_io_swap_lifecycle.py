"""SwapFile is scratch space with typed slots: a slot remembers the dtype and shape put into it and
refuses to be read as anything else; operations on one slot take effect in call order; a failed
put leaves its slot unreadable rather than stale; the file is removed when the SwapFile is closed,
collected or the process exits (unless keep=True), and a file left by a killed run is never read
back as state."""

import errno
import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from memfit.io import SwapFile


def run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_get_refuses_a_different_dtype_of_the_same_size(tmp_path, io_backend):
    with SwapFile(tmp_path / "swap", "1M", backend=io_backend) as swap:
        swap.put("exp_avg", torch.ones(4)).wait()
        with pytest.raises(
            ValueError, match=r"slot 'exp_avg' holds torch\.float32 \(4,\), destination is torch\.int32 \(4,\)"
        ):
            swap.get("exp_avg", torch.empty(4, dtype=torch.int32))
        with pytest.raises(
            ValueError, match=r"slot 'exp_avg' holds torch\.float32 \(4,\), destination is torch\.float32 \(2, 2\)"
        ):
            swap.get("exp_avg", torch.empty(2, 2))
        back = np.empty(4, dtype=np.float32)  # the same values in another container are fine
        swap.get("exp_avg", back).wait()
        assert back.tolist() == [1.0] * 4
        assert swap.slot("exp_avg").dtype == torch.float32 and swap.slot("exp_avg").shape == (4,)


def test_put_refuses_to_change_a_slot_dtype_or_shape(tmp_path):
    with SwapFile(tmp_path / "swap", "1M") as swap:
        swap.put("w", torch.zeros(2, 3)).wait()
        with pytest.raises(
            ValueError, match=r"slot 'w' holds torch\.float32 \(2, 3\), got torch\.int32 \(2, 3\); remove\(\) it first"
        ):
            swap.put("w", torch.zeros(2, 3, dtype=torch.int32))
        with pytest.raises(
            ValueError,
            match=r"slot 'w' holds torch\.float32 \(2, 3\), got torch\.float32 \(3, 2\); remove\(\) it first",
        ):
            swap.put("w", torch.zeros(3, 2))
        swap.remove("w")
        swap.put("w", torch.zeros(3, 2, dtype=torch.int32)).wait()


def test_views_whose_bytes_are_not_their_values_are_refused(tmp_path):
    with SwapFile(tmp_path / "swap", "1M") as swap:
        with pytest.raises(ValueError, match=r"tensor: tensor is a conjugate view.*resolve_conj"):
            swap.put("c", torch.tensor([1 + 1j]).conj())
        assert "c" not in swap
        swap.put("c", torch.tensor([1 + 1j])).wait()
        with pytest.raises(ValueError, match=r"into: tensor is a negative view.*resolve_neg"):
            swap.get("c", torch.empty(1, dtype=torch.complex64)._neg_view())


def test_close_removes_the_file_unless_kept(tmp_path, io_backend):
    with SwapFile(tmp_path / "a.swap", "1M", backend=io_backend) as swap:
        swap.put("x", torch.ones(10)).wait()
        assert (tmp_path / "a.swap").exists()
    assert not (tmp_path / "a.swap").exists()
    kept = SwapFile(tmp_path / "b.swap", "1M", backend=io_backend, keep=True)
    kept.close()
    kept.close()
    assert (tmp_path / "b.swap").stat().st_size == 1 << 20


def test_garbage_collection_removes_the_file(tmp_path):
    swap = SwapFile(tmp_path / "swap", "1M")
    swap.put("x", torch.ones(10))  # still in flight when the object goes away
    del swap
    gc.collect()
    assert not (tmp_path / "swap").exists()


def test_a_normal_exit_removes_the_file_and_a_forked_child_does_not(tmp_path):
    path = tmp_path / "swap"
    result = run_isolated(
        f"""
        import os, sys, warnings, torch
        from memfit.io import SwapFile
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with engine threads running
        swap = SwapFile({str(path)!r}, "1M")
        swap.put("x", torch.ones(10)).wait()
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a normal exit of the child runs its atexit hooks
        os.waitpid(child, 0)
        print("after child exit", os.path.exists({str(path)!r}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "after child exit True"
    assert not path.exists()


def test_a_stale_file_from_a_killed_run_is_never_read_as_state(tmp_path, io_backend):
    path = tmp_path / "swap"
    killed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, signal, torch
                from memfit.io import SwapFile
                swap = SwapFile({str(path)!r}, "4M")
                swap.put("exp_avg", torch.full((1 << 18,), 7.0)).wait()
                print("ready", flush=True)
                signal.pause()
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert killed.stdout.readline().strip() == "ready"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert path.exists()  # nothing can remove a file when its process is killed

    with SwapFile(path, "4M", backend=io_backend) as swap:
        assert swap.names() == []
        with pytest.raises(KeyError, match="no slot named 'exp_avg'"):
            swap.get("exp_avg", torch.empty(1 << 18))
        # Nothing of the old run survives on disk either: the file was reinitialized.
        on_disk = np.fromfile(path, dtype=np.float32)
        assert on_disk.size == 1 << 20 and not on_disk.any()


def test_a_read_right_after_a_put_sees_the_put(tmp_path, io_backend):
    """Per-slot order: get waits for the slot's put in flight instead of racing it."""
    rng = torch.Generator().manual_seed(0)
    with SwapFile(tmp_path / "swap", "64M", backend=io_backend, block_size="64K") as swap:
        for round_index in range(4):
            tensors = {f"t{i}": torch.randn(1 << 20, generator=rng) for i in range(3)}
            backs = {}
            for name, tensor in tensors.items():
                swap.put(name, tensor)  # no wait
                backs[name] = torch.empty_like(tensor)
                swap.get(name, backs[name])
            swap.file.fsync()
            for name in tensors:
                swap.get(name, backs[name]).wait()
                assert torch.equal(backs[name], tensors[name]), (round_index, name)


def test_remove_waits_for_the_slot_before_reusing_its_space(tmp_path, io_backend):
    with SwapFile(tmp_path / "swap", "16M", backend=io_backend, block_size="64K") as swap:
        for _ in range(4):
            swap.put("old", torch.full((1 << 21,), 1.0))  # 8 MiB, no wait
            swap.remove("old")
            swap.put("new", torch.full((1 << 21,), 2.0)).wait()
            assert swap.table()["new"][0] == 0  # the space "old" had
            back = torch.empty(1 << 21)
            swap.get("new", back).wait()
            assert bool((back == 2.0).all())
            swap.remove("new")


def test_a_failed_put_makes_the_slot_unreadable_until_put_again(tmp_path, io_backend):
    path = tmp_path / "swap"
    result = run_isolated(
        f"""
        import errno, resource, signal, torch
        from memfit.io import SwapFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        swap = SwapFile({str(path)!r}, "4M", backend={io_backend!r})
        swap.put("low", torch.ones(1024)).wait()  # offset 0
        swap.put("high", torch.ones(1 << 19)).wait()  # offset 4 KiB, 2 MiB long
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        swap.put("high", torch.full((1 << 19,), 5.0))  # fails with EFBIG past 1 MiB; nobody waits
        back = torch.empty(1 << 19)
        try:
            swap.get("high", back)
        except OSError as error:
            print("get", errno.errorcode[error.errno], error.strerror)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        swap.put("high", torch.full((1 << 19,), 6.0)).wait()
        swap.get("high", back).wait()
        print("after a good put", float(back.min()), float(back.max()))
        try:
            swap.close()
        except OSError as error:
            print("close", errno.errorcode[error.errno], error.strerror)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "get EFBIG slot 'high': its last put failed (File too large); put it again",
        "after a good put 6.0 6.0",
        "close EFBIG 1 write failed (first: File too large)",
    ]


def test_two_swap_files_on_one_path_are_refused(tmp_path):
    path = tmp_path / "swap"
    with SwapFile(path, "1M") as first:
        first.put("x", torch.ones(10)).wait()
        with pytest.raises(OSError) as info:
            SwapFile(path, "1M")
        assert info.value.errno == errno.EBUSY
        assert info.value.filename == str(path)
        assert "in use by another SwapFile" in info.value.strerror
        back = torch.empty(10)
        first.get("x", back).wait()  # the refused one neither truncated nor removed the file
        assert torch.equal(back, torch.ones(10))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import signal; from memfit.io import SwapFile; s = SwapFile({str(path)!r}, '1M'); "
            "print('holding', flush=True); signal.pause()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(OSError, match="in use by another SwapFile"):
            SwapFile(path, "1M")
    finally:
        holder.kill()
        holder.wait()
    with SwapFile(path, "1M") as after_the_holder_died:  # its lock died with it; its file is replaced
        assert after_the_holder_died.names() == []


def test_close_does_not_remove_a_file_that_replaced_the_swap_file(tmp_path):
    path = tmp_path / "swap"
    swap = SwapFile(path, "1M")
    os.unlink(path)
    path.write_bytes(b"someone else's file")
    swap.close()
    assert path.read_bytes() == b"someone else's file"


def test_puts_and_gets_from_many_threads(tmp_path, io_backend):
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors = []
    try:
        with SwapFile(tmp_path / "swap", "32M", backend=io_backend, block_size="16K") as swap:

            def worker(k):
                try:
                    rng = random.Random(k)
                    for i in range(40):
                        name = f"w{k}.{i % 5}"
                        if name in swap and rng.random() < 0.3:
                            swap.remove(name)
                            continue
                        data = torch.full((rng.randrange(1, 30_000),), float(k * 100 + i))
                        if name in swap and swap.slot(name).shape != tuple(data.shape):
                            swap.remove(name)
                        swap.put(name, data)
                        back = torch.empty_like(data)
                        swap.get(name, back).wait()
                        if not torch.equal(back, data):
                            errors.append(("mismatch", name))
                except Exception as error:
                    errors.append(error)

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            extents = sorted((slot.offset, slot.offset + slot.num_bytes) for slot in map(swap.slot, swap.names()))
            assert all(end <= next_begin for (_, end), (next_begin, _) in zip(extents, extents[1:]))
    finally:
        sys.setswitchinterval(previous)
    assert errors == []


@pytest.mark.parametrize("capacity", [0, "0", -1, 1.5])
def test_capacity_must_be_a_positive_size(tmp_path, capacity):
    with pytest.raises(ValueError, match="capacity_bytes"):
        SwapFile(tmp_path / "swap", capacity)
    assert not (tmp_path / "swap").exists()


def test_capacity_is_rounded_up_to_whole_blocks(tmp_path):
    with SwapFile(tmp_path / "swap", "10000", keep=True) as swap:
        assert swap.capacity_bytes == 12288
    assert (tmp_path / "swap").stat().st_size == 12288
