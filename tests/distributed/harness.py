"""Spawns gloo ranks that meet through a FileStore in a temp dir (no fixed port), runs a function
on each, and returns what each rank returned."""

import os
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world_size, store_path, fn, args, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, *args):
    with tempfile.TemporaryDirectory() as directory, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _worker,
            args=(world_size, os.path.join(directory, "store"), fn, args, results),
            nprocs=world_size,
            start_method="spawn",
            join=True,
        )
        out = []
        for rank in range(world_size):
            status, value = results[rank]
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out.append(value)
        return out
