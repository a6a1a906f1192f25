"""DeepSpeed's tests/unit/runtime/test_ds_initialize.py re-written against memfit.deepspeed, with
the same configs and the same client optimizers and schedulers. Out of scope, so not ported:
TestOptimizerImplementation, its 12 ZeRO stage-3 cases included (it checks which of DeepSpeed's
own optimizer wrappers each stage, dtype, amp and grad_accum_dtype combination gets; memfit has
none of those wrappers, refuses amp and accepts only a null grad_accum_dtype) and
TestBf16ZeRO0UnfusedOptimizer (DeepSpeed's internal BF16 wrapper).

Deliberate differences, marked where they occur:
- the config's "Adam" is torch's Adam/AdamW class (fused where torch has a kernel) rather than
  DeepSpeed's FusedAdam class. The math is the same (memfit's FusedAdam equals torch's AdamW bit
  for bit); the class stays torch's so that an "Adam" config runs torch's fused kernel, which
  updates every tensor in one call, where memfit's FusedAdam updates one tensor at a time."""

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR

import memfit.deepspeed as deepspeed
from memfit.runtime.schedulers import OneCycle, WarmupLR
from tests.compat.deepspeed_models import ClassifierWithLoss, random_batches


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_start_method_safety(method):
    import torch.multiprocessing as mp

    previous = mp.get_start_method(allow_none=True)
    mp.set_start_method(method, force=True)
    mp.set_start_method(previous, force=True)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_no_optim(zero_stage):
    config = {"train_batch_size": 1, "zero_optimization": {"stage": zero_stage, "offload_param": {"device": "cpu"}}}
    config["bf16"] = {"enabled": True}
    # memfit: with offload_param "cpu" zero.Init builds normally; initialize partitions the model
    with deepspeed.zero.Init(enabled=zero_stage == 3, config_dict_or_path=config):
        model = ClassifierWithLoss(4, num_layers=78)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    for inputs, labels in random_batches(50, 1, 4, dtype=torch.bfloat16):
        engine(inputs, labels)


def adam_callable(params):
    return torch.optim.AdamW(params=params)


@pytest.mark.parametrize("optimizer_type", [None, "Optimizer", "Callable"])
def test_client_optimizer(optimizer_type):
    model = ClassifierWithLoss(10)
    config = {"train_batch_size": 1}
    client = {None: None, "Optimizer": torch.optim.Adam(model.parameters()), "Callable": adam_callable}[optimizer_type]
    if optimizer_type is None:
        config["optimizer"] = {"type": "Adam"}
    _, optimizer, _, _ = deepspeed.initialize(
        config=config, model=model, model_parameters=list(model.parameters()), optimizer=client
    )
    if client is None:
        assert isinstance(optimizer, torch.optim.Adam)  # memfit: torch's Adam (DeepSpeed: FusedAdam)
    elif isinstance(client, torch.optim.Optimizer):
        assert optimizer == client
    else:
        assert isinstance(optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("client_parameters", [True, False])
def test_config_optimizer(client_parameters):
    model = ClassifierWithLoss(10)
    config = {"train_batch_size": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}}
    parameters = list(model.parameters()) if client_parameters else None
    _, optimizer, _, _ = deepspeed.initialize(config=config, model=model, model_parameters=parameters)
    assert isinstance(optimizer, torch.optim.Adam)  # memfit: torch's Adam (DeepSpeed: FusedAdam)


def my_lambda(epoch):
    return epoch // 10


@pytest.mark.parametrize("scheduler_type", [None, "LRScheduler", "Callable"])
@pytest.mark.parametrize("optimizer_type", [None, "Optimizer", "Callable"])
def test_client_lr_scheduler(scheduler_type, optimizer_type):
    model = ClassifierWithLoss(10)
    config = {"train_batch_size": 1}
    client_optimizer = None
    if optimizer_type is None:
        config["optimizer"] = {"type": "Adam"}
    elif optimizer_type == "Optimizer":
        client_optimizer = torch.optim.Adam(model.parameters())
    else:
        client_optimizer = adam_callable
    client_scheduler = None
    if scheduler_type is None:
        config["scheduler"] = {"type": "WarmupLR", "params": {}}
    elif scheduler_type == "LRScheduler":
        if isinstance(client_optimizer, torch.optim.Optimizer):
            client_scheduler = LambdaLR(client_optimizer, my_lambda)
        else:  # the invalid combination: a scheduler over another optimizer
            client_scheduler = LambdaLR(torch.optim.Adam(model.parameters()), my_lambda)
    else:
        client_scheduler = lambda optimizer: LambdaLR(optimizer, my_lambda)  # noqa: E731
    arguments = dict(config=config, model=model, model_parameters=list(model.parameters()))
    arguments |= dict(optimizer=client_optimizer, lr_scheduler=client_scheduler)
    if isinstance(client_scheduler, LambdaLR) and not isinstance(client_optimizer, torch.optim.Optimizer):
        with pytest.raises(AssertionError):
            deepspeed.initialize(**arguments)
        return
    _, _, _, scheduler = deepspeed.initialize(**arguments)
    if client_scheduler is None:
        assert isinstance(scheduler, WarmupLR)
    elif isinstance(client_scheduler, LambdaLR):
        assert scheduler == client_scheduler
    else:
        assert isinstance(scheduler, LambdaLR)


def client_adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.01)


@pytest.mark.parametrize("scheduler_type", [None, "LRScheduler", "Callable"])
@pytest.mark.parametrize(
    "case, config_schedule, built, from_callable",
    [
        ("same", {"type": "WarmupLR", "params": {}}, LambdaLR, LambdaLR),
        ("diff", {"type": "WarmupLR", "params": {}}, LambdaLR, StepLR),
        (
            "onecycle_steplr",
            {"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 0.1}},
            StepLR,
            OneCycleLR,
        ),  # fmt: skip
    ],
)
def test_client_lr_scheduler_init(scheduler_type, case, config_schedule, built, from_callable):
    model = ClassifierWithLoss(10)
    config = {"train_batch_size": 1}
    optimizer = client_adam(model)
    make = {
        LambdaLR: lambda opt: LambdaLR(opt, my_lambda),
        StepLR: lambda opt: StepLR(opt, step_size=30),
        OneCycleLR: lambda opt: OneCycleLR(opt, max_lr=0.01, total_steps=200),
    }
    client_scheduler = None
    if scheduler_type is None:
        config["scheduler"] = config_schedule
    elif scheduler_type == "LRScheduler":
        client_scheduler = make[built](optimizer)
    else:
        client_scheduler = make[from_callable]
    _, _, _, scheduler = deepspeed.initialize(
        config=config, model=model, model_parameters=list(model.parameters()), optimizer=optimizer,
        lr_scheduler=client_scheduler,
    )  # fmt: skip
    if scheduler_type is None:
        assert isinstance(scheduler, OneCycle if case == "onecycle_steplr" else WarmupLR)
        assert not isinstance(scheduler, LambdaLR)
    elif scheduler_type == "LRScheduler":
        assert isinstance(scheduler, built)
        assert not isinstance(scheduler, WarmupLR)
    else:
        assert isinstance(scheduler, from_callable)
