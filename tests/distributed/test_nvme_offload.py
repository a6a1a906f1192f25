"""offload_optimizer "nvme": training with masters and optimizer state in a swap file equals
training with them in the host tier, bit for bit (2 ranks, stages 1 and 2, fp32 and bf16, 10
steps with accumulation and clipping; the fused kernel for Adam/AdamW/CPUAdamW, torch's step for
GaLoreAdamW, FRUGAL and SGD), including a rank that owns nothing and a layer without gradients
on some steps. Checkpoints move between the NVMe tier and the host tier, bit for bit."""

import os
from dataclasses import replace

import pytest
import torch

import memfit
from tests.distributed.equivalence import batches, config, grid, micro_batches
from tests.distributed.harness import run_ranks
from tests.distributed.models import make_model

CASES = grid(
    model=["moe", "sometimes", "single"],
    stage=[1, 2],
    overlap=[True],
    accumulation=[3],
    clip=[0.5],
    optimizer=["AdamW", "CPUAdamW", "GaLoreAdamW", "FRUGAL", "SGD"],
    dtype=["float32", "bfloat16"],
    offload=["cpu", "nvme"],
    steps=[10],
)
# the smallest ring buffer: every tensor is a sub-group of its own, so the pipeline runs
NVME = {"buffer_size": 3 * 4096, "buffer_count": 3}


def nvme_config(case, world_size: int, nvme_path: str) -> dict:
    result = config(case, world_size)
    if case.offload == "nvme":
        result["zero_optimization"]["offload_optimizer"].update(nvme_path=nvme_path, **NVME)
    return result


def run_case(case, rank: int, world_size: int, nvme_path: str) -> dict:
    engine = memfit.initialize(make_model(case.model), nvme_config(case, world_size, nvme_path))
    dtype = getattr(torch, case.dtype)
    for step, batch in enumerate(batches(case, world_size)):
        for inputs, targets in micro_batches(batch, rank, world_size, case.accumulation):
            output = engine(inputs.to(dtype), route=rank, step=step).float()
            engine.backward(torch.nn.functional.mse_loss(output, targets))
            engine.step()
    report = engine.memory_report()
    return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}, report


def run_cases(rank, world_size, cases, nvme_path):
    return [run_case(case, rank, world_size, nvme_path) for case in cases]


@pytest.mark.slow
def test_nvme_tier_training_equals_host_tier_training(tmp_path):
    per_rank = run_ranks(run_cases, 2, CASES, str(tmp_path))
    failures = []
    for rank in range(2):
        results = {case: per_rank[rank][index] for index, case in enumerate(CASES)}
        for case in CASES:
            if case.offload != "nvme":
                continue
            (streamed, report), (hosted, _) = results[case], results[replace(case, offload="cpu")]
            for name, value in hosted.items():
                if not torch.equal(streamed[name], value):
                    failures.append(
                        f"rank {rank} {case}: {name} differs by {float((streamed[name] - value).abs().max())}"
                    )
            if case.model != "single" or rank == 0:
                assert report["by_tier"]["nvme"] > 0, case
    assert not failures, "\n".join(failures)
    assert os.listdir(tmp_path) == [".memfit-swap.lock"]  # every swap file is gone with its engine


def nvme_offload_config(offload: str, nvme_path: str, optimizer: str = "AdamW") -> dict:
    params = {"lr": 1e-2, "weight_decay": 0.1}
    if optimizer == "GaLoreAdamW":
        params.update(rank=4, update_proj_gap=2, target_modules=["attn"])
    return {
        "train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "optimizer": {"type": optimizer, "params": params},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": offload, **({"nvme_path": nvme_path, **NVME} if offload == "nvme" else {})},
        },
    }


def train(engine, steps, rank, world_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        inputs, targets = torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)
        per_rank = 8 // world_size
        for micro in range(2):
            half = slice(rank * per_rank + micro * per_rank // 2, rank * per_rank + (micro + 1) * per_rank // 2)
            output = engine(inputs[half].to(torch.bfloat16), route=rank, step=step).float()
            engine.backward(torch.nn.functional.mse_loss(output, targets[half]))
            engine.step()


def params_of(engine):
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def save_move_and_continue(rank, world_size, root, optimizer):
    """Train 2 steps with each tier and save; resume every checkpoint with every tier and train 2
    more steps; all runs from the same checkpoint must end in the same bits."""
    nvme_path = os.path.join(root, "swap")
    os.makedirs(nvme_path, exist_ok=True)
    out = {}
    for saved_with in ("nvme", "cpu"):
        directory = os.path.join(root, f"saved-{saved_with}")
        engine = memfit.initialize(make_model("moe"), nvme_offload_config(saved_with, nvme_path, optimizer))
        train(engine, 2, rank, world_size)
        engine.save_checkpoint(directory)
        for resumed_with in ("nvme", "cpu"):
            resumed = memfit.initialize(
                make_model("moe", seed=5), nvme_offload_config(resumed_with, nvme_path, optimizer)
            )
            resumed.load_checkpoint(directory)
            train(resumed, 2, rank, world_size, seed=1)
            out[(saved_with, resumed_with)] = params_of(resumed)
            del resumed
        del engine
    return out


@pytest.mark.parametrize("optimizer", ["AdamW", "GaLoreAdamW"])
def test_checkpoints_move_between_nvme_and_host_tiers(tmp_path, optimizer):
    for per_rank in run_ranks(save_move_and_continue, 2, str(tmp_path), optimizer):
        for saved_with in ("nvme", "cpu"):
            reference = per_rank[(saved_with, "cpu")]
            for name, value in per_rank[(saved_with, "nvme")].items():
                assert torch.equal(value, reference[name]), (saved_with, name)
        for name, value in per_rank[("nvme", "nvme")].items():
            assert torch.equal(value, per_rank[("cpu", "cpu")][name]), name


STAGED_CASES = grid(
    model=["moe", "single"],
    stage=[2],
    overlap=[True],
    accumulation=[3],
    clip=[0.5],
    optimizer=["AdamW", "SGD"],
    dtype=["float32", "bfloat16"],
    offload=["cpu", "nvme"],
    steps=[4],
)


def run_staged_cases(rank, world_size, cases, nvme_path):
    os.environ["MEMFIT_OFFLOAD_STAGED"] = "1"  # the path a GPU runs: masters apart, copies both ways
    return run_cases(rank, world_size, cases, nvme_path)


def test_staged_nvme_tier_equals_staged_host_tier(tmp_path):
    """What a model off the CPU runs (fp32 masters apart from the compute parameters, gradients
    copied to the host, masters copied back), forced on the CPU."""
    per_rank = run_ranks(run_staged_cases, 2, STAGED_CASES, str(tmp_path))
    for rank in range(2):
        results = {case: per_rank[rank][index] for index, case in enumerate(STAGED_CASES)}
        for case in STAGED_CASES:
            if case.offload == "nvme":
                (streamed, report), (hosted, _) = results[case], results[replace(case, offload="cpu")]
                for name, value in hosted.items():
                    assert torch.equal(streamed[name], value), (rank, str(case), name)
                if case.model != "single" or rank == 0:  # fp32 too: the masters are on the swap
                    assert report["master_weights"] > 0, str(case)


def nvme_reports_and_estimates(rank, world_size, nvme_path):
    from memfit.runtime.estimate import estimate, shapes_of

    out = []
    generator = torch.Generator().manual_seed(0)
    for model_name in ("moe", "single"):
        for stage in (1, 2):
            for dtype in ("float32", "bfloat16"):
                for optimizer in ("AdamW", "GaLoreAdamW", "FRUGAL", "SGD"):
                    case = replace(CASES[0], model=model_name, stage=stage, dtype=dtype, optimizer=optimizer)
                    case = replace(case, offload="nvme", accumulation=2)
                    model = make_model(model_name)
                    shapes = shapes_of(model)
                    engine = memfit.initialize(model, nvme_config(case, world_size, nvme_path))
                    for step in range(2):  # every rank's route, so state exists for every owned tensor
                        for micro in range(2):
                            inputs, targets = (
                                torch.randn(2, 16, generator=generator),
                                torch.randn(2, 8, generator=generator),
                            )
                            output = engine(inputs.to(getattr(torch, dtype)), route=rank + micro, step=step).float()
                            engine.backward(torch.nn.functional.mse_loss(output, targets))
                            engine.step()
                    predicted = estimate(shapes, engine.config, world_size)[rank]
                    out.append((str(case), engine.memory_report(), predicted.bytes, predicted.tiers))
                    del engine
    return out


def test_estimate_plans_the_nvme_tier(tmp_path):
    """Categories within 5% of the measured ones; the swap file's size and the fused step's host
    ring exactly."""
    failures = []
    for results in run_ranks(nvme_reports_and_estimates, 2, str(tmp_path)):
        for case, report, predicted, tiers in results:
            for category in ("params", "grads", "master_weights", "optimizer_state"):
                measured, estimated = report[category], predicted[category]
                if abs(measured - estimated) > 0.05 * measured or (measured == 0) != (estimated == 0):
                    failures.append(f"{case}: {category} measured {measured}, estimated {estimated}")
            swap, planned = report["by_tier"]["nvme"], tiers["nvme"]
            kernel = " AdamW " in f" {case.split()[5]} "
            if swap != planned:
                failures.append(f"{case}: swap file holds {swap}, planned {planned}")
            if kernel and report["by_tier"]["host"] != tiers["host"]:
                failures.append(f"{case}: host ring {report['by_tier']['host']}, planned {tiers['host']}")
    assert not failures, "\n".join(failures[:40])
