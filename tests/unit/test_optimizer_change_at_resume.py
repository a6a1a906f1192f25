"""A config whose optimizer changed between engine.save_checkpoint and engine.load_checkpoint, as
DeepSpeed decides it: the checkpoint's optimizer state, the config's hyperparameters (each
difference logged on rank 0); an optimizer whose state means something else is refused naming both,
and load_optimizer_states=False loads the weights alone."""

import logging

import pytest
import torch

import memfit
from memfit.checkpointing import CheckpointError

SAVED = {"type": "AdamW", "params": {"lr": 0.003, "weight_decay": 0.1}}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MEMFIT_CONFIG", raising=False)


def engine_with(optimizer: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    return memfit.initialize(model, {"train_micro_batch_size_per_gpu": 2, "optimizer": optimizer})


def train(engine, steps: int = 3) -> None:
    for _ in range(steps):
        engine.backward(engine(torch.ones(2, 8)).square().mean())
        engine.step()


@pytest.fixture
def saved(tmp_path):
    engine = engine_with(SAVED)
    train(engine)
    engine.save_checkpoint(tmp_path)
    return tmp_path, engine


def test_the_configs_hyperparameters_with_the_checkpoints_state(saved, caplog):
    directory, before = saved
    engine = engine_with({"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}, seed=1)
    with caplog.at_level(logging.INFO, logger="memfit"):
        engine.load_checkpoint(directory)
    group = engine.optimizer.param_groups[0]
    assert group["lr"] == 1e-4 and group["weight_decay"] == 0.0
    saved_state = before.optimizer.state_dict()["state"]
    for index, state in engine.optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], saved_state[index]["exp_avg"])
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("optimizer.params.lr: 0.0001 from the config, not 0.003 from") for m in messages)
    assert any(m.startswith("optimizer.params.weight_decay: 0.0 from the config, not 0.1 from") for m in messages)


def test_an_unchanged_config_logs_no_difference(saved, caplog):
    directory, _ = saved
    engine = engine_with(SAVED, seed=1)
    with caplog.at_level(logging.INFO, logger="memfit"):
        engine.load_checkpoint(directory)
    assert engine.optimizer.param_groups[0]["lr"] == 0.003
    assert not [r for r in caplog.records if r.getMessage().startswith("optimizer.params.")]


@pytest.mark.parametrize(
    "optimizer, named",
    [
        ({"type": "SGD", "params": {"lr": 0.01}}, "SGD"),
        ({"type": "Lamb", "params": {"lr": 0.01}}, "Lamb"),
        ({"type": "GaLoreAdamW", "params": {"lr": 0.01, "rank": 2, "target_modules": ["0"]}}, "GaLoreAdamW"),
        ({"type": "Adam", "params": {"lr": 0.01, "adam_w_mode": False}}, "Adam (adam_w_mode false"),
    ],
)
def test_another_kind_of_optimizer_is_refused_naming_both(saved, optimizer, named):
    directory, before = saved
    engine = engine_with(optimizer, seed=1)
    untouched = [p.detach().clone() for p in engine.module.parameters()]
    with pytest.raises(CheckpointError, match="load_optimizer_states=False") as refused:
        engine.load_checkpoint(directory)
    assert f"saved with optimizer AdamW, this job uses {named}" in str(refused.value)
    assert all(torch.equal(p, q) for p, q in zip(engine.module.parameters(), untouched))
    engine.load_checkpoint(directory, load_optimizer_states=False)  # the weights alone
    assert engine.global_step == before.global_step
    assert all(torch.equal(p, q) for p, q in zip(engine.module.parameters(), before.module.parameters()))
    assert engine.optimizer.param_groups[0]["lr"] == optimizer["params"]["lr"]
    train(engine, 1)  # and it trains on, from fresh optimizer state


def test_adam_with_decoupled_weight_decay_is_adamw(saved):
    directory, _ = saved
    engine = engine_with({"type": "Adam", "params": {"lr": 0.003, "weight_decay": 0.1}}, seed=1)
    engine.load_checkpoint(directory)
    assert engine.global_step == 3


@pytest.mark.parametrize("passed, refused", [(torch.optim.AdamW, False), (torch.optim.Adam, True)])
def test_a_passed_torch_optimizer_is_matched_by_what_its_state_means(saved, passed, refused):
    directory, _ = saved
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"params": {"lr": 0.003, "weight_decay": 0.1}}}
    engine = memfit.initialize(model, config, optimizer=passed)
    if refused:  # torch's Adam adds weight decay to the gradient: not AdamW's decoupled decay
        with pytest.raises(CheckpointError, match=r"AdamW, this job uses Adam \(adam_w_mode false"):
            engine.load_checkpoint(directory)
    else:
        engine.load_checkpoint(directory)
        assert engine.global_step == 3
