"""The DeepSpeed API that training scripts call, through `memfit.deepspeed`: the engine as an
nn.Module, its getters, DeepSpeed's submodules, built schedulers, partial checkpoint loads, and
the config keys and launcher flags DeepSpeed users bring."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

import memfit.deepspeed as deepspeed
from memfit.config import ConfigError, load_config
from memfit.runtime.schedulers import LRRangeTest, WarmupCosineLR

BASE = {"train_micro_batch_size_per_gpu": 1}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.linear(x))


def start(optimizer_lr=0.1, lr_scheduler=None, **config):
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=optimizer_lr)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config={**BASE, **config}
    )
    return engine, model


def train(engine, num_steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        engine.backward(engine(torch.randn(1, 3, generator=generator)).square().sum())
        engine.step()


def test_engine_is_an_nn_module_holding_the_model():
    engine, model = start()
    assert isinstance(engine, torch.nn.Module) and engine.module is model
    assert [name for name, _ in engine.named_parameters()] == ["module.linear.weight", "module.linear.bias"]
    assert [id(p) for p in engine.parameters()] == [id(p) for p in model.parameters()]
    assert list(engine.state_dict()) == ["module.linear.weight", "module.linear.bias"]
    assert engine.eval() is engine and not model.training and not model.dropout.training
    assert engine.train() is engine and model.dropout.training


def test_engine_getters():
    engine, _ = start(gradient_clipping=0.5, zero_optimization={"stage": 1})
    assert engine.zero_optimization_stage() == 1 and engine.gradient_clipping() == 0.5
    assert not engine.fp16_enabled() and not engine.bfloat16_enabled()
    assert engine.get_mom() == [(0.9, 0.999)] and engine.get_global_grad_norm() is None
    model = engine.module
    model.linear.weight.grad = torch.full((2, 3), 2.0)
    model.linear.bias.grad = torch.zeros(2)
    engine.step()
    assert math.isclose(engine.get_global_grad_norm(), math.sqrt(6 * 4.0), rel_tol=1e-6)
    assert engine.was_step_applied()
    bf16, _ = start(bf16={"enabled": True})
    assert bf16.bfloat16_enabled()


def test_was_step_applied_is_false_after_an_overflow_and_off_a_boundary():
    engine, model = start(fp16={"enabled": True, "initial_scale_power": 4}, gradient_accumulation_steps=2)
    for param in model.parameters():
        param.grad = torch.full_like(param, math.inf)
    engine.step()
    assert not engine.was_step_applied()  # not a boundary
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1


def test_no_sync():
    engine, _ = start()
    with engine.no_sync():
        train(engine, 1)
    stage2, _ = start(zero_optimization={"stage": 2})
    with pytest.raises(ValueError, match="^no_sync: not compatible with ZeRO stage 2"):
        with stage2.no_sync():
            pass


def test_deepspeed_module_names():
    import memfit.deepspeed.comm as dist
    from memfit.deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    assert deepspeed.comm is dist and dist.get_rank() == 0 and dist.get_world_size() == 1
    assert deepspeed.__version__ == "0.19.8" and deepspeed.__git_hash__.startswith("memfit-")
    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(3)]
    optimizers = [
        torch.optim.AdamW([params[0]], lr=0.1, weight_decay=0.01),
        FusedAdam([params[1]], lr=0.1, weight_decay=0.01),
        DeepSpeedCPUAdam([params[2]], lr=0.1, weight_decay=0.01),
    ]
    for step in range(3):
        for param, optimizer in zip(params, optimizers):
            param.grad = torch.arange(4.0) - step
            optimizer.step()
    assert torch.equal(params[0], params[1])
    torch.testing.assert_close(params[0], params[2])


def test_the_clients_optimizer_and_scheduler_are_the_ones_stepped():
    model = Net()
    client_optimizer = torch.optim.SGD(model.parameters(), lr=0.8)
    step_lr = torch.optim.lr_scheduler.StepLR(client_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when the optimizer's step is not tracked
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=client_optimizer, lr_scheduler=step_lr, config=BASE
        )
        train(engine, 3)
    assert optimizer is client_optimizer and engine.optimizer is client_optimizer
    assert scheduler is step_lr and engine.lr_scheduler is step_lr and step_lr.last_epoch == 3
    assert engine.get_lr() == [0.1]  # 0.8 halved at each of 3 steps


def test_without_an_optimizer_the_engine_runs_forward_only():
    schedule = {"type": "WarmupLR", "params": {}}
    with pytest.warns(UserWarning, match="^scheduler ignored: no optimizer to schedule"):
        engine, optimizer, _, scheduler = deepspeed.initialize(model=Net(), config={**BASE, "scheduler": schedule})
    assert optimizer is None and scheduler is None and engine.optimizer is None
    assert engine.get_lr() == [] and engine.get_mom() == []
    loss = engine(torch.ones(1, 3)).sum()
    with pytest.raises(ValueError, match="^backward: this engine has no optimizer"):
        engine.backward(loss)
    with pytest.raises(AssertionError, match="^step: this engine has no optimizer"):
        engine.step()


def test_misuse_is_a_value_error_and_the_assertion_error_deepspeed_raises():
    with pytest.raises(ValueError, match="^model: required") as info:
        deepspeed.initialize(model=None, config=BASE)
    assert isinstance(info.value, AssertionError)
    model = Net()
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), step_size=1)
    with pytest.raises(AssertionError, match="^lr_scheduler: built over another optimizer"):
        deepspeed.initialize(model=model, lr_scheduler=other, config=BASE)


@pytest.mark.parametrize("keep", ["optimizer", "scheduler", "module_only"])
def test_partial_checkpoint_loads(tmp_path, keep):
    schedule = {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_type": "linear"}}
    engine, model = start(scheduler=schedule)
    train(engine, 2)
    engine.save_checkpoint(tmp_path, tag="early")
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(engine, 3, seed=1)
    moments = {k: v.clone() for k, v in engine.optimizer.state[model.linear.weight].items() if torch.is_tensor(v)}
    lr, steps = engine.get_lr(), engine.global_steps
    flags = {
        "optimizer": {"load_optimizer_states": False},
        "scheduler": {"load_lr_scheduler_states": False},
        "module_only": {"load_module_only": True},
    }[keep]
    path, _ = engine.load_checkpoint(tmp_path, tag="early", **flags)
    assert path == str(tmp_path / "early")
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[name]), name
    state = engine.optimizer.state[model.linear.weight]
    kept_optimizer = keep != "scheduler"
    assert torch.equal(state["exp_avg"], moments["exp_avg"]) == kept_optimizer
    assert (engine.lr_scheduler.last_batch_iteration == 3 + 2 - 1) == (keep != "optimizer")
    assert (engine.global_steps == steps) == (keep == "module_only")
    assert (engine.get_lr() == lr) == (keep != "optimizer")


def test_lr_range_test_and_cosine_ratio():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = LRRangeTest(optimizer, lr_range_test_min_lr=0.01, lr_range_test_step_size=2, lr_range_test_step_rate=3)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(3):
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.025, 0.04, 0.055])
    stairs = LRRangeTest(optimizer, lr_range_test_min_lr=0.01, lr_range_test_step_size=2, lr_range_test_staircase=True)
    stairs.step()
    assert stairs.get_last_lr() == pytest.approx([0.01])
    stairs.step()
    assert stairs.get_last_lr() == pytest.approx([0.02])
    cosine = WarmupCosineLR(torch.optim.SGD([param], lr=1.0), total_num_steps=10, warmup_num_steps=2)
    assert cosine.get_lr_ratio() == 0.0


def test_config_keys_deepspeed_users_bring():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(
            {
                **BASE,
                "comms_config": {"verbose": False},
                "gradient_allreduce_op": "SUM",
                "data_types": {"grad_accum_dtype": None},
                "communication_data_type": "fp32",
                "checkpoint": {"tag_validation": "Warn"},
                "dataloader_drop_last": True,
                "scheduler": {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 0.01}},
            }
        )
    assert config.gradient_allreduce_op == "sum" and config.dataloader_drop_last
    messages = [str(w.message) for w in caught]
    assert (
        "config: comms_config: unknown key (did you mean 'comms_logger'?); ignored, as DeepSpeed ignores unknown "
        "top-level keys"
    ) in messages
    with pytest.raises(ConfigError, match=r"zero_optimization.stgae: unknown key \(did you mean 'stage'\?\)"):
        load_config({**BASE, "zero_optimization": {"stgae": 2}})
    with pytest.raises(ConfigError, match=r"data_types: grad_accum_dtype \"fp32\" is supported by DeepSpeed"):
        load_config({**BASE, "data_types": {"grad_accum_dtype": "fp32"}})


def test_llama_factory_z2_config_with_its_extra_sections_loads():
    shipped = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 2},
        "comms_config": {"verbose": False},
        "monitor_config": {"enabled": False},
    }
    with pytest.warns(UserWarning, match="monitor_config: unknown key"):
        load_config(shipped)


def test_memfit_run_config_reaches_deepspeed_initialize(tmp_path, monkeypatch):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({**BASE, "gradient_clipping": 0.25}))
    monkeypatch.setenv("MEMFIT_CONFIG", str(config))  # what `memfit run --config` sets for its workers
    engine, *_ = deepspeed.initialize(model=Net(), model_parameters=Net().parameters())
    assert engine.gradient_clipping() == 0.25


def test_memfit_run_checks_deepspeed_config_before_launch(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stgae": 2}}')
    for flags in (["--deepspeed_config", str(bad)], [f"--deepspeed_config={bad}"]):
        result = subprocess.run(
            [sys.executable, "-m", "memfit.launcher.cli", "run", "--nproc-per-node", "1", "train.py", "--deepspeed"]
            + flags,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"memfit run: {bad}: zero_optimization.stgae: unknown key (did you mean 'stage'?)"
        ]


@pytest.mark.parametrize("drop_last, num_batches", [(False, 3), (True, 2)])
def test_dataloader_drop_last(drop_last, num_batches):
    data = torch.utils.data.TensorDataset(torch.zeros(5, 3))
    model = Net()
    _, _, loader, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        training_data=data,
        config={"train_micro_batch_size_per_gpu": 2, "dataloader_drop_last": drop_last},
    )
    assert len(loader) == num_batches
