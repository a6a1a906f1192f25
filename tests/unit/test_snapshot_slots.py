"""The slot format: a payload round-trips bit for bit (sizes 0 and 1, every dtype the state uses);
a torn slot, a flipped byte, a truncated file or an index naming a class is refused with the file
(and the tensor) named; `memfit snapshot verify` exits 2 on each. A restore's large reads into a
tensor check it on the way."""

import os
import struct

import pytest
import torch

from memfit.checkpointing.agent import preallocate
from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.slots import (
    DATA_OFFSET,
    SlotDataError,
    SlotFile,
    SlotReader,
    SlotSource,
    index_for,
    layout,
    needed_bytes,
    slot_path,
    tensor_entry,
)
from memfit.launcher.cli import main as memfit_main


def sample_payload() -> dict:
    torch.manual_seed(0)
    return {
        "params": {"w": torch.randn(3, 5), "b": torch.randn(1), "empty": torch.empty(0)},
        "optimizer_state": {"w": {"exp_avg": torch.randn(3, 5), "step": 4}},
        "buffers": {"count": torch.tensor([7], dtype=torch.int64), "half": torch.randn(4).to(torch.bfloat16)},
        "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]},
        "scheduler": {"last_epoch": 3, "lrs": (0.1, 0.2), 5: "int key"},
        "global_step": 4,
        "client_state": {"data_position": 4},
    }


def write_slot(path, payload, step=4, sequence=1, commit=True) -> None:
    preallocate(path, needed_bytes(payload))
    slot = SlotFile(path)
    slot.invalidate()
    entries = [tensor_entry(p, t, offset, slot.copy_tensor(t, offset)) for p, t, offset in layout(payload)[0]]
    if commit:
        slot.commit(step, sequence, index_for(payload, step, 1, 0, {"w": 0}, entries))
    slot.close()


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_round_trip_is_exact(tmp_path):
    path = str(tmp_path / "rank0.slot0")
    payload = sample_payload()
    write_slot(path, payload)
    reader = SlotReader(path)
    reader.verify()
    assert reader.step == 4 and reader.sequence == 1
    assert same(reader.payload(), payload)
    source = SlotSource({0: reader})
    assert source.world_size == 1 and source.owner_of == {"w": 0}
    assert torch.equal(source.tensor(0, "params/w"), payload["params"]["w"])


def test_torn_slot_is_never_taken(tmp_path):
    path = str(tmp_path / "rank0.slot0")
    write_slot(path, sample_payload(), commit=False)
    with pytest.raises(CheckpointError, match="no committed snapshot"):
        SlotReader(path)


def test_rewriting_a_committed_slot_invalidates_it_first(tmp_path):
    path = str(tmp_path / "rank0.slot0")
    write_slot(path, sample_payload())
    slot = SlotFile(path)
    slot.invalidate()
    slot.close()
    with pytest.raises(CheckpointError, match="no committed snapshot"):
        SlotReader(path)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x01]))


def test_flipped_data_byte_names_the_tensor(tmp_path, capsys):
    path = str(tmp_path / "rank0.slot0")
    payload = sample_payload()
    write_slot(path, payload)
    placed = {p: offset for p, _, offset in layout(payload)[0]}
    flip_byte(path, placed["optimizer_state/w/exp_avg"] + 5)
    reader = SlotReader(path)  # the header and index are intact
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor 'optimizer_state/w/exp_avg'"):
        reader.verify()
    assert memfit_main(["snapshot", "verify", path]) == 2
    assert "optimizer_state/w/exp_avg" in capsys.readouterr().err
    assert memfit_main(["snapshot", "verify", str(tmp_path)]) == 2


def test_flipped_index_byte_is_detected(tmp_path):
    path = str(tmp_path / "rank0.slot0")
    write_slot(path, sample_payload())
    index_offset = struct.unpack_from("<Q", open(path, "rb").read(DATA_OFFSET), 24)[0]
    flip_byte(path, index_offset + 10)
    with pytest.raises(CheckpointError, match="index checksum mismatch"):
        SlotReader(path)


@pytest.mark.parametrize("size", [0, 100, DATA_OFFSET - 1])
def test_truncated_slot_is_refused(tmp_path, size):
    path = str(tmp_path / "rank0.slot0")
    write_slot(path, sample_payload())
    os.truncate(path, size)
    with pytest.raises(CheckpointError, match="rank0.slot0"):
        SlotReader(path)


def test_truncated_past_the_header_is_refused(tmp_path):
    path = str(tmp_path / "rank0.slot0")
    write_slot(path, sample_payload())
    os.truncate(path, DATA_OFFSET + 8)
    with pytest.raises(CheckpointError, match="index beyond the end"):
        SlotReader(path)


def test_index_naming_a_class_is_not_executed(tmp_path):
    path = str(tmp_path / "rank0.slot0")
    payload = {"x": torch.ones(2)}
    preallocate(path, needed_bytes(payload))
    slot = SlotFile(path)
    slot.commit(1, 1, {"step": 1, "tensors": [], "evil": os.system})  # pickles a reference to a function
    slot.close()
    with pytest.raises(CheckpointError, match="plain values only"):
        SlotReader(path)


def test_missing_slot_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="rank3.slot1"):
        SlotReader(str(tmp_path / "rank3.slot1"))


def test_reading_into_a_tensor_checks_it_and_names_it(tmp_path):
    payload = {"params": {"a": torch.randn(1000, 300), "b": torch.arange(7, dtype=torch.int64)}}
    path = slot_path(str(tmp_path), 0, 0)
    with open(path, "wb") as file:
        file.truncate(needed_bytes(payload))
    slot = SlotFile(path)
    placed, _ = layout(payload)
    entries = [tensor_entry(name, tensor, offset, slot.copy_tensor(tensor, offset)) for name, tensor, offset in placed]
    slot.commit(1, 1, index_for(payload, 1, 1, 0, {}, entries))
    slot.close()
    reader = SlotReader(path)
    for name, tensor, _ in placed:
        target = torch.empty_like(tensor)
        assert reader.can_read_into(name, target)
        reader.read_into(name, target)
        assert torch.equal(target, tensor)
    assert not reader.can_read_into("params/a", torch.empty(1000, 300, dtype=torch.bfloat16))
    assert not reader.can_read_into("params/a", torch.empty(300, 1000).t())
    last_byte = placed[0][2] + 1000 * 300 * 4 - 1  # of "params/a"
    with open(path, "r+b") as file:
        file.seek(last_byte)
        value = file.read(1)[0]
        file.seek(last_byte)
        file.write(bytes([value ^ 0x80]))
    damaged = SlotReader(path)
    with pytest.raises(SlotDataError, match=r"checksum mismatch in tensor 'params/a'"):
        damaged.read_into("params/a", torch.empty(1000, 300))
    damaged.read_into("params/a", torch.empty(1000, 300), verify=False)  # its owner checks it
