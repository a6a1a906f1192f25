"""Losing a whole node with snapshot parity on: two and three simulated nodes on this machine (one
`memfit run` each, one rank each). A node's launcher, workers and agent are SIGKILLed and its
shared memory deleted; the relaunched node's rank rebuilds its slot from the other nodes' data and
parity, with persistence off (no disk to read), and the job ends bit-identical to an
uninterrupted run. A corrupted or truncated parity slot is caught by its checksum and the job
falls back to the persisted snapshot, never to wrong data."""

import os
import random
import time

import pytest

from memfit.checkpointing.parity import PARITY_SLOTS_PER_RANK, committed_parity, parity_path
from tests.integration.parity_nodes import MAX_STEPS, Cluster, write_config
from tests.integration.snapshot_job import INTERVAL, assert_cleaned_up, read_metrics

RANDOM_MAX_STEPS = 32  # room for a random loss to land while training, however fast the steps run

pytestmark = pytest.mark.timeout(900)

_references: dict[int, list[dict]] = {}


def reference(num_nodes: int, tmp_path_factory, max_steps: int = MAX_STEPS) -> list[dict]:
    """Metrics of an uninterrupted run on num_nodes nodes (computed once per module)."""
    key = (num_nodes, max_steps)
    if key not in _references:
        directory = tmp_path_factory.mktemp(f"reference{num_nodes}-{max_steps}")
        metrics = str(directory / "metrics.jsonl")
        cluster = Cluster(directory, num_nodes, write_config(str(directory)), metrics, max_steps=max_steps)
        assert cluster.wait() == [0] * num_nodes, cluster.output()
        records = read_metrics(metrics)
        assert not any("restored_from" in record for record in records)
        for shm_dir in cluster.shm_dirs:
            assert_cleaned_up(shm_dir)
        _references[key] = records
    return _references[key]


def check_against(records: list[dict], expected: list[dict]) -> list[int]:
    """Every step's loss equals the reference's and the final parameters are bit-identical;
    returns the steps restored from."""
    losses = {record["step"]: record["loss"] for record in expected}
    for record in records:
        assert record["loss"] == losses[record["step"]], (record, losses[record["step"]])
    assert records[-1]["step"] == expected[-1]["step"]
    assert records[-1]["params_xxh3"] == expected[-1]["params_xxh3"]
    return [record["restored_from"] for record in records if "restored_from" in record]


def wait_for(condition, cluster: Cluster, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline or any(launcher.poll() is not None for launcher in cluster.launchers):
            cluster.kill_all()
            raise AssertionError(f"condition not reached:\n{cluster.output()}")
        time.sleep(0.05)


def lose_and_relaunch(cluster: Cluster, node: int) -> None:
    cluster.lose_node(node)
    assert not os.path.exists(cluster.shm_dirs[node])
    cluster.relaunch(node)


def finish(cluster: Cluster) -> str:
    statuses = cluster.wait()
    output = cluster.output()
    assert statuses == [0] * cluster.num_nodes, output
    return output


@pytest.mark.parametrize("num_nodes, victim", [(2, 1), pytest.param(3, 0, marks=pytest.mark.slow)])
def test_lost_node_is_rebuilt_from_parity(tmp_path, tmp_path_factory, num_nodes, victim):
    expected = reference(num_nodes, tmp_path_factory)
    metrics = str(tmp_path / "metrics.jsonl")
    cluster = Cluster(tmp_path, num_nodes, write_config(str(tmp_path)), metrics)
    wait_for(lambda: all(step is not None and step >= 2 * INTERVAL for step in cluster.parity_steps()), cluster)
    lose_and_relaunch(cluster, victim)
    output = finish(cluster)
    restored = check_against(read_metrics(metrics), expected)
    assert restored and restored[0] >= 2 * INTERVAL, restored
    assert f"snapshot parity: rebuilding rank(s) [{victim}] from the parity of step {restored[0]}" in output
    assert f"restored the snapshot of step {restored[0]} from shared memory" in output


@pytest.mark.slow
def test_parity_of_every_other_snapshot_restores_an_older_step(tmp_path, tmp_path_factory):
    """parity_every 2: rounds at steps 4, 8, 12. Lost after the snapshot of step 6, the node is
    rebuilt at step 4, the newest complete round, older than the newest snapshot; the slot of step
    4 was kept while step 6 was written."""
    expected = reference(2, tmp_path_factory)
    metrics = str(tmp_path / "metrics.jsonl")
    cluster = Cluster(tmp_path, 2, write_config(str(tmp_path), parity_every=2), metrics)
    wait_for(lambda: cluster.steps_done() >= 3 * INTERVAL + 1, cluster)
    parity_step = cluster.parity_steps()[1]  # a round in flight cannot complete once node 0 is gone
    lose_and_relaunch(cluster, 0)
    assert parity_step in (2 * INTERVAL, 4 * INTERVAL), parity_step
    output = finish(cluster)
    restored = check_against(read_metrics(metrics), expected)
    assert restored[0] in (parity_step, parity_step + 2 * INTERVAL), (restored, parity_step)
    assert f"snapshot parity: rebuilding rank(s) [0] from the parity of step {restored[0]}" in output
    # the rounds are at steps 4 and 8: snapshots of steps 6 and 10 had no parity, yet were written
    assert restored[0] % (2 * INTERVAL) == 0


@pytest.mark.slow
def test_node_lost_in_the_middle_of_a_parity_round(tmp_path, tmp_path_factory):
    """Node 1's worker dies between the exchange and the commit of its second round (step 4); the
    rest of the node is lost right after. The survivor's round never completed: the restore uses a
    round every survivor completed, or the interrupted one where its parity was committed whole."""
    expected = reference(3, tmp_path_factory)
    metrics = str(tmp_path / "metrics.jsonl")
    cluster = Cluster(tmp_path, 3, write_config(str(tmp_path)), metrics, faults={1: "parity-exchanged:2:1:0"})
    wait_for(lambda: cluster.workers_of(1), cluster)
    first_worker = cluster.workers_of(1)[0]
    wait_for(lambda: not first_worker.is_running() or cluster.steps_done() > 2 * INTERVAL + 2, cluster)
    assert cluster.steps_done() <= 2 * INTERVAL + 2, "the fault did not fire"
    lose_and_relaunch(cluster, 1)
    output = finish(cluster)
    restored = check_against(read_metrics(metrics), expected)
    assert restored and restored[0] in (INTERVAL, 2 * INTERVAL), restored
    assert "snapshot parity: rebuilding rank(s) [1]" in output


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_parity_falls_back_to_disk(tmp_path, tmp_path_factory, damage):
    expected = reference(2, tmp_path_factory)
    metrics = str(tmp_path / "metrics.jsonl")
    persist_path = str(tmp_path / "persist")
    cluster = Cluster(tmp_path, 2, write_config(str(tmp_path), persist_path=persist_path), metrics)
    wait_for(lambda: all(step is not None and step >= 2 * INTERVAL for step in cluster.parity_steps()), cluster)
    cluster.lose_node(1)
    # the survivor's launcher stays up; its workers fail and wait for node 1 in a new rendezvous
    for slot in range(PARITY_SLOTS_PER_RANK):  # damage every round node 0 holds
        path = parity_path(cluster.shm_dirs[0], 0, slot)
        if not os.path.exists(path):
            continue
        with open(path, "r+b") as file:
            if damage == "truncated":
                file.truncate(os.path.getsize(path) // 2)
            else:
                file.seek(4096 + 100)
                byte = file.read(1)
                file.seek(4096 + 100)
                file.write(bytes([byte[0] ^ 0x04]))
    assert committed_parity(cluster.shm_dirs[0], 0) == []
    cluster.relaunch(1)
    output = finish(cluster)
    check_against(read_metrics(metrics), expected)
    problem = "parity checksum mismatch" if damage == "flipped byte" else "truncated"
    assert f"snapshot parity skipped: {cluster.shm_dirs[0]}" in output and problem in output, output
    assert "snapshot parity: no snapshot in memory can be restored" in output
    assert "from disk" in output


@pytest.mark.slow
def test_two_lost_nodes_fall_back_to_disk_saying_why(tmp_path, tmp_path_factory):
    expected = reference(3, tmp_path_factory)
    metrics = str(tmp_path / "metrics.jsonl")
    persist_path = str(tmp_path / "persist")
    cluster = Cluster(tmp_path, 3, write_config(str(tmp_path), persist_path=persist_path), metrics)
    wait_for(lambda: all(step is not None and step >= 2 * INTERVAL for step in cluster.parity_steps()), cluster)
    cluster.lose_node(1)
    cluster.lose_node(2)
    cluster.relaunch(1)
    cluster.relaunch(2)
    output = finish(cluster)
    check_against(read_metrics(metrics), expected)
    assert "snapshot parity: no snapshot in memory can be restored" in output
    assert (
        "ranks [1, 2] of parity group [0, 1, 2] have no snapshot of it; XOR parity rebuilds one lost member" in output
    )
    assert "from disk" in output


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_random_node_losses(tmp_path, tmp_path_factory):
    """10 of 10: 2 or 3 nodes, the lost node and the moment (any time after the first complete
    parity round, a round in flight included) drawn from a seeded generator."""
    seed = int(os.environ.get("MEMFIT_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"random node losses: seed {seed} (MEMFIT_TEST_SEED={seed} repeats it)")
    rng = random.Random(seed)
    for attempt in range(10):
        num_nodes = rng.choice([2, 3])
        victim = rng.randrange(num_nodes)
        # at least half the steps left after it: on a quiet machine the tiny preset runs several
        # steps a second, and the loss comes up to a second after its step
        lose_after_step = rng.randint(INTERVAL + 1, RANDOM_MAX_STEPS // 2)
        delay_s = rng.uniform(0.0, 1.0)
        print(f"attempt {attempt}: {num_nodes} nodes, node {victim} lost {delay_s:.2f} s after step {lose_after_step}")
        expected = reference(num_nodes, tmp_path_factory, RANDOM_MAX_STEPS)
        directory = tmp_path / f"attempt{attempt}"
        directory.mkdir()
        metrics = str(directory / "metrics.jsonl")
        cluster = Cluster(directory, num_nodes, write_config(str(directory)), metrics, max_steps=RANDOM_MAX_STEPS)
        wait_for(
            lambda: cluster.steps_done() >= lose_after_step and None not in cluster.parity_steps(),  # noqa: B023
            cluster,
        )
        time.sleep(delay_s)
        # a loss after the last step is not a loss in training: the survivors end the job without it
        assert cluster.steps_done() < RANDOM_MAX_STEPS - 1, (
            f"attempt {attempt}: training ended first\n" + cluster.output()
        )
        lose_and_relaunch(cluster, victim)
        output = finish(cluster)
        restored = check_against(read_metrics(metrics), expected)
        assert restored, output
        assert "from shared memory" in output and "from disk" not in output
