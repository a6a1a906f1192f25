"""Heartbeats through the process group's store, so that a rank whose collective timed out can say
which rank stopped answering instead of only that it waited.

Each rank's daemon thread adds 1 to its own counter in the store every interval. A rank that is
stopped (SIGSTOP, a debugger), dead, or wedged while holding the GIL stops counting; a rank that is
only slow, or blocked in a collective (which releases the GIL), keeps counting. After a timeout,
the rank that saw it reads every counter, waits a few intervals and reads them again: the ranks
whose counters did not move are the ones that stopped answering. Counters, not timestamps: ranks on
different hosts need not agree on the time.

The store is torchrun's agent store under torchrun and `memfit run`, so it answers even when any
worker is stopped. When rank 0 hosts it (a group set up without torchrun), a stopped rank 0 takes
the store with it; the reading is then bounded in time and says it could not tell.
"""

import atexit
import threading
import time

import torch.distributed as dist

KEY_PREFIX = "memfit/heartbeat/"
MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 5.0
INTERVALS_WATCHED = 4  # how long a reader watches for a beat, in intervals


def interval_for(collective_timeout_s: float) -> float:
    """Seconds between beats: a tenth of the timeout, so a timed-out rank has missed many beats,
    within [0.5 s, 5 s] to keep store traffic low on long timeouts."""
    return min(max(collective_timeout_s / 10, MIN_INTERVAL_S), MAX_INTERVAL_S)


class Heartbeat:
    """Beats for this rank from a daemon thread; silent_ranks() tells which ranks stopped."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, interval_s: float):
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be positive, got {interval_s}")
        self._store = dist.PrefixStore(KEY_PREFIX, store)
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self._stop = threading.Event()
        self._store.add(str(rank), 1)
        self._thread = threading.Thread(target=self._beat, name="memfit-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # out of the store's code before the interpreter tears it down

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._store.add(str(self.rank), 1)
            except Exception:  # the store is gone: the job is ending, there is no one to tell
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)

    def silent_ranks(self) -> list[int] | None:
        """The other ranks whose heartbeat did not move in INTERVALS_WATCHED intervals; None when the
        store did not answer in time."""
        watch_s = INTERVALS_WATCHED * self.interval_s
        result: list = []
        reader = threading.Thread(target=lambda: result.append(self._watch(watch_s)), daemon=True)
        reader.start()
        reader.join(watch_s + 10 * self.interval_s + 5)
        return result[0] if result else None

    def _watch(self, watch_s: float) -> list[int] | None:
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        try:
            before = {rank: self._store.add(str(rank), 0) for rank in others}
            time.sleep(watch_s)
            return [rank for rank in others if self._store.add(str(rank), 0) == before[rank]]
        except Exception:
            return None

    def explain_timeout(self, collective_timeout_s: float | None) -> str:
        """One sentence for a collective that timed out on this rank."""
        waited = f" after {collective_timeout_s:g} s (collective_timeout_s)" if collective_timeout_s else ""
        silent = self.silent_ranks()
        watch_s = INTERVALS_WATCHED * self.interval_s
        if silent is None:
            cause = "could not read the other ranks' heartbeats (the store did not answer)"
        elif silent:
            ranks = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(str(rank) for rank in silent)
            cause = f"{ranks} stopped answering (no heartbeat in {watch_s:g} s)"
        else:
            cause = "every rank is still alive: one is slower than the timeout, or they called different collectives"
        return f"collective timed out{waited}; {cause}"


def default_store() -> dist.Store | None:
    """The store the default process group was built on (torch keeps it privately), or None."""
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get_store is None:
        return None
    try:
        return get_store()
    except (RuntimeError, ValueError):
        return None
