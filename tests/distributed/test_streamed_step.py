"""Stage 3 on one rank with parameters and optimizer state on NVMe: gradients leave memory as
backward produces them and the update reads each sub-group's weights and gradients from the swap
file. Every case ends bit for bit where stage 2 with the optimizer on NVMe ends: models with tied,
frozen and sometimes-unused tensors, fp32/bf16/fp16 (skipped overflow steps), accumulation,
clipping, and what scripts do to .grad (zero_grad mid-accumulation, two backwards per micro-step,
a step with no backward, a gradient assigned by hand)."""

import itertools
import os
import uuid

import pytest
import torch

import memfit
from tests.distributed.equivalence import Case, batches, config, micro_batches, pieces, run_reference
from tests.distributed.harness import run_ranks
from tests.distributed.models import make_model

NVME = {"buffer_size": 3 * 4096, "buffer_count": 3}  # small sub-groups: tensors split across them


def nvme_config(case: Case, stage: int, path: str, fp16: bool = False, world_size: int = 1) -> dict:
    cfg = config(case, world_size)
    cfg["zero_optimization"]["stage"] = stage
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": path, **NVME}
    if stage == 3:
        cfg["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": path}
    if fp16:  # a first scale of 2^18 overflows: the first steps are skipped, then the scale fits
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 18, "loss_scale_window": 2}
    return cfg


def train(
    case: Case,
    stage: int,
    path: str,
    fp16: bool = False,
    assign_at: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    update_in_backward: bool = False,
) -> dict:
    cfg = nvme_config(case, stage, path, fp16, world_size)
    if update_in_backward:
        cfg["memfit"] = {"update_in_backward": True}
    engine = memfit.initialize(make_model(case.model), cfg)
    if stage == 3:
        assert engine._stage3.streamed is not None, "the streamed step is not in use"
        assert (engine._stage3.streamed.backward_update is not None) == update_in_backward
    dtype = torch.float16 if fp16 else getattr(torch, case.dtype)
    if case.habit == "no_backward":
        for _ in range(case.accumulation):
            engine.step()
    for step, batch in enumerate(batches(case, world_size)):
        for micro_index, (inputs, targets) in enumerate(micro_batches(batch, rank, world_size, case.accumulation)):
            if case.habit == "zero_start" and micro_index == 0:
                engine.module.zero_grad()
                engine.optimizer.zero_grad()
            if case.habit == "zero_mid" and micro_index == 1:
                engine.module.zero_grad(set_to_none=step % 2 == 0)  # both ways of discarding
            for piece_inputs, piece_targets in pieces(case, inputs, targets):
                output = engine(piece_inputs.to(dtype), route=rank, step=step).float()
                engine.backward(torch.nn.functional.mse_loss(output, piece_targets))
            if assign_at == step and micro_index == case.accumulation - 1:
                for param in engine.module.parameters():
                    if param.requires_grad:
                        param.grad = torch.full(param.shape, 0.01, dtype=param.dtype)
            engine.step()
    if fp16:
        assert 0 < engine.skipped_steps < case.steps, engine.skipped_steps
    with engine.gathered_parameters():
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def assert_same(case: Case, tmp_path, **options) -> None:
    expected = train(case, 2, str(tmp_path), **options)
    got = train(case, 3, str(tmp_path), **options)
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{case} {options}: {name} differs by {(got[name] - value).abs().max()}"


FAST = [
    Case("tied", 3, True, 3, 0.5, "AdamW", "bfloat16"),
    Case("sometimes", 3, True, 2, 0.5, "CPUAdamW", "float32", habit="zero_mid"),
]


@pytest.mark.parametrize("case", FAST, ids=str)
def test_streamed_step_equals_stage2(tmp_path, case):
    assert_same(case, tmp_path)


def two_rank_runs(rank, world_size, root, cases, in_backward):
    """Per case: the parameters after stage 2 and after the streamed stage 3, on this rank."""
    path = os.path.join(root, f"rank{rank}")
    os.makedirs(path, exist_ok=True)
    where = dict(rank=rank, world_size=world_size)
    return [
        (train(case, 2, path, **where), train(case, 3, path, update_in_backward=in_backward, **where)) for case in cases
    ]


def assert_same_on_two_ranks(cases: list[Case], tmp_path, update_in_backward: bool = False) -> None:
    runs_per_rank = run_ranks(two_rank_runs, 2, str(tmp_path), cases, update_in_backward)
    for rank, runs in enumerate(runs_per_rank):
        for case, (expected, got) in zip(cases, runs):
            for name, value in expected.items():
                assert torch.equal(got[name], value), f"rank {rank}, {case}: {name} differs"


def test_streamed_step_on_two_ranks_equals_stage2(tmp_path):
    """Each owner's reduced gradients go to its swap file as the bucket's reduce completes: tied
    weights with accumulation, a layer no rank uses on some steps with zero_grad between
    micro-steps."""
    assert_same_on_two_ranks(
        [
            Case("tied", 3, True, 3, 0.5, "AdamW", "bfloat16"),
            Case("sometimes", 3, True, 2, 0.5, "AdamW", "float32", habit="zero_mid"),
        ],
        tmp_path,
    )


def test_update_in_backward_on_two_ranks_equals_stage2(tmp_path):
    """memfit.update_in_backward on two ranks: each owner updates a tensor when its bucket's reduce
    completes; a tensor no rank used in the boundary micro-step is updated with what an earlier
    one stored, or not at all when none stored anything."""
    cases = [
        Case("sometimes", 3, True, 2, 0.0, "AdamW", "bfloat16", habit="zero_mid"),
        Case("tied", 3, True, 3, 0.0, "AdamW", "float32"),
    ]
    assert_same_on_two_ranks(cases, tmp_path, update_in_backward=True)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_update_in_backward_on_two_ranks_every_case(tmp_path, overlap):
    cases = [
        Case(model, 3, overlap, accumulation, 0.0, "AdamW", dtype)
        for model, dtype, accumulation in itertools.product(
            ["tied", "frozen", "sometimes", "single"], ["float32", "bfloat16"], [1, 3]
        )
    ]
    assert_same_on_two_ranks(cases, tmp_path, update_in_backward=True)


def three_rank_runs(rank, world_size, root, cases, in_backward):
    path = os.path.join(root, f"rank{rank}")
    os.makedirs(path, exist_ok=True)
    where = dict(rank=rank, world_size=world_size)
    return [train(case, 3, path, update_in_backward=in_backward, **where) for case in cases]


@pytest.mark.slow
@pytest.mark.parametrize("in_backward", [False, True])
def test_streamed_step_on_three_ranks_equals_single_process(tmp_path, in_backward):
    """Three ranks: a bucket's reduce sums in an order that depends on where its elements lie in
    it, and the streamed step's buckets keep streamed tensors apart from the small ones, so the
    result is stage 2's within rounding rather than bit for bit; against plain PyTorch in one
    process it is within the equivalence table's tolerance. The single tensor leaves two ranks
    owning nothing."""
    clip = 0.0 if in_backward else 0.5
    cases = [
        Case("tied", 3, True, 2, clip, "AdamW", "float32"),
        Case("sometimes", 3, True, 2, clip, "AdamW", "float32", habit="zero_mid"),
        Case("single", 3, True, 3, clip, "AdamW", "bfloat16"),
    ]
    per_rank = run_ranks(three_rank_runs, 3, str(tmp_path), cases, in_backward)
    for index, case in enumerate(cases):
        expected = run_reference(case, 3)
        tolerance = 1e-6 if case.dtype == "float32" else 3e-2  # test_equivalence.py's
        for rank, runs in enumerate(per_rank):
            got = runs[index]
            for name, value in expected.items():
                allowed = tolerance * (1.0 + value.abs())
                assert ((got[name] - value).abs() <= allowed).all(), f"rank {rank}, {case}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_streamed_step_on_two_ranks_every_case(tmp_path, overlap):
    cases = [
        Case(model, 3, overlap, accumulation, 0.5, optimizer, dtype, habit=habit)
        for model, optimizer, dtype, accumulation, habit in [
            ("tied", "AdamW", "float32", 3, "none"),
            ("frozen", "AdamW", "bfloat16", 2, "twice"),
            ("sometimes", "FRUGAL", "bfloat16", 2, "none"),
            ("single", "AdamW", "float32", 2, "zero_start"),
            ("frozen", "GaLoreAdamW", "float32", 2, "no_backward"),
            ("tied", "SGD", "bfloat16", 1, "zero_mid"),
        ]
    ]
    assert_same_on_two_ranks(cases, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,dtype,habit",
    list(itertools.product(["tied", "frozen", "sometimes", "single"], ["float32", "bfloat16"], ["none", "twice"]))
    + [("tied", "bfloat16", habit) for habit in ("zero_start", "zero_mid", "no_backward")],
)
def test_streamed_step_equals_stage2_every_case(tmp_path, model, dtype, habit):
    assert_same(Case(model, 3, True, 3, 0.5, "AdamW", dtype, habit=habit), tmp_path)


@pytest.mark.parametrize(
    "case",
    [Case("tied", 3, True, 2, 0.5, "GaLoreAdamW", "bfloat16"), Case("sometimes", 3, True, 2, 0.5, "SGD", "float32")],
    ids=str,
)
def test_streamed_step_of_an_optimizer_torch_steps_equals_stage2(tmp_path, case):
    """GaLoreAdamW, FRUGAL, SGD: the update reads each sub-group's weights and gradients from the
    parameter swap file around the optimizer's own step()."""
    assert_same(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,optimizer,dtype,habit",
    [
        (model, optimizer, dtype, "none")
        for model, optimizer, dtype in itertools.product(
            ["tied", "frozen", "sometimes", "single"], ["GaLoreAdamW", "FRUGAL", "SGD"], ["float32", "bfloat16"]
        )
    ]
    + [("tied", "FRUGAL", "bfloat16", habit) for habit in ("zero_start", "zero_mid", "no_backward", "twice")],
)
def test_streamed_step_of_an_optimizer_torch_steps_every_case(tmp_path, model, optimizer, dtype, habit):
    assert_same(Case(model, 3, True, 3, 0.5, optimizer, dtype, habit=habit), tmp_path)


@pytest.mark.parametrize("clip", [0.0, 0.5])  # overflow seen by the gradients, or by their norm
def test_streamed_step_skips_fp16_overflow_as_stage2(tmp_path, clip):
    assert_same(Case("tied", 3, True, 2, clip, "AdamW", steps=6), tmp_path, fp16=True)


@pytest.mark.slow
def test_streamed_step_takes_a_gradient_assigned_by_hand(tmp_path):
    assert_same(Case("tied", 3, True, 2, 0.5, "AdamW", "bfloat16"), tmp_path, assign_at=1)


def test_gradients_rest_on_nvme_between_backward_and_step(tmp_path):
    """After backward a streamed tensor holds no gradient in memory: memory_report counts only the
    resident small tensors' gradients, and .grad is a marker of the tensor's shape, not its values."""
    case = Case("tied", 3, True, 2, 0.5, "AdamW", "bfloat16")
    engine = memfit.initialize(make_model("tied"), nvme_config(case, 3, str(tmp_path)))
    inputs, targets = micro_batches(batches(case, 1)[0], 0, 1, 2)[0]
    engine.backward(torch.nn.functional.mse_loss(engine(inputs.to(torch.bfloat16)).float(), targets))
    streamed = [p for p in engine.module.parameters() if engine._stage3.streamed.has_grad(p)]
    assert streamed, "no gradient went to the swap file"
    resident = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None)
    resident -= sum(p.numel() * p.element_size() for p in streamed)
    assert engine.memory_report()["grads"] == resident
    assert all(p.grad.shape == p.shape and p.grad.untyped_storage().nbytes() == 2 for p in streamed)


def test_a_streamed_run_saves_and_resumes_bit_for_bit(tmp_path):
    """A checkpoint saved between streamed steps (weights and state read from the swap files) and
    loaded into a fresh engine resumes exactly where the run that never stopped ends."""
    case = Case("tied", 3, True, 2, 0.5, "AdamW", "bfloat16", steps=4)
    batches_ = batches(case, 1)

    def steps(engine, chosen):
        for _, batch in chosen:
            for inputs, targets in micro_batches(batch, 0, 1, case.accumulation):
                engine.backward(torch.nn.functional.mse_loss(engine(inputs.to(torch.bfloat16)).float(), targets))
                engine.step()

    engine = memfit.initialize(make_model("tied"), nvme_config(case, 3, str(tmp_path)))
    steps(engine, list(enumerate(batches_))[:2])
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    steps(engine, list(enumerate(batches_))[2:])
    resumed = memfit.initialize(make_model("tied"), nvme_config(case, 3, str(tmp_path)))
    assert resumed._stage3.streamed is not None
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    steps(resumed, list(enumerate(batches_))[2:])
    with engine.gathered_parameters(), resumed.gathered_parameters():
        for (name, expected), (_, got) in zip(engine.module.named_parameters(), resumed.module.named_parameters()):
            assert torch.equal(got, expected), name


def test_snapshot_steps_read_the_weights_whole_and_train_as_stage2(tmp_path, monkeypatch):
    """With snapshots every step, each step reads the owned weights whole for the snapshot and the
    streamed update reads only the gradients: still stage 2's result."""
    monkeypatch.setenv("MEMFIT_SNAPSHOT_SHM_DIR", f"/dev/shm/memfit-test-{uuid.uuid4().hex[:10]}")
    case = Case("tied", 3, True, 2, 0.5, "AdamW", "bfloat16")
    expected = train(case, 2, str(tmp_path))
    engine_config = nvme_config(case, 3, str(tmp_path))
    engine_config["snapshot"] = {"interval_steps": 1}
    engine = memfit.initialize(make_model(case.model), engine_config)
    for step, batch in enumerate(batches(case, 1)):
        for inputs, targets in micro_batches(batch, 0, 1, case.accumulation):
            output = engine(inputs.to(torch.bfloat16), route=0, step=step).float()
            engine.backward(torch.nn.functional.mse_loss(output, targets))
            engine.step()
    engine.snapshotter.join_copy()
    with engine.gathered_parameters():
        for name, param in engine.module.named_parameters():
            assert torch.equal(param.detach().float(), expected[name]), name
