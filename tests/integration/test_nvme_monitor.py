"""The monitors report what the NVMe tier moves: each step's bytes read from and written to the
rank's swap file, which are exactly the swapped state of the owned tensors (nothing is read at the
first step, whose state is new)."""

import json

import pytest
import torch

import memfit


@pytest.mark.parametrize(
    "dtype, optimizer, swapped_bytes_per_param",
    [
        ("fp32", {"type": "AdamW", "params": {"lr": 1e-3}}, 8),  # the two moments; the fp32 parameter is the master
        ("bf16", {"type": "AdamW", "params": {"lr": 1e-3}}, 12),  # an fp32 master and the two moments
        ("fp32", {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}}, 4),  # torch-made state: the momentum
    ],
)
def test_the_monitor_reports_the_bytes_the_swap_file_moves_per_step(
    tmp_path, dtype, optimizer, swapped_bytes_per_param
):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    metrics = tmp_path / "metrics.jsonl"
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "bf16": {"enabled": dtype == "bf16"},
        "optimizer": optimizer,
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}},
        "memfit": {"jsonl_monitor": {"enabled": True, "path": str(metrics)}},
    }
    engine = memfit.initialize(model, config)
    for _ in range(3):
        inputs = torch.randn(4, 64).to(next(model.parameters()).dtype)
        engine.backward(engine(inputs).float().pow(2).mean())
        engine.step()
    engine.monitor.close()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    swapped = swapped_bytes_per_param * sum(p.numel() for p in model.parameters())
    moved = [(record["nvme_read_bytes"], record["nvme_written_bytes"]) for record in records]
    assert moved == [(0, swapped), (swapped, swapped), (swapped, swapped)]
    assert all(record["nvme_tier_bytes"] == engine.memory_report()["by_tier"]["nvme"] for record in records)


def test_the_streamed_stage3_step_reports_both_swap_files(tmp_path):
    """Stage 3 on one rank with everything on NVMe: after the first step each step writes the 12
    bytes of optimizer state, the 2-byte gradient and the 2-byte updated weight of every
    parameter, and reads at least those (state, gradient, weight at the update) plus the weights
    the forward gathers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    metrics = tmp_path / "metrics.jsonl"
    nvme = {"device": "nvme", "nvme_path": str(tmp_path)}
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "offload_optimizer": nvme,
            "offload_param": nvme,
        },
        "memfit": {"jsonl_monitor": {"enabled": True, "path": str(metrics)}},
    }
    engine = memfit.initialize(model, config)
    assert engine._stage3.streamed is not None
    for _ in range(3):
        engine.backward(engine(torch.randn(4, 64).to(torch.bfloat16)).float().pow(2).mean())
        engine.step()
    engine.monitor.close()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    numel = sum(p.numel() for p in model.parameters())
    for record in records[1:]:
        assert record["nvme_written_bytes"] == 16 * numel
        assert record["nvme_read_bytes"] >= 16 * numel + 2 * numel
