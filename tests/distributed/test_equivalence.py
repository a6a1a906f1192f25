"""N ranks under any stage and overlap give the parameters one process gets from plain
torch.optim on the concatenated batch: tied weights, a frozen layer, rank-routed experts, a layer
unused on some steps, a one-tensor model (a rank that owns nothing); accumulation, clipping;
AdamW, GaLoreAdamW, FRUGAL; fp32 and bf16; the user's zero_grad(), two backwards per step, a step
with no backward. All cases of a table run inside one spawned 2-rank process group.

The fast tier runs an all-pairs covering set of each table (every two-factor interaction, a few
dozen cases); the slow tier runs the full products.

Tolerances: fp32 within 1e-6 (absolute, and relative to the parameter); bf16 against the fp32
reference within BF16_TOLERANCE, which is a few bf16 roundings of parameters of magnitude ~0.5
accumulated over the steps (bf16 compute, bf16 gradient buffers and reductions, fp32 masters).

Set MEMFIT_EQUIVALENCE_REPORT=path to write every case with its max difference."""

import os

import pytest
import torch

from tests.distributed.equivalence import HABITS, Case, grid, max_difference, run_cases, run_reference
from tests.distributed.harness import run_ranks
from tests.distributed.models import EQUIVALENCE_MODELS
from tests.pairwise import all_pairs

WORLD_SIZE = 2
FP32_TOLERANCE = 1e-6
BF16_TOLERANCE = 3e-2

MAIN_AXES = dict(
    model=list(EQUIVALENCE_MODELS),
    stage=[0, 1, 2],
    overlap=[False, True],
    accumulation=[1, 3],
    clip=[0.0, 0.5],
    optimizer=["AdamW", "GaLoreAdamW", "FRUGAL"],
    dtype=["float32", "bfloat16"],
)
HABIT_AXES = dict(
    model=list(EQUIVALENCE_MODELS),
    stage=[0, 1, 2],
    overlap=[False, True],
    accumulation=[3],
    clip=[0.5],
    optimizer=["AdamW"],
    habit=[habit for habit in HABITS if habit != "none"],
)
# Stage 3 gathers each tensor from its owner where it is used, so every rank must run the same
# modules: the rank-routed experts are refused there (test_stage3_refuses_rank_dependent_modules).
STAGE3_MODELS = [model for model in EQUIVALENCE_MODELS if model != "moe"]
STAGE3_AXES = {**MAIN_AXES, "model": STAGE3_MODELS, "stage": [3]}
STAGE3_HABIT_AXES = {**HABIT_AXES, "model": STAGE3_MODELS, "stage": [3]}
MAIN_TABLE = grid(**MAIN_AXES)
HABIT_TABLE = grid(**HABIT_AXES)
STAGE3_TABLE = grid(**STAGE3_AXES) + grid(**STAGE3_HABIT_AXES)
PAIRWISE_TABLE = [Case(**row) for row in all_pairs(MAIN_AXES)] + [Case(**row) for row in all_pairs(HABIT_AXES)]
STAGE3_PAIRWISE_TABLE = [Case(**row) for row in all_pairs(STAGE3_AXES)] + [
    Case(**row) for row in all_pairs(STAGE3_HABIT_AXES)
]


def check_table(cases, report_name: str) -> None:
    per_rank = run_ranks(run_cases, WORLD_SIZE, cases)
    lines, failures = [], []
    for index, case in enumerate(cases):
        expected = run_reference(case, WORLD_SIZE)
        tolerance = FP32_TOLERANCE if case.dtype == "float32" else BF16_TOLERANCE
        worst = 0.0
        for rank in range(WORLD_SIZE):
            got = per_rank[rank][index]
            worst = max(worst, max_difference(got, expected))
            scale = {name: 1.0 + expected[name].abs() for name in expected}  # absolute near 0, relative beyond 1
            if any(((got[name] - expected[name]).abs() > tolerance * scale[name]).any() for name in expected):
                failures.append(f"{case} rank {rank}: max difference {max_difference(got, expected):.3g}")
        lines.append(f"{case}\t{worst:.3g}")
    path = os.environ.get("MEMFIT_EQUIVALENCE_REPORT")
    if path:
        with open(path, "a") as report:
            report.write(f"# {report_name}: {len(cases)} cases\n" + "\n".join(lines) + "\n")
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("model", list(EQUIVALENCE_MODELS))
def test_engine_equals_single_process_table(model):
    check_table([case for case in MAIN_TABLE if case.model == model], f"main table, {model}")


@pytest.mark.slow
def test_engine_equals_single_process_with_user_habits():
    check_table(HABIT_TABLE, "user habits")


def test_engine_equals_single_process_all_pairs():
    """Every pair of factor values of both tables meets in at least one case."""
    check_table(PAIRWISE_TABLE, "all pairs of the main and habit tables")


def test_stage3_equals_single_process_all_pairs():
    """Stage 3 (weights gathered at each use, biases kept whole): tied weights read transposed by
    the parent's forward, a frozen layer, a layer unused on some steps, a rank owning nothing."""
    check_table(STAGE3_PAIRWISE_TABLE, "all pairs at stage 3")


@pytest.mark.slow
def test_stage3_equals_single_process_table():
    check_table(STAGE3_TABLE, "stage 3 table")


def _routed_step(rank, world_size, overlap):
    from tests.distributed.equivalence import run_engine

    try:
        run_engine(Case("moe", 3, overlap, 1, 0.0, "AdamW"), rank, world_size)
    except RuntimeError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("overlap", [False, True])
def test_stage3_refuses_rank_dependent_modules(overlap):
    """Experts routed by rank make the ranks gather different tensors: the step stops with a clear
    error before it updates anything. With overlap_comm (stage 3's default) a bucket is reduced at a
    different moment on each rank; the reduces have a group of their own, so no gather is matched
    with one and the error still comes, rather than a hang."""
    for message in run_ranks(_routed_step, WORLD_SIZE, overlap):
        assert message.startswith("ZeRO stage 3: the ranks used different parameters since the last step"), message


def test_model_without_trainable_parameters_is_refused():
    import memfit

    model = torch.nn.Linear(4, 4)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="model: no trainable parameters"):
        memfit.initialize(model, {"train_micro_batch_size_per_gpu": 1})
