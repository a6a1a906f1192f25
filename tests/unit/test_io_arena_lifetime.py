"""HostArena lifetime: close() refuses while any tensor (or view of one) from the arena is alive,
and nothing a user does with arena tensors can touch unmapped memory. Each case runs in its own
interpreter so that a segfault fails the test instead of killing pytest."""

import subprocess
import sys
import textwrap

import pytest
import torch

from memfit.io import HostArena


def run_isolated(code: str) -> subprocess.CompletedProcess:
    prelude = "import torch\nfrom memfit.io import HostArena\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def assert_clean_exit(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


ALIASES = [
    "t",
    "t.view(torch.float32)",
    "t.view(torch.float32).view(32, 32)[1:][:, 2:]",
    "t[100:].unsqueeze(0).expand(3, -1)",
    "t.numpy()",
    "torch.from_numpy(t.numpy()[5:])",
    "t.untyped_storage()",
]


def test_close_refuses_while_a_tensor_or_view_is_alive():
    result = run_isolated(
        f"""
        for make_alias in {ALIASES!r}:
            arena = HostArena("16M")
            t = arena.alloc(4096)
            alias = eval(make_alias)
            del t
            try:
                arena.close()
            except BufferError as error:
                print(make_alias, "refused:", error)
            else:
                print(make_alias, "closed")
            alias.fill_(1) if isinstance(alias, torch.UntypedStorage) else torch.as_tensor(alias).fill_(1)
            del alias
            arena.close()
            print(make_alias, "closed after the alias died")
        """
    )
    assert_clean_exit(result)
    for alias in ALIASES:
        assert f"{alias} refused: HostArena.close: tensors from this arena are still alive" in result.stdout
        assert f"{alias} closed after the alias died" in result.stdout


def test_the_brief_reproducer_no_longer_segfaults():
    result = run_isolated(
        """
        a = HostArena("16M"); t = a.alloc(4096)
        try:
            a.close()
        except BufferError:
            pass
        t.fill_(1)
        print(int(t.sum()))
        """
    )
    assert_clean_exit(result)
    assert result.stdout.strip() == "4096"


def test_a_freed_tensor_that_is_still_referenced_keeps_the_arena_open():
    result = run_isolated(
        """
        arena = HostArena("1M")
        t = arena.alloc(4096)
        arena.free(t)
        try:
            arena.close()
        except BufferError as error:
            print("refused")
        t.fill_(7)
        del t
        arena.close()
        print("closed")
        """
    )
    assert_clean_exit(result)
    assert result.stdout.split() == ["refused", "closed"]


def test_dropping_the_arena_without_close_keeps_its_tensors_valid():
    result = run_isolated(
        """
        import gc
        arena = HostArena("1M")
        t = arena.alloc((16, 16), torch.float64)
        del arena
        gc.collect()
        t.fill_(2.5)
        print(float(t.sum()))
        """
    )
    assert_clean_exit(result)
    assert result.stdout.strip() == "640.0"


def test_close_then_use_is_a_clear_error():
    arena = HostArena("1M")
    t = arena.alloc(10)
    del t
    arena.close()
    arena.close()  # twice is fine
    with pytest.raises(ValueError, match="HostArena is closed"):
        arena.alloc(10)
    assert arena.alloc(0).numel() == 0  # empty tensors never touch the mapping


def test_failed_close_leaves_the_arena_working():
    arena = HostArena("1M")
    t = arena.alloc(4096)
    with pytest.raises(BufferError, match=r"\(1 block, 4\.0 KiB, not freed\)"):
        arena.close()
    u = arena.alloc(4096)
    u.fill_(3)
    t.fill_(1)
    assert int(u.sum()) == 3 * 4096 and int(t.sum()) == 4096
    arena.free(t)
    arena.free(u)
    del t, u
    arena.close()


@pytest.mark.parametrize(
    "args, message",
    [
        ((1.5,), "size: not a size"),
        (((2, 2.0), torch.float32), "size: dimensions must be integers"),
        (((2, -1), torch.float32), "size: dimensions must not be negative"),
        ((-5,), "size: must not be negative"),
    ],
)
def test_alloc_refuses_bad_sizes(args, message):
    arena = HostArena("1M")
    with pytest.raises(ValueError, match=message):
        arena.alloc(*args)
    assert arena.bytes_in_use == 0


@pytest.mark.parametrize("capacity", [0, -1, "0", 2**70])
def test_capacity_errors_name_the_argument(capacity):
    with pytest.raises(ValueError, match="capacity_bytes"):
        HostArena(capacity)


def test_a_tensor_held_only_by_a_reference_cycle_does_not_block_close():
    arena = HostArena("1M")
    cycle = [arena.alloc(4096)]
    cycle.append(cycle)
    del cycle
    arena.close()
