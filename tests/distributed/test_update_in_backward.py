"""memfit.update_in_backward: under the streamed step with no clipping and no fp16, each tensor is
updated in backward as soon as its gradient of the boundary micro-step is final. Every case ends
bit for bit where stage 2 ends (tied, frozen, sometimes-unused and single tensors, fp32 and bf16,
accumulation, snapshots every step, a checkpoint resumed); no gradient of the boundary micro-step
reaches the swap file; a script that touches gradients between backward and step, or calls
backward twice, gets an error instead of a silently different step; where it cannot apply a
warning says why."""

import itertools
import uuid

import pytest
import torch

import memfit
from tests.distributed.equivalence import Case, batches, micro_batches
from tests.distributed.models import make_model
from tests.distributed.test_streamed_step import nvme_config


def backward_config(case: Case, stage: int, path: str, on: bool = True) -> dict:
    cfg = nvme_config(case, stage, path)
    cfg["memfit"] = {"update_in_backward": on}
    return cfg


def run(engine, case: Case, steps=None) -> None:
    dtype = getattr(torch, case.dtype)
    for step, batch in list(enumerate(batches(case, 1)))[steps or slice(None)]:
        for inputs, targets in micro_batches(batch, 0, 1, case.accumulation):
            output = engine(inputs.to(dtype), route=0, step=step).float()
            engine.backward(torch.nn.functional.mse_loss(output, targets))
            engine.step()


def whole(engine) -> dict:
    with engine.gathered_parameters():
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def assert_equal(got: dict, expected: dict, what) -> None:
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{what}: {name} differs by {(got[name] - value).abs().max()}"


def trained(case: Case, path: str, stage: int = 3, **extra) -> tuple[dict, object]:
    cfg = backward_config(case, stage, path)
    cfg.update(extra)
    engine = memfit.initialize(make_model(case.model), cfg)
    if stage == 3:
        assert engine._stage3.streamed.backward_update is not None, "update_in_backward is not in use"
    run(engine, case)
    return whole(engine), engine


FAST = [Case("tied", 3, True, 2, 0.0, "AdamW", "bfloat16"), Case("sometimes", 3, True, 3, 0.0, "AdamW", "float32")]
EVERY = [
    Case(model, 3, True, accumulation, 0.0, "AdamW", dtype)
    for model, dtype, accumulation in itertools.product(
        ["tied", "frozen", "sometimes", "single"], ["float32", "bfloat16"], [1, 3]
    )
]


@pytest.mark.parametrize("case", FAST, ids=str)
def test_update_in_backward_equals_stage2(tmp_path, case):
    expected = whole_of_stage2(case, tmp_path)
    got, engine = trained(case, str(tmp_path))
    assert_equal(got, expected, case)
    # only the earlier micro-steps' gradients went to the swap file: without the option, more
    plain = memfit.initialize(make_model(case.model), backward_config(case, 3, str(tmp_path), on=False))
    run(plain, case)
    assert engine._stage3.store.transferred_bytes[1] < plain._stage3.store.transferred_bytes[1]
    assert engine._stage3.store.transferred_bytes[0] < plain._stage3.store.transferred_bytes[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in EVERY if str(c) not in map(str, FAST)], ids=str)
def test_update_in_backward_equals_stage2_every_case(tmp_path, case):
    assert_equal(trained(case, str(tmp_path))[0], whole_of_stage2(case, tmp_path), case)


def whole_of_stage2(case: Case, tmp_path) -> dict:
    engine = memfit.initialize(make_model(case.model), backward_config(case, 2, str(tmp_path), on=False))
    run(engine, case)
    return whole(engine)


def test_update_in_backward_with_snapshots_and_a_checkpoint_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_SNAPSHOT_SHM_DIR", f"/dev/shm/memfit-test-{uuid.uuid4().hex[:10]}")
    case = Case("tied", 3, True, 2, 0.0, "AdamW", "bfloat16", steps=4)
    expected = whole_of_stage2(case, tmp_path)
    got, engine = trained(case, str(tmp_path), snapshot={"interval_steps": 1})
    engine.snapshotter.join_copy()
    assert_equal(got, expected, "snapshots every step")
    first = memfit.initialize(make_model(case.model), backward_config(case, 3, str(tmp_path)))
    run(first, case, slice(0, 2))
    first.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = memfit.initialize(make_model(case.model), backward_config(case, 3, str(tmp_path)))
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    run(resumed, case, slice(2, None))
    assert_equal(whole(resumed), expected, "resumed from a checkpoint")


def boundary_backward(engine, case: Case):
    inputs, targets = micro_batches(batches(case, 1)[0], 0, 1, 1)[0]
    loss = torch.nn.functional.mse_loss(engine(inputs.to(torch.bfloat16)).float(), targets)
    engine.backward(loss)
    return inputs, targets


@pytest.mark.parametrize("misuse", ["zero_grad", "module zero_grad", "assign", "second backward"])
def test_touching_gradients_between_backward_and_step_is_refused(tmp_path, misuse):
    case = Case("tied", 3, True, 1, 0.0, "AdamW", "bfloat16")
    engine = memfit.initialize(make_model(case.model), backward_config(case, 3, str(tmp_path)))
    inputs, targets = boundary_backward(engine, case)
    with pytest.raises(RuntimeError, match="memfit.update_in_backward: .*"):
        if misuse == "zero_grad":
            engine.optimizer.zero_grad()
        elif misuse == "module zero_grad":
            engine.module.zero_grad()
            engine.step()
        elif misuse == "assign":
            engine.module.embed.weight.grad = torch.zeros_like(engine.module.embed.weight)
            engine.step()
        else:
            engine.backward(torch.nn.functional.mse_loss(engine(inputs.to(torch.bfloat16)).float(), targets))


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"gradient_clipping": 0.5}, "gradient_clipping needs every gradient's norm"),
        ({"zero_optimization": {"stage": 2}}, "it needs the streamed step"),
    ],
)
def test_where_it_cannot_apply_a_warning_says_why(tmp_path, change, reason):
    case = Case("tied", 3, True, 1, 0.0, "AdamW", "bfloat16")
    cfg = backward_config(case, 3, str(tmp_path))
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    with pytest.warns(UserWarning, match=f"memfit.update_in_backward is off: {reason}"):
        engine = memfit.initialize(make_model(case.model), cfg)
    streamed = engine._stage3.streamed if engine._stage3 is not None else None
    assert streamed is None or streamed.backward_update is None


@pytest.mark.slow
def test_update_in_backward_with_tensors_kept_in_memory(tmp_path):
    """max_in_cpu keeps the first tensors (values and earlier micro-steps' gradients) in memory; the
    update in backward reads and writes them there."""
    case = Case("tied", 3, True, 2, 0.0, "AdamW", "bfloat16")
    cfg = backward_config(case, 3, str(tmp_path))
    cfg["zero_optimization"]["offload_param"]["max_in_cpu"] = 1000  # the first tensors, not all
    engine = memfit.initialize(make_model(case.model), cfg)
    run(engine, case)
    assert engine._stage3.store.kept_bytes > 0
    assert_equal(whole(engine), whole_of_stage2(case, tmp_path), "max_in_cpu")
