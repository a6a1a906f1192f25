"""What training does under `memfit.deepspeed` equals what DeepSpeed does with the same config:
no clipping without a gradient_clipping key, stage 0's fp16 scale trajectory, gradients written
into p.grad by hand, and WarmupLR over an optimizer whose lr is a tensor."""

import math

import pytest
import torch

import memfit.deepspeed as deepspeed
from memfit.runtime.schedulers import WarmupLR


def one_weight_model(dtype=torch.float32) -> torch.nn.Module:
    model = torch.nn.Linear(2, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.zero_()
    return model


def start(model, optimizer=None, **config):
    config = {"train_micro_batch_size_per_gpu": 1, **config}
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def test_no_gradient_clipping_key_means_no_clipping():
    model = one_weight_model()
    engine = start(model)
    assert engine.config.gradient_clipping == 0.0
    loss = (engine(torch.tensor([[300.0, 400.0]])) + 0.0).sum()  # gradient (300, 400), norm 500
    engine.backward(loss)
    engine.step()
    assert model.weight.detach().tolist() == [[-30.0, -40.0]]


def test_gradient_clipping_auto_is_one():
    model = one_weight_model()
    engine = start(model, gradient_clipping="auto")
    engine.backward(engine(torch.tensor([[300.0, 400.0]])).sum())
    engine.step()
    assert torch.allclose(model.weight.detach(), torch.tensor([[-0.06, -0.08]]))


def step_on(engine, model, values):
    """DeepSpeed's dynamic-loss-scale tests: a gradient of `value` everywhere, written by hand."""
    scales = []
    for value in values:
        for param in model.parameters():
            param.grad = torch.full_like(param, value)
        engine.step()
        scales.append(engine.get_loss_scale())
    return scales


@pytest.mark.parametrize("stage", [0, 1])
def test_fp16_scale_trajectory_per_stage(stage):
    model = one_weight_model()
    fp16 = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2}
    engine = start(model, fp16=fp16, zero_optimization={"stage": stage})
    scales = step_on(engine, model, [math.inf, math.nan, 0.1, 0.1, 0.1])
    if stage == 0:  # DeepSpeed's FP16_Optimizer: no hysteresis
        assert scales == [128, 64, 64, 64, 128]
    else:  # its ZeRO optimizers: hysteresis 2 by default
        assert scales == [256, 128, 128, 128, 256]
    assert engine.skipped_steps == 2


def test_fp16_stage0_keeps_training_at_the_minimum_scale():
    model = one_weight_model()
    engine = start(model, fp16={"enabled": True, "initial_scale_power": 2})
    assert step_on(engine, model, [math.inf] * 4) == [2, 1, 1, 1]


def test_hand_written_gradients_are_stepped_on():
    model = one_weight_model()
    engine = start(model)
    model.weight.grad = torch.tensor([[1.0, 2.0]])
    engine.step()
    assert torch.allclose(model.weight.detach(), torch.tensor([[-0.1, -0.2]]))
    model.weight.grad.fill_(1.0)  # in place, into the gradient memfit keeps
    engine.step()
    assert torch.allclose(model.weight.detach(), torch.tensor([[-0.2, -0.3]]))
    engine.step()  # nothing written: the parameter stays
    assert torch.allclose(model.weight.detach(), torch.tensor([[-0.2, -0.3]]))


def test_hand_written_overflow_is_detected():
    model = one_weight_model()
    engine = start(model, fp16={"enabled": True, "initial_scale_power": 4})
    model.weight.grad = torch.tensor([[math.inf, 1.0]], dtype=model.weight.dtype)  # fp16: the model is half
    engine.step()
    assert engine.skipped_steps == 1 and model.weight.detach().tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("shape", [(), (1,)])
def test_warmup_lr_over_a_tensor_lr(shape):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=torch.full(shape, 0.03))
    schedule = WarmupLR(optimizer, warmup_num_steps=10, warmup_type="linear")
    assert float(optimizer.param_groups[0]["lr"]) == 0.0
    for _ in range(3):
        schedule.step()
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert math.isclose(float(optimizer.param_groups[0]["lr"]), 0.03 * 2 / 10, rel_tol=1e-6)
    for _ in range(20):
        schedule.step()
    assert math.isclose(float(optimizer.param_groups[0]["lr"]), 0.03, rel_tol=1e-6)
