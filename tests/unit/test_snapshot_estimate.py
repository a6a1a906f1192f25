"""`memfit estimate` with snapshots on: the shared memory of the slots and of XOR parity, which is
1/(nodes-1) of a snapshot from three nodes on and a full copy with two; misuse of --nodes."""

import os
import subprocess
import sys

import pytest

from memfit.config import load_config
from memfit.launcher.estimate_cmd import snapshot_lines
from memfit.runtime.estimate import RankEstimate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20


def snapshot(parity="xor", interval_steps=10):
    section = {"interval_steps": interval_steps, "parity": parity}
    return load_config({"train_micro_batch_size_per_gpu": 1, "snapshot": section}).snapshot


def estimates():
    # 3 MiB of fp32 values + 6 MiB of optimizer state = a 9 MiB snapshot on the largest rank
    largest = RankEstimate(0, owned_numel=3 * MIB // 4, bytes={"optimizer_state": 6 * MIB})
    return [largest, RankEstimate(1, owned_numel=MIB // 4, bytes={"optimizer_state": 2 * MIB})]


def test_no_line_without_snapshots():
    assert snapshot_lines(estimates(), snapshot(interval_steps=0), 2, 1) == []


def test_slots_without_parity():
    lines = snapshot_lines(estimates(), snapshot(parity="none"), 2, 4)
    assert lines == ["snapshot slots: 2 x 9.0 MiB = 18.0 MiB of shared memory per rank, 72.0 MiB per node"]


def test_two_nodes_hold_a_full_copy():
    lines = snapshot_lines(estimates(), snapshot(), 2, 1)
    assert lines[1] == (
        'snapshot parity memory ("xor" over 2 nodes): 2 x 9.0 MiB = 18.0 MiB per rank '
        "(a full copy of the other node's snapshot), 18.0 MiB per node"
    )


@pytest.mark.parametrize("num_nodes, parity_mib", [(3, 4.5), (4, 3.0), (10, 1.0)])
def test_parity_is_one_over_nodes_minus_one(num_nodes, parity_mib):
    line = snapshot_lines(estimates(), snapshot(), num_nodes, 2)[1]
    assert f"2 x {parity_mib:.1f} MiB = {2 * parity_mib:.1f} MiB per rank (1/{num_nodes - 1} of the snapshot)" in line
    assert line.endswith(f"{4 * parity_mib:.1f} MiB per node")


def test_one_node_says_parity_is_off():
    assert "needs two or more nodes" in snapshot_lines(estimates(), snapshot(), 1, 2)[1]


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--world-size", "6", "--nodes", "4"], "--world-size 6 is not a multiple of --nodes 4"),
        (["--nodes", "0"], "--nodes"),
    ],
)
def test_bad_nodes_is_one_line(args, problem):
    result = subprocess.run(
        [sys.executable, "-m", "memfit.launcher.cli", "estimate", "--params", "125M", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 2
    assert problem in result.stderr and "Traceback" not in result.stderr
