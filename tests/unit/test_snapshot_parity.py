"""XOR parity of snapshot slots: the rotated layout (no member holds parity of its own data, parity
is 1/(N-1) of the data), exact rebuild of any one lost member for any group size and any data
lengths (0 and 1 byte included), the restore plan across groups, parity slot files that are
refused when torn, truncated or corrupted (a digest handed to commit included), and the lower
priority of a parity round's thread."""

import os
import random
import sys
import threading

import pytest
import torch
import xxhash

from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.parity import (
    DATA_OFFSET,
    ParityFile,
    ParityReader,
    committed_parity,
    encode,
    holder_of_part,
    parity_path,
    parity_problems,
    part_bytes_for,
    part_index,
    rebuild,
    slot_file_bytes,
)
from memfit.checkpointing.parity_exchange import ParityRounds, lower_thread_priority, plan_restore, usable_parity
from memfit.checkpointing.snapshot import parity_setup
from memfit.config import load_config
from memfit.launcher.cli import main as memfit_main


@pytest.mark.parametrize("num_members", [2, 3, 4, 8])
def test_layout_is_rotated(num_members):
    for member in range(num_members):
        parts = [part_index(member, holder, num_members) for holder in range(num_members) if holder != member]
        assert sorted(parts) == list(range(num_members - 1))  # each part goes to exactly one holder
        assert part_index(member, member, num_members) == num_members - 1  # no part of its own
        for part in parts:
            assert part_index(member, holder_of_part(member, part, num_members), num_members) == part
    for holder in range(num_members):  # a holder's parity mixes a different part of each other member
        assert len({part_index(m, holder, num_members) for m in range(num_members) if m != holder}) == num_members - 1


def test_part_size_is_a_fraction_of_the_data():
    assert part_bytes_for([1000, 1000]) == 1024  # two nodes: a full copy (rounded to 64 bytes)
    assert part_bytes_for([3000, 3000, 3000]) == 1536  # three: half
    assert part_bytes_for([0, 0, 0]) == 64
    with pytest.raises(ValueError, match="two or more members"):
        part_bytes_for([100])


@pytest.mark.parametrize("seed", range(12))
def test_any_single_loss_is_rebuilt_exactly(seed):
    rng = random.Random(seed)
    print("seed", seed)
    num_members = rng.randint(2, 8)
    lengths = [rng.choice([0, 1, 63, 64, 65, rng.randint(0, 5000)]) for _ in range(num_members)]
    generator = torch.Generator().manual_seed(seed)
    datas = [torch.randint(0, 256, (length,), dtype=torch.uint8, generator=generator) for length in lengths]
    parities = encode(datas)
    assert all(parity.numel() == part_bytes_for(lengths) for parity in parities)
    for lost in range(num_members):
        survivors = {m: datas[m] for m in range(num_members) if m != lost}
        held = {m: parities[m] for m in range(num_members) if m != lost}
        assert torch.equal(rebuild(lost, lengths[lost], survivors, held), datas[lost])


def test_a_flipped_parity_byte_rebuilds_wrong_data():
    """Why the parity carries a checksum: XOR alone passes a flipped bit straight through."""
    datas = [torch.arange(100, dtype=torch.uint8) + i for i in range(3)]
    parities = encode(datas)
    parities[1][5] ^= 1
    rebuilt = rebuild(0, 100, {1: datas[1], 2: datas[2]}, {1: parities[1], 2: parities[2]})
    assert not torch.equal(rebuilt, datas[0])


def metadata(step=4, part_bytes=128):
    return {
        "step": step,
        "world_size": 3,
        "group": [0, 1, 2],
        "member": 1,
        "part_bytes": part_bytes,
        "data_bytes": [200, 256, 100],
        "data_digests": ["a", "b", "c"],
    }


def write_parity(shm_dir, rank=1, slot=0, step=4, sequence=1, fill=7):
    path = parity_path(shm_dir, rank, slot)
    with open(path, "wb") as file:
        file.truncate(slot_file_bytes(128))
    parity_file = ParityFile(path)
    parity_file.invalidate()
    parity_file.parity(128).fill_(fill)
    parity_file.commit(step, sequence, metadata(step))
    parity_file.close()
    return path


def test_parity_file_round_trip(tmp_path):
    path = write_parity(str(tmp_path))
    reader = ParityReader(path)
    assert (reader.step, reader.sequence, reader.metadata) == (4, 1, metadata())
    assert torch.equal(reader.parity, torch.full((128,), 7, dtype=torch.uint8))


def test_newest_committed_parity_first(tmp_path):
    write_parity(str(tmp_path), slot=0, step=4, sequence=1)
    write_parity(str(tmp_path), slot=1, step=6, sequence=2)
    assert [reader.step for reader in committed_parity(str(tmp_path), 1)] == [6, 4]
    assert committed_parity(str(tmp_path), 0) == []


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("flip parity", "parity checksum mismatch"),
        ("flip metadata", "metadata checksum mismatch"),
        ("truncate", "truncated"),
        ("truncate header", "too short"),
        ("torn", "being written"),
        ("magic", "bad magic"),
    ],
)
def test_damaged_parity_is_refused(tmp_path, damage, problem):
    path = write_parity(str(tmp_path))
    with open(path, "r+b") as file:
        if damage == "flip parity":
            file.seek(DATA_OFFSET + 77)
            byte = file.read(1)
            file.seek(DATA_OFFSET + 77)
            file.write(bytes([byte[0] ^ 0x10]))
        elif damage == "flip metadata":
            file.seek(DATA_OFFSET + 128 + 10)
            byte = file.read(1)
            file.seek(DATA_OFFSET + 128 + 10)
            file.write(bytes([byte[0] ^ 0x01]))
        elif damage == "truncate":
            file.truncate(DATA_OFFSET + 128 + 5)
        elif damage == "truncate header":
            file.truncate(100)
        elif damage == "torn":
            file.seek(8)
            file.write(bytes(8))
        else:
            file.write(b"XXXXXXXX")
    with pytest.raises(CheckpointError, match=problem):
        ParityReader(path)
    assert committed_parity(str(tmp_path), 1) == []
    assert len(parity_problems(str(tmp_path), 1)) == 1


GROUPS = [[0, 2, 4], [1, 3, 5]]  # three nodes, two ranks each


def reports(local: dict[int, list[int]], parity: dict[int, list[int]]) -> list[dict]:
    return [
        {"local": local.get(rank, []), "parity": {step: (64, [1, 2, 3], ["x"]) for step in parity.get(rank, [])}}
        for rank in range(6)
    ]


def test_plan_takes_the_newest_step_every_rank_holds():
    every = {rank: [4, 6] for rank in range(6)}
    assert plan_restore(reports(every, {}), GROUPS)[:2] == (6, {})


def test_plan_rebuilds_one_lost_node():
    local = {rank: [4, 6] for rank in range(6) if rank not in (2, 3)}  # node 1 lost
    parity = {rank: [4] for rank in range(6)}
    step, lost, why = plan_restore(reports(local, parity), GROUPS)
    assert step == 4 and set(lost) == {2, 3}
    assert "step 6" in why and "no usable parity" in why


def test_plan_refuses_two_lost_nodes():
    local = {rank: [4] for rank in (0, 1)}
    parity = {rank: [4] for rank in range(6)}
    step, lost, why = plan_restore(reports(local, parity), GROUPS)
    assert step is None and lost == {}
    assert "one lost member per group" in why


def test_plan_without_any_snapshot():
    assert plan_restore(reports({}, {}), GROUPS) == (None, {}, "no rank holds a snapshot")


def test_plan_refuses_disagreeing_parity():
    local = {rank: [4] for rank in range(6) if rank != 0}
    parity = {rank: [4] for rank in range(6)}
    reported = reports(local, parity)
    reported[4]["parity"][4] = (128, [1, 2, 3], ["x"])
    step, _, why = plan_restore(reported, GROUPS)
    assert step is None and "disagree" in why


def test_unreadable_parity_path(tmp_path):
    with pytest.raises(CheckpointError, match="No such file"):
        ParityReader(os.path.join(str(tmp_path), "missing"))


def test_snapshot_ls_shows_what_each_parity_slot_covers(tmp_path, capsys):
    write_parity(str(tmp_path), rank=1, slot=0, step=4, sequence=1)
    write_parity(str(tmp_path), rank=1, slot=1, step=6, sequence=2)
    assert memfit_main(["snapshot", "ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # member 1 of 3 holds part 2 of rank 0's data and part 1 of rank 2's (part_index)
    expected = "parity (sequence {}) on node 1 of 3: XOR of rank 0 part 1/2, rank 2 part 2/2"
    assert lines[0].endswith("rank1.parity0  step 4  128 B  " + expected.format(1)), lines
    assert lines[1].endswith("rank1.parity1  step 6  128 B  " + expected.format(2)), lines
    assert part_index(0, 1, 3) == 0 and part_index(2, 1, 3) == 1
    assert memfit_main(["snapshot", "verify", str(tmp_path)]) == 0


def test_snapshot_verify_names_a_damaged_parity_slot(tmp_path, capsys):
    path = write_parity(str(tmp_path))
    with open(path, "r+b") as file:
        file.seek(DATA_OFFSET + 3)
        file.write(b"\xff")
    assert memfit_main(["snapshot", "verify", str(tmp_path)]) == 2
    assert f"{path}: parity checksum mismatch" in capsys.readouterr().err
    assert memfit_main(["snapshot", "ls", str(tmp_path)]) == 0
    assert "parity checksum mismatch (corrupted parity of step 4)" in capsys.readouterr().out


@pytest.mark.parametrize("world_size, local_world_size", [(2, 2), (1, 1), (3, 2)])
def test_xor_without_two_whole_nodes_warns_and_is_off(tmp_path, world_size, local_world_size):
    config = load_config({"train_micro_batch_size_per_gpu": 1, "snapshot": {"interval_steps": 1, "parity": "xor"}})
    with pytest.warns(UserWarning, match='snapshot.parity "xor" needs two or more nodes'):
        assert parity_setup(config.snapshot, str(tmp_path), world_size, local_world_size, 0) == (None, None)


def test_parity_none_builds_nothing(tmp_path):
    config = load_config({"train_micro_batch_size_per_gpu": 1, "snapshot": {"interval_steps": 1}})
    assert parity_setup(config.snapshot, str(tmp_path), 4, 1, 0) == (None, None)


def test_parity_is_usable_only_for_the_bytes_it_was_made_from(tmp_path):
    data = torch.arange(256, dtype=torch.uint8)
    path = parity_path(str(tmp_path), 1, 0)
    with open(path, "wb") as file:
        file.truncate(slot_file_bytes(128))
    parity_file = ParityFile(path)
    parity_file.invalidate()
    metadata_of_round = {**metadata(), "data_digests": ["a", xxhash.xxh3_64_hexdigest(data.numpy()), "c"]}
    parity_file.commit(4, 1, metadata_of_round)
    parity_file.close()
    usable = usable_parity(str(tmp_path), 1, [0, 1, 2], {4: data})
    assert list(usable) == [4] and usable[4][0] == (128, [200, 256, 100], metadata_of_round["data_digests"])
    assert usable_parity(str(tmp_path), 1, [0, 1, 2], {4: data.flip(0)}) == {}  # the slot changed since
    assert usable_parity(str(tmp_path), 1, [0, 1, 2], {6: data}) == {}  # no slot of that step
    assert usable_parity(str(tmp_path), 1, [1, 3, 5], {4: data}) == {}  # another layout of the job


def test_commit_takes_the_digest_hashed_while_writing(tmp_path):
    """A round hashes each chunk of parity as it arrives; a digest that does not match the bytes
    makes the slot unreadable, as a flipped byte would."""
    path = parity_path(str(tmp_path), 1, 0)
    with open(path, "wb") as file:
        file.truncate(slot_file_bytes(128))
    parity_file = ParityFile(path)
    parity = parity_file.parity(128)
    parity.copy_(torch.arange(128, dtype=torch.uint8))
    streamed = xxhash.xxh3_64()
    for start in range(0, 128, 48):  # uneven pieces, as a short last chunk
        streamed.update(parity[start : start + 48].numpy())
    parity_file.commit(4, 1, metadata(), streamed.intdigest())
    assert torch.equal(ParityReader(path).parity, torch.arange(128, dtype=torch.uint8))
    parity_file.commit(4, 2, metadata(), streamed.intdigest() ^ 1)
    parity_file.close()
    with pytest.raises(CheckpointError, match="parity checksum mismatch"):
        ParityReader(path)


@pytest.mark.parametrize("chunk_bytes", [0, 100, -64])
def test_chunks_are_whole_int64_words_and_cache_lines(tmp_path, chunk_bytes):
    with pytest.raises(ValueError, match="chunk_bytes must be a positive multiple of 64"):
        ParityRounds(None, str(tmp_path), 2, chunk_bytes=chunk_bytes)


def _nice_on_a_thread(increment: int) -> int:
    seen = {}

    def run():
        lower_thread_priority(increment)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen["nice"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_a_round_lowers_its_own_thread_only():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert _nice_on_a_thread(5) == min(19, base + 5)
    assert _nice_on_a_thread(19) == 19  # capped
    assert _nice_on_a_thread(0) == base
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling (training) thread keeps its own


def test_nice_is_ignored_with_a_warning_where_it_would_lower_the_process(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with pytest.warns(UserWarning, match="parity_nice 10 is ignored on darwin"):
        assert lower_thread_priority(10) is False
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
