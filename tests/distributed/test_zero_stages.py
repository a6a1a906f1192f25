"""Stages 0, 1 and 2 on 2 gloo ranks equal a single-process PyTorch reference, with gradient
accumulation and clipping; optimizer state and gradients are sharded about 1/N."""

import pytest
import torch

import memfit
from tests.distributed.harness import run_ranks
from tests.distributed.models import global_batches, make_mlp, micro_batches, reference_training

STEPS, GLOBAL_BATCH, ACCUMULATION = 4, 16, 2
GRID = [(stage, overlap) for stage in (0, 1, 2) for overlap in (False, True)]


def config(stage: int, overlap: bool, clip: float = 0.5, bucket: int = 300) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "zero_optimization": {"stage": stage, "overlap_comm": overlap, "reduce_bucket_size": bucket},
    }


def train(rank, world_size, cfg):
    engine = memfit.initialize(make_mlp(), cfg)
    dtype = next(engine.module.parameters()).dtype  # inputs in the compute dtype (bf16 when enabled)
    mid_accumulation = None
    for batch in global_batches(STEPS, GLOBAL_BATCH):
        for inputs, targets in micro_batches(batch, rank, world_size, ACCUMULATION):
            output = engine(inputs.to(dtype)).float()
            engine.backward(torch.nn.functional.mse_loss(output, targets))
            if mid_accumulation is None:  # after the first micro-step's backward, before any step
                report = engine.memory_report()
                mid_accumulation = report["grads"] - report["grad_staging"]
            engine.step()
    params = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    report = {
        **engine.memory_report(),
        "grads_after_reduce": engine.grad_bytes_after_reduce,
        "grads_mid_accumulation": mid_accumulation,
    }
    return params, report, engine.ownership(), engine.global_step


def train_grid(rank, world_size):
    return [train(rank, world_size, config(stage, overlap)) for stage, overlap in GRID]


def test_stages_match_single_process_and_shard_memory():
    expected = reference_training(STEPS, GLOBAL_BATCH, ACCUMULATION, 2, clip=0.5)
    per_rank = run_ranks(train_grid, 2)
    for index, (stage, overlap) in enumerate(GRID):
        for rank in range(2):
            params, _, _, global_step = per_rank[rank][index]
            assert global_step == STEPS
            for name, value in expected.items():
                torch.testing.assert_close(
                    params[name],
                    value,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=f"{name}: stage {stage} overlap {overlap} rank {rank}",
                )

    reports = {cfg: [per_rank[rank][index][1] for rank in range(2)] for index, cfg in enumerate(GRID)}
    total_state = reports[(0, False)][0]["optimizer_state"]
    total_grads = reports[(0, False)][0]["grads_after_reduce"]
    for stage in (1, 2):
        state = [report["optimizer_state"] for report in reports[(stage, False)]]
        assert sum(state) == total_state  # whole tensors, each held by exactly one rank
        assert all(abs(s - total_state / 2) <= 0.05 * total_state for s in state)
    assert all(r["grads_after_reduce"] == total_grads for r in reports[(1, False)])  # stage 1 keeps all
    stage2_grads = [report["grads_after_reduce"] for report in reports[(2, True)]]
    assert sum(stage2_grads) == total_grads
    assert all(abs(g - total_grads / 2) <= 0.05 * total_grads for g in stage2_grads)
    for overlap in (False, True):  # stage 2 sends gradients away on every micro-step, not just the boundary
        held = [report["grads_mid_accumulation"] for report in reports[(2, overlap)]]
        assert sum(held) == total_grads, (overlap, held)
    assert all(r["grads_mid_accumulation"] == total_grads for r in reports[(1, True)])

    ownership = [per_rank[rank][GRID.index((1, False))][2] for rank in range(2)]
    assert ownership[0] == ownership[1]  # every rank computed the same plan
    assert set(ownership[0]["owner_of"].values()) == {0, 1}


def train_bf16(rank, world_size):
    cfg = {**config(2, True), "bf16": {"enabled": True}}
    params, report, _, _ = train(rank, world_size, cfg)
    return params, report


@pytest.mark.slow
def test_bf16_owners_keep_fp32_masters():
    expected = reference_training(STEPS, GLOBAL_BATCH, ACCUMULATION, 2, clip=0.5)
    results = run_ranks(train_bf16, 2)
    owned_numel = 0
    for params, report in results:
        for name, value in expected.items():
            assert params[name].dtype == torch.bfloat16
            torch.testing.assert_close(params[name].float(), value, rtol=0, atol=3e-2, msg=name)
        assert report["master_weights"] % 4 == 0
        owned_numel += report["master_weights"] // 4
        assert report["params"] == sum(v.numel() for v in expected.values()) * 2  # bf16 compute copy
    assert owned_numel == sum(v.numel() for v in expected.values())  # each fp32 master held once
