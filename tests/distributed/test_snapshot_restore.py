"""Restoring snapshots from shared memory on 2 gloo ranks of one node (ZeRO-2): each rank reads the
parameters the other rank owns from that rank's slot (no broadcast) and checks its own slot while
it copies. The restored state is bit for bit the state at the snapshot; a flipped byte anywhere,
even in a tensor the other rank reads unchecked, brings every rank back to the previous snapshot
bit for bit; a slot cut short is refused."""

import os
import tempfile

import pytest
import torch

from memfit.checkpointing.integrity import payload_digests, tensor_digest
from memfit.checkpointing.restore import restore_from_memory
from memfit.checkpointing.slots import layout, newest_committed
from memfit.checkpointing.state import export_rank_state
from tests.distributed.harness import run_ranks

NUM_STEPS = 3


def _engine(shm_dir: str, seed: int, interval_steps: int):
    import memfit

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05}},
        "zero_optimization": {"stage": 2},
        "snapshot": {"interval_steps": interval_steps, "shm_dir": shm_dir, "keep_shm": True},
    }
    return memfit.initialize(model, config)


def _state(engine) -> dict:
    """Digests of everything a restore sets on this rank: every parameter of the module (owned or
    not), the exported payload (masters, optimizer state, counters, RNG, scheduler)."""
    return {
        "module": {name: tensor_digest(param) for name, param in engine.module.named_parameters()},
        "payload": payload_digests(export_rank_state(engine, {})),
    }


def _damage(shm_dir: str, owner_rank: int, step: int, how: str) -> str:
    """Damages owner_rank's slot of step: flips a byte of its first parameter, or cuts the file
    short inside its tensors; returns the path of the tensor or file damaged."""
    reader = next(r for r in newest_committed(shm_dir, owner_rank) if r.step == step)
    placed = {path: offset for path, _, offset in layout(reader.payload(verify=False))[0]}
    tensor_path = next(path for path in placed if path.startswith("params/"))
    if how == "truncate":
        os.truncate(reader.path, placed[tensor_path] + 8)
        return reader.path
    with open(reader.path, "r+b") as file:
        file.seek(placed[tensor_path] + 5)
        value = file.read(1)[0]
        file.seek(placed[tensor_path] + 5)
        file.write(bytes([value ^ 0x01]))
    return tensor_path


def _restore_after(rank, world_size, directory, damage):
    import torch.distributed as dist

    os.environ["MEMFIT_JOB_ID"] = "restore-test"  # both ranks one job, as `memfit run` names it
    shm_dir = os.path.join(directory, "shm")
    engine = _engine(shm_dir, seed=0, interval_steps=1)
    states = {}
    for _ in range(NUM_STEPS):
        engine.backward(engine(torch.randn(2, 16)).square().mean())
        engine.step()
        engine.snapshotter.wait_for_copy()
        states[engine.global_step] = _state(engine)
    engine.snapshotter.interval_steps = 0
    dist.barrier()
    if damage is not None and rank == 0:
        # rank 1's slot of the last step, in a parameter rank 1 owns: rank 0 reads it unchecked
        _damage(shm_dir, 1, NUM_STEPS, damage)
    dist.barrier()
    fresh = _engine(shm_dir + "-fresh", seed=1, interval_steps=0)  # another state, no snapshots of its own
    restored = restore_from_memory(fresh, shm_dir)
    assert restored is not None
    step, slot = restored
    assert fresh.global_step == step
    assert _state(fresh) == states[step], f"rank {rank}: the state restored differs from step {step}'s"
    engine.snapshotter.close()
    return step


@pytest.mark.timeout(180)
@pytest.mark.parametrize(  # about 25 s each on 2 cores: the undamaged restore in the fast tier
    "damage", [None, pytest.param("flip", marks=pytest.mark.slow), pytest.param("truncate", marks=pytest.mark.slow)]
)
def test_restore_is_the_state_at_the_snapshot_bit_for_bit(damage):
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as directory:
        steps = run_ranks(_restore_after, 2, directory, damage)
    assert steps == [NUM_STEPS if damage is None else NUM_STEPS - 1] * 2
