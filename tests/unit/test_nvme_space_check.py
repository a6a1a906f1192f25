"""initialize's disk check for the NVMe swap files counts what will be freed before they are made:
a model built under memfit.zero_init holds its values in birth files that fill_store deletes
before the optimizer's swap file is allocated."""

import os
import uuid

import pytest

from memfit.config import resolve_config
from memfit.runtime.estimate import host_memory_problem


@pytest.fixture
def directory():
    path = f"/dev/shm/memfit-test-space-{uuid.uuid4().hex[:8]}"  # a tmpfs: a few GiB free at most
    os.makedirs(path)
    yield path
    os.rmdir(path)


def test_birth_files_count_as_free_space(directory):
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    nvme = {"device": "nvme", "nvme_path": directory}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "offload_param": nvme, "offload_optimizer": nvme},
    }
    cfg = resolve_config(config, 1).config
    numel = free // 16 + (1 << 20)  # 16 bytes per parameter: a little more than there is room for
    shapes = [("weight", (numel,), True)]
    problem = host_memory_problem(shapes, cfg, 1, 0, 1, "cpu")
    assert problem is not None and problem.startswith("zero_optimization.offload_optimizer.nvme_path:")
    freed = {directory: 32 * numel}
    assert host_memory_problem(shapes, cfg, 1, 0, 1, "cpu", freed_before_swap=freed) is None
