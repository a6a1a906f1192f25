"""Process-group setup: reuse an existing group, join the one torchrun describes in the
environment, or run as a single process."""

import atexit
import datetime
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device): gloo on the CPU, NCCL when CUDA is present."""
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
        atexit.register(_shut_down_process_group)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world_size, device


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
