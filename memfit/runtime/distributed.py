"""Process-group setup: reuse an existing group, join the one torchrun describes in the
environment, or run as a single process. A worker joining a job also ties its lifetime to its
launcher and starts the heartbeat that explains collective timeouts (see lifecycle, heartbeat)."""

import atexit
import datetime
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from memfit.config import MemfitConfig
from memfit.runtime import heartbeat, lifecycle

DEFAULT_COLLECTIVE_TIMEOUT_S = MemfitConfig.model_fields["collective_timeout_s"].default

_heartbeat: heartbeat.Heartbeat | None = None


def init_distributed(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): gloo on the CPU, NCCL when CUDA is present.

    collective_timeout_s (the config's collective_timeout_s): how long a collective waits for the
    other ranks; it applies when this call creates the process group."""
    if not collective_timeout_s > 0:
        raise ValueError(f"collective_timeout_s: must be positive, got {collective_timeout_s}")
    lifecycle.exit_with_launcher()
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        timeout = datetime.timedelta(seconds=collective_timeout_s)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **attempt_store(timeout))
        atexit.register(_shut_down_process_group)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        watch_collectives(rank, world_size, collective_timeout_s)
    else:
        rank, world_size = 0, 1
        if lifecycle.started_by_launcher():  # a 1-rank job: its error is still the launcher's to quote
            lifecycle.install_exit_hooks(rank)
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world_size, device


def attempt_store(timeout: datetime.timedelta) -> dict:
    """init_process_group's store, rank and world size when torchrun's agent hosts the store: the
    agent's store under a prefix of its own for each restart attempt. torch 2.13's agent keeps one
    store across restarts and its workers use it unprefixed, so the workers of a restart read the
    addresses a killed attempt left there and time out connecting to dead ranks (each attempt
    failing in turn until the restarts are used up). The attempt is the agent's restart count,
    which all workers of one node share (the prefix torch itself used up to 2.3). Elsewhere: {}."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    prefix = f"memfit/attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}/"
    return {
        "store": dist.PrefixStore(prefix, store),
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


_second_group: list = []  # the group second_group made, reused while it exists


def second_group(device: torch.device):
    """A process group over the same ranks with the default group's timeout (torch's new_group
    would take 30 minutes), for collectives whose order differs from the default group's. One per
    default group: every engine a process builds shares it (each group holds threads and
    connections until the default group is destroyed)."""
    if _second_group and _second_group[0] in dist.distributed_c10d._world.pg_map:
        return _second_group[0]
    try:
        timeout = dist.distributed_c10d._get_default_group()._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # a backend that does not say: torch's default
        timeout = None
    _second_group[:] = [dist.new_group(timeout=timeout)]
    return _second_group[0]


EXIT_GRACE_S = 0.1


def _shut_down_process_group() -> None:
    """Runs at exit, before the interpreter finalizes. A gloo worker thread that drops the last
    reference to a finished collective releases its tensors' Python objects, which needs the GIL;
    once the interpreter is finalizing, such a thread exits inside a noexcept destructor and the
    process aborts ("terminate called without an active exception"), turning a finished run into
    a failed one. memfit keeps its own collectives alive until the next step (collectives.keep);
    this grace period lets the threads finish with any other collective the script ran last (a
    metric all-reduce, a checkpoint's status exchange) while they still can."""
    if dist.is_initialized():
        time.sleep(EXIT_GRACE_S)
        dist.destroy_process_group()


def watch_collectives(rank: int, world_size: int, collective_timeout_s: float) -> None:
    """Once per process: a heartbeat in the group's store and the exit hooks, so that a timed-out
    collective names the rank that stopped answering. The timeout quoted is the group's own."""
    global _heartbeat
    if _heartbeat is not None:
        return
    store = heartbeat.default_store()
    group_timeout_s = store.timeout.total_seconds() if store is not None else None
    if group_timeout_s is not None and collective_timeout_s not in (group_timeout_s, DEFAULT_COLLECTIVE_TIMEOUT_S):
        warnings.warn(
            f"collective_timeout_s={collective_timeout_s:g} is ignored: the process group was created before "
            f"memfit joined it, with a {group_timeout_s:g} s timeout",
            UserWarning,
            stacklevel=3,
        )
    if store is None or world_size == 1:
        lifecycle.install_exit_hooks(rank)
        return
    _heartbeat = heartbeat.Heartbeat(store, rank, world_size, heartbeat.interval_for(group_timeout_s))
    lifecycle.install_exit_hooks(rank, lambda: _heartbeat.explain_timeout(group_timeout_s))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states, as tensors and numbers only (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((3, tuple(python[:-1]), python[-1]))
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
