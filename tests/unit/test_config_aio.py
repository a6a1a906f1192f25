"""The config's aio section is used, not just checked: memfit.initialize makes its block size and
queue depth the geometry of every file opened afterwards without its own (swap files, the NVMe
tier), and requests are really cut that way; DeepSpeed's other aio keys are accepted and, where
they ask for something memfit does not do, reported as ignored."""

import warnings

import pytest
import torch

import memfit
from memfit.io import AsyncFile, SwapFile
from memfit.io.engine import DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, set_default_geometry


@pytest.fixture(autouse=True)
def default_geometry():
    yield
    set_default_geometry(DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH)


def initialize(aio: dict):
    config = {"train_micro_batch_size_per_gpu": 1, "aio": aio}
    return memfit.initialize(torch.nn.Linear(4, 4), config)


def test_initialize_sets_the_geometry_of_files_opened_after_it(tmp_path):
    initialize({"block_size": 65536, "queue_depth": 4})
    with AsyncFile(tmp_path / "a.bin", "w", size=1 << 20) as file:
        assert (file.block_size, file.queue_depth) == (65536, 4)
        data = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB: 16 pieces of 64 KiB, 4 in flight
        assert file.pwrite(data, 0).wait() == data.nbytes
        back = torch.empty_like(data)
        file.pread(back, 0).wait()
        assert torch.equal(back, data)
    with SwapFile(tmp_path / "s.swap", "1M") as swap:
        assert (swap._file.block_size, swap._file.queue_depth) == (65536, 4)
    with AsyncFile(tmp_path / "b.bin", "w", size=4096, block_size=8192, queue_depth=2) as own:
        assert (own.block_size, own.queue_depth) == (8192, 2)  # a file's own geometry wins
    initialize({})
    with AsyncFile(tmp_path / "c.bin", "w", size=4096) as file:
        assert (file.block_size, file.queue_depth) == (DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH)


@pytest.mark.parametrize(
    "aio,warning",
    [
        ({"intra_op_parallelism": 1, "single_submit": False, "overlap_events": True}, None),
        ({"intra_op_parallelism": 8}, "aio.intra_op_parallelism: 8 is ignored by memfit"),
        ({"single_submit": True}, "aio.single_submit: true is ignored by memfit"),
        ({"overlap_events": False}, "aio.overlap_events: false is ignored by memfit"),
    ],
)
def test_deepspeed_aio_keys_are_accepted_and_reported_when_ignored(aio, warning):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        initialize(aio)
    messages = [str(w.message) for w in caught if "aio." in str(w.message)]
    if warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warning in messages[0], messages
