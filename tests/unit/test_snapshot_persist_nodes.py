"""Persisting across nodes when a node is lost: the first node's agent waits for the other nodes'
files of a step before committing it, and that wait must not stop it from persisting its own
ranks' later snapshots (it holds their slots until their files are written: a blocked queue would
block the workers' next snapshot, hence training). A step another commit already put in place is
not waited for again."""

import json
import os
import time

import torch

from memfit.checkpointing.agent import Agent, preallocate
from memfit.checkpointing.disk import DEFAULT_TAG_PREFIX, read_manifest
from memfit.checkpointing.persist import TEMPORARY_PREFIX, Persister
from memfit.checkpointing.slots import SlotFile, index_for, layout, needed_bytes, slot_path, tensor_entry


def payload(step: int) -> dict:
    return {
        "params": {"w": torch.full((3, 5), float(step))},
        "optimizer_state": {"w": {"exp_avg": torch.zeros(3, 5), "step": step}},
        "param_groups": [{"lr": 0.1, "param_names": ["w"]}],
        "frozen": {},
        "buffers": {},
        "global_step": step,
        "micro_step": 2 * step,
        "scheduler": None,
        "rng": {"python": [1]},
        "client_state": {},
    }


def write_slot(shm_dir: str, slot: int, step: int) -> None:
    path = slot_path(shm_dir, 0, slot)
    content = payload(step)
    preallocate(path, needed_bytes(content))
    slot_file = SlotFile(path)
    slot_file.invalidate()
    entries = [tensor_entry(p, t, o, slot_file.copy_tensor(t, o)) for p, t, o in layout(content)[0]]
    slot_file.commit(step, step, index_for(content, step, 2, 0, {"w": 0}, entries))
    slot_file.close()


def committed(agent: Agent, slot: int, step: int) -> None:
    message = {"op": "committed", "rank": 0, "slot": slot, "step": step, "world_size": 2}
    message.update(local_world_size=1, node_rank=0, stage=2, persist=True)
    agent.handle(message)


def wait_until(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def node1_marker(persist_path: str, step: int) -> None:
    """Node 1's share of `step`, as its agent would write it (a copy of node 0's file as rank 1's)."""
    temporary = os.path.join(persist_path, TEMPORARY_PREFIX + f"{DEFAULT_TAG_PREFIX}{step}")
    with open(os.path.join(temporary, "node0.json")) as file:
        entry = dict(json.load(file)["entries"][0])
    source = os.path.join(temporary, entry["file"])
    entry["file"] = entry["file"].replace("rank0", "rank1").replace("00000", "00001")
    with open(source, "rb") as reader, open(os.path.join(temporary, entry["file"]), "wb") as writer:
        writer.write(reader.read())
    marker = {"entries": [entry], "owner_of": {"w": 0}, "micro_step": 2 * step}
    with open(os.path.join(temporary, "node1.json"), "w") as file:
        json.dump(marker, file)


def test_a_commit_waiting_for_a_lost_node_does_not_block_later_persists(tmp_path):
    shm_dir, persist_path = str(tmp_path / "shm"), str(tmp_path / "persist")
    os.makedirs(shm_dir)
    persister = Persister(persist_path, keep=2)
    agent = Agent(shm_dir, persister)
    write_slot(shm_dir, 0, 4)
    committed(agent, 0, 4)  # node 1 never sends its share of step 4: it was lost
    step4 = os.path.join(persist_path, TEMPORARY_PREFIX + f"{DEFAULT_TAG_PREFIX}4", "node0.json")
    assert wait_until(lambda: os.path.exists(step4))
    write_slot(shm_dir, 1, 6)
    committed(agent, 1, 6)
    step6 = os.path.join(persist_path, TEMPORARY_PREFIX + f"{DEFAULT_TAG_PREFIX}6", "node0.json")
    assert wait_until(lambda: os.path.exists(step6)), "step 6 waited for the commit of step 4"
    agent.handle({"op": "acquire", "rank": 0, "slot": 0})  # returns: no slot is held any more
    agent.handle({"op": "acquire", "rank": 0, "slot": 1})
    node1_marker(persist_path, 6)  # the relaunched node 1 persists step 6
    assert wait_until(lambda: read_manifest(os.path.join(persist_path, f"{DEFAULT_TAG_PREFIX}6"), quiet=True))
    node1_marker(persist_path, 4)
    assert wait_until(lambda: read_manifest(os.path.join(persist_path, f"{DEFAULT_TAG_PREFIX}4"), quiet=True))
    persister.close()


def test_a_step_already_in_place_is_not_waited_for_again(tmp_path):
    """A lost node's restart redoes steps: its node-0 share of a step that a commit already put in
    place (with the relaunched node's files) is dropped instead of waiting for markers that went
    into the committed directory."""
    shm_dir, persist_path = str(tmp_path / "shm"), str(tmp_path / "persist")
    os.makedirs(shm_dir)
    persister = Persister(persist_path, keep=2)
    agent = Agent(shm_dir, persister)
    write_slot(shm_dir, 0, 4)
    committed(agent, 0, 4)
    assert wait_until(
        lambda: os.path.exists(os.path.join(persist_path, TEMPORARY_PREFIX + f"{DEFAULT_TAG_PREFIX}4", "node0.json"))
    )
    node1_marker(persist_path, 4)
    final = os.path.join(persist_path, f"{DEFAULT_TAG_PREFIX}4")
    assert wait_until(lambda: read_manifest(final, quiet=True))
    committed(agent, 0, 4)  # step 4 again, after a restore from step 2
    temporary = os.path.join(persist_path, TEMPORARY_PREFIX + f"{DEFAULT_TAG_PREFIX}4")
    time.sleep(0.5)
    assert wait_until(lambda: not os.path.exists(temporary), timeout_s=10)
    assert read_manifest(final, quiet=True)["global_step"] == 4
    started = time.monotonic()
    persister.close()
    assert time.monotonic() - started < 5
