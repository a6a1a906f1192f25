"""fp16 with dynamic loss scaling on 2 ranks: an overflow on one rank only skips the step on
every rank (parameters, optimizer state and the schedule unchanged), the scale follows
DeepSpeed's rule, and the other steps match fp32 training that skips the same steps. Covered
with clipping (the norm finds the overflow) and without it (a separate check; on the host tier,
the fused kernel's own check)."""

import pytest
import torch

import memfit
from tests.distributed.harness import run_ranks
from tests.distributed.models import make_model

STEPS, OVERFLOW_STEPS = 8, (2, 3, 6)


def config(dtype: str, clip: float, stage: int, offload: str) -> dict:
    return {
        "train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2, "warmup_num_steps": 4, "warmup_type": "linear"},
        },
        "fp16": {"enabled": dtype == "float16", "initial_scale_power": 10, "loss_scale_window": 3, "hysteresis": 1},
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload}},
    }


def train(rank, world_size, dtype, clip, stage, offload):
    engine = memfit.initialize(make_model("moe"), config(dtype, clip, stage, offload))
    compute = next(engine.module.parameters()).dtype
    generator = torch.Generator().manual_seed(3)
    history = []
    for step in range(STEPS):
        inputs, targets = torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)
        before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        schedule_before = engine.lr_scheduler.last_batch_iteration
        for micro in range(2):
            start = rank * 4 + micro * 2
            output = engine(inputs[start : start + 2].to(compute), route=rank, step=step).float()
            loss = torch.nn.functional.mse_loss(output, targets[start : start + 2])
            if dtype == "float16" and step in OVERFLOW_STEPS and rank == 1 and micro == 1:
                loss = loss * float("inf")  # only rank 1 sees the overflow
            if dtype == "float32" and step in OVERFLOW_STEPS:
                continue  # the fp32 reference skips the same steps
            engine.backward(loss)
            engine.step() if dtype == "float16" or step not in OVERFLOW_STEPS else None
        if dtype == "float32" and step in OVERFLOW_STEPS:
            engine.micro_step += 2  # the reference's data position moves on; nothing is applied
            engine.global_step += 1
        after = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        unchanged = all(torch.equal(before[n], after[n]) for n in after)
        scale = engine.loss_scaler.scale if engine.loss_scaler else None
        history.append((unchanged, scale, schedule_before == engine.lr_scheduler.last_batch_iteration))
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return history, params, engine.skipped_steps, engine.global_step


@pytest.mark.parametrize(
    "clip, stage, offload",
    [(0.5, 2, "none")]  # the fast tier's case; every other combination in the slow tier
    + [
        pytest.param(clip, stage, offload, marks=pytest.mark.slow)
        for clip in (0.0, 0.5)
        for stage, offload in [(1, "none"), (2, "none"), (2, "cpu")]
        if (clip, stage, offload) != (0.5, 2, "none")
    ],
)
def test_overflow_on_one_rank_skips_everywhere_and_scale_follows_deepspeed(clip, stage, offload):
    fp16 = run_ranks(train, 2, "float16", clip, stage, offload)
    fp32 = run_ranks(train, 2, "float32", clip, stage, offload)
    # DeepSpeed's rule with window 3, hysteresis 1, from 2**10
    expected_scales = [1024, 1024, 512, 256, 256, 256, 128, 128]
    for rank in range(2):
        history, params, skipped, global_step = fp16[rank]
        assert skipped == len(OVERFLOW_STEPS) and global_step == STEPS
        for step, (unchanged, scale, schedule_unchanged) in enumerate(history):
            assert unchanged == (step in OVERFLOW_STEPS), step
            assert schedule_unchanged == (step in OVERFLOW_STEPS), step  # the schedule does not move on a skip
            assert scale == expected_scales[step], step
        reference = fp32[rank][1]
        for name, value in reference.items():
            torch.testing.assert_close(params[name], value, rtol=2e-2, atol=2e-3, msg=name)


def train_with_resume(rank, world_size, directory, resume_at):
    """fp16 with overflows on steps 2 and 3 (scale 1024 -> 256); with resume_at, a checkpoint is
    saved after that step and a fresh engine continues from it."""
    engine = memfit.initialize(make_model("moe"), config("float16", 0.5, 2, "none"))
    generator = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        inputs, targets = torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)
        for micro in range(2):
            start = rank * 4 + micro * 2
            output = engine(inputs[start : start + 2].half(), route=rank, step=step).float()
            loss = torch.nn.functional.mse_loss(output, targets[start : start + 2])
            if step in (2, 3) and rank == 1 and micro == 1:
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        if step + 1 == resume_at:
            engine.save_checkpoint(directory)
            engine = memfit.initialize(make_model("moe", seed=9), config("float16", 0.5, 2, "none"))
            engine.load_checkpoint(directory)
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return params, engine.loss_scaler.state_dict(), engine.skipped_steps


def test_resume_keeps_the_loss_scale_and_skipped_steps(tmp_path):
    straight = run_ranks(train_with_resume, 2, str(tmp_path / "unused"), None)
    resumed = run_ranks(train_with_resume, 2, str(tmp_path / "ckpt"), 5)
    for rank in range(2):
        params, scaler, skipped = resumed[rank]
        expected_params, expected_scaler, expected_skipped = straight[rank]
        assert scaler == expected_scaler and skipped == expected_skipped == 2
        for name, value in expected_params.items():
            assert torch.equal(params[name], value), name
