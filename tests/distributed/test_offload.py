"""offload_optimizer "cpu": training with masters and optimizer state in the host tier equals
training without it (2 ranks, stages 1 and 2, fp32 and bf16, accumulation and clipping, 10
steps): bit for bit for the same optimizer; Adam/AdamW become the fused kernel, which equals
torch's AdamW within 1e-6 in fp32 and within one bf16 rounding of the parameter in bf16.
Checkpoints move between offloaded and non-offloaded runs."""

import os
from dataclasses import replace

import pytest
import torch

import memfit
from memfit.config import ConfigError
from tests.distributed.equivalence import grid, run_engine
from tests.distributed.harness import run_ranks
from tests.distributed.models import EQUIVALENCE_MODELS, make_model

AXES = dict(
    stage=[1, 2],
    overlap=[True],
    accumulation=[3],
    clip=[0.5],
    optimizer=["AdamW", "CPUAdamW", "GaLoreAdamW", "FRUGAL", "SGD"],
    dtype=["float32", "bfloat16"],
    offload=["cpu", "none"],
    steps=[10],
)


def run_cases(rank, world_size, cases):
    return [run_engine(case, rank, world_size) for case in cases]


@pytest.mark.slow
@pytest.mark.parametrize("model", list(EQUIVALENCE_MODELS))  # one spawn per model: each well within the timeout
def test_offloaded_training_equals_training_without_offload(model):
    cases = grid(model=[model], **AXES)
    per_rank = run_ranks(run_cases, 2, cases)
    results = {case: per_rank[0][index] for index, case in enumerate(cases)}
    failures = []
    for case in cases:
        if case.offload != "cpu":
            continue
        offloaded, plain = results[case], results[replace(case, offload="none")]
        for name, value in plain.items():
            got = offloaded[name]
            if case.optimizer != "AdamW":  # the same optimizer on both sides: the same bits
                ok = torch.equal(got, value)
            elif case.dtype == "float32":  # the fused kernel against torch's AdamW
                ok = bool(((got - value).abs() <= 1e-6 * (1 + value.abs())).all())
            else:  # one bf16 rounding of the parameter
                ok = bool(((got - value).abs() <= 2**-7 * value.abs() + 1e-7).all())
            if not ok:
                failures.append(f"{case}: {name} differs by {float((got - value).abs().max()):.3g}")
    assert not failures, "\n".join(failures)


def run_cases_staged(rank, world_size, cases, staged):
    if staged:
        os.environ["MEMFIT_OFFLOAD_STAGED"] = "1"
    return [run_engine(case, rank, world_size) for case in cases]


@pytest.mark.slow
def test_the_staged_path_a_gpu_runs_equals_the_in_place_path():
    """Off the CPU, fp32 masters live in the tier apart from the compute parameters; gradients
    cross to the host and parameters back. Forced on the CPU, that path gives the same bits."""
    cases = grid(model=["moe", "single"], **{**AXES, "offload": ["cpu"], "steps": [4]})
    in_place = run_ranks(run_cases_staged, 2, cases, False)[0]
    staged = run_ranks(run_cases_staged, 2, cases, True)[0]
    for case, expected, got in zip(cases, in_place, staged):
        for name, value in expected.items():
            assert torch.equal(got[name], value), (case, name)


def offload_config(offload: str, stage: int = 2, dtype: str = "bfloat16") -> dict:
    return {
        "train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload}},
    }


def train(engine, steps, rank, world_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dtype = next(engine.module.parameters()).dtype
    for step in range(steps):
        inputs, targets = torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)
        per_rank = 8 // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        for micro in range(2):
            half = slice(mine.start + micro * per_rank // 2, mine.start + (micro + 1) * per_rank // 2)
            output = engine(inputs[half].to(dtype), route=rank, step=step).float()
            engine.backward(torch.nn.functional.mse_loss(output, targets[half]))
            engine.step()


def params_of(engine):
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def save_then_resume_across_settings(rank, world_size, root):
    """Save with offload, resume without, and the other way round; each resumed run must equal
    the run that kept its setting."""
    out = {}
    for saved_with, resumed_with in (("cpu", "none"), ("none", "cpu")):
        directory = os.path.join(root, f"{saved_with}-to-{resumed_with}")
        engine = memfit.initialize(make_model("moe"), offload_config(saved_with))
        train(engine, 2, rank, world_size)
        engine.save_checkpoint(directory)
        resumed = memfit.initialize(make_model("moe", seed=5), offload_config(resumed_with))
        resumed.load_checkpoint(directory)
        masters = {
            name: (resumed.optimizer.master_of(p) if hasattr(resumed.optimizer, "master_of") else m).detach().clone()
            for name, p, m in zip(resumed.masters.names, resumed.masters.compute, resumed.masters.masters)
        }
        out[(saved_with, resumed_with)] = (masters, params_of(engine), params_of(resumed), resumed.memory_report())
    return out


def test_checkpoints_move_between_offloaded_and_plain_runs(tmp_path):
    per_rank = run_ranks(save_then_resume_across_settings, 2, str(tmp_path))
    for rank in range(2):
        for (saved_with, resumed_with), (masters, saved, resumed, report) in per_rank[rank].items():
            for name, value in saved.items():
                assert torch.equal(resumed[name], value), (saved_with, resumed_with, name)
            for name, master in masters.items():
                assert master.dtype == torch.float32, name  # the fp32 master came back, not the bf16 value
            if resumed_with == "cpu":
                assert report["by_tier"]["host"] >= report["optimizer_state"] + report["master_weights"]


def offloaded_memory_report(rank, world_size):
    engine = memfit.initialize(make_model("tied"), offload_config("cpu", stage=2))
    train(engine, 1, rank, world_size)
    owned = sum(p.numel() for p in engine.masters.compute)
    return engine.memory_report(), owned, type(engine.optimizer).__name__


def test_host_tier_holds_exactly_masters_and_moments():
    for report, owned, optimizer in run_ranks(offloaded_memory_report, 2):
        assert optimizer == "CPUAdamW"  # Adam/AdamW run on the fused kernel under offload
        assert report["master_weights"] == 4 * owned
        assert report["optimizer_state"] == 8 * owned
        assert report["by_tier"]["host"] == report["master_weights"] + report["optimizer_state"]
        assert report["by_tier"]["device"] == report["params"] + report["grads"]
        assert report["peak_rss_bytes"] > 0


def test_stage_zero_with_offload_on_several_ranks_is_refused(tmp_path):
    path = tmp_path / "c.json"
    import json

    path.write_text(json.dumps(offload_config("cpu", stage=0)))
    from memfit.config import engine_gaps, load_config

    assert engine_gaps(load_config(str(path)), 2) == [
        'zero_optimization.offload_optimizer.device: "cpu" needs ZeRO stage 1 or 2 on more than one rank '
        "(at stage 0 every rank would keep all the state)"
    ]
    assert engine_gaps(load_config(str(path)), 1) == []
    assert run_ranks(initialize_error, 2, str(path)) == [f"{path}: " + engine_gaps(load_config(str(path)), 2)[0]] * 2


def initialize_error(rank, world_size, path):
    try:
        memfit.initialize(make_model("single"), path)
    except ConfigError as error:
        return str(error)
    return None
