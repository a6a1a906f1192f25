"""Everything else keeps working at stage 3: every optimizer (the fused CPUAdamW, GaLoreAdamW,
FRUGAL, SGD), the host and NVMe tiers of optimizer offload, parameter offload to the host tier
and to NVMe, fp32 and bf16, accumulation and clipping. Stage 3 gathers the same values stage 2 holds and
reduces gradients the same way, so each case ends bit for bit where stage 2 ends.

The fast tier runs an all-pairs covering set of the factors; the slow tier the full product."""

import itertools
import os
from dataclasses import dataclass

import pytest
import torch

import memfit
from tests.distributed.equivalence import Case, batches, config, micro_batches
from tests.distributed.harness import run_ranks
from tests.distributed.models import make_model
from tests.pairwise import all_pairs

AXES = dict(
    model=["tied", "frozen", "sometimes", "single"],
    optimizer=["AdamW", "CPUAdamW", "GaLoreAdamW", "FRUGAL", "SGD"],
    dtype=["float32", "bfloat16"],
    offload=["none", "cpu", "nvme"],
    offload_param=["none", "cpu", "nvme"],
)
NVME = {"buffer_size": 3 * 4096, "buffer_count": 3}


@dataclass(frozen=True)
class Setup:
    model: str
    optimizer: str
    dtype: str
    offload: str
    offload_param: str


def run(setup: Setup, stage: int, rank: int, world_size: int, nvme_path: str) -> dict:
    case = Case(setup.model, stage, True, 3, 0.5, setup.optimizer, setup.dtype, offload=setup.offload, steps=4)
    cfg = config(case, world_size)
    if setup.offload == "nvme":
        cfg["zero_optimization"]["offload_optimizer"].update(nvme_path=nvme_path, **NVME)
    if stage == 3:
        cfg["zero_optimization"]["offload_param"] = {"device": setup.offload_param}
        if setup.offload_param == "nvme":
            cfg["zero_optimization"]["offload_param"]["nvme_path"] = nvme_path
    engine = memfit.initialize(make_model(setup.model), cfg)
    dtype = getattr(torch, setup.dtype)
    for step, batch in enumerate(batches(case, world_size)):
        for inputs, targets in micro_batches(batch, rank, world_size, case.accumulation):
            output = engine(inputs.to(dtype), route=rank, step=step).float()
            engine.backward(torch.nn.functional.mse_loss(output, targets))
            engine.step()
    with engine.gathered_parameters():
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def run_setups(rank, world_size, setups, nvme_path):
    return [
        (run(setup, 2, rank, world_size, nvme_path), run(setup, 3, rank, world_size, nvme_path)) for setup in setups
    ]


def check(setups, tmp_path) -> None:
    per_rank = run_ranks(run_setups, 2, setups, str(tmp_path))
    failures = []
    for rank in range(2):
        for setup, (stage2, stage3) in zip(setups, per_rank[rank]):
            for name, value in stage2.items():
                if not torch.equal(stage3[name], value):
                    difference = float((stage3[name] - value).abs().max())
                    failures.append(f"{setup} rank {rank}: {name} differs from stage 2 by {difference:.3g}")
    assert not failures, "\n".join(failures)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".swap")]  # swap files removed


def test_stage3_equals_stage2_all_pairs(tmp_path):
    check([Setup(**row) for row in all_pairs(AXES)], tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_stage3_equals_stage2_every_combination(tmp_path):
    setups = [Setup(*values) for values in itertools.product(*AXES.values())]
    check(setups, tmp_path)
