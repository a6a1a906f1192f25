"""Checkpoints: per-tensor state saved at world size 2 loads at 1 and at 2 with identical state,
readable with weights_only=True; a resumed run continues exactly as the one that never stopped."""

import os

import torch

import memfit
from tests.distributed.harness import run_ranks
from tests.distributed.models import global_batches, make_mlp, micro_batches

GLOBAL_BATCH, ACCUMULATION = 8, 2


def config(stage):
    return {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 5}},
        "zero_optimization": {"stage": stage},
    }


def run_steps(engine, batches, rank, world_size):
    for batch in batches:
        for inputs, targets in micro_batches(batch, rank, world_size, ACCUMULATION):
            engine.backward(torch.nn.functional.mse_loss(engine(inputs), targets))
            engine.step()


def full_state(engine) -> dict:
    """Parameter values and per-name optimizer state held by this rank."""
    optimizer_state = engine.optimizer.state_dict()["state"]
    flat = [p for g in engine.optimizer.param_groups for p in g["params"]]
    name_of = {id(m): n for n, m in zip(engine.masters.names, engine.masters.masters)}
    state = {name_of[id(p)]: {k: v.clone() for k, v in optimizer_state[i].items()} for i, p in enumerate(flat)}
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {"params": params, "optimizer": state, "lr": engine.optimizer.param_groups[0]["lr"],
            "step": engine.global_step}


def save_after_training(rank, world_size, directory, stage):
    engine = memfit.initialize(make_mlp(), config(stage))
    batches = global_batches(5, GLOBAL_BATCH)
    run_steps(engine, batches[:3], rank, world_size)
    engine.save_checkpoint(directory, client_state={"data_position": 3})
    before = full_state(engine)
    run_steps(engine, batches[3:], rank, world_size)
    return before, full_state(engine)


def load_and_continue(rank, world_size, directory, stage):
    engine = memfit.initialize(make_mlp(seed=99), config(stage))  # different init: all must come from disk
    client = engine.load_checkpoint(directory)
    loaded = full_state(engine)
    run_steps(engine, global_batches(5, GLOBAL_BATCH)[client["data_position"]:], rank, world_size)
    return loaded, full_state(engine)


def merged(states):
    """Union of the per-rank optimizer states (each tensor is owned by one rank)."""
    return {name: s for state in states for name, s in state["optimizer"].items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert_same(a[name], b[name])
        else:
            assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name


def test_save_at_two_load_at_one_and_two(tmp_path):
    directory = str(tmp_path / "ckpt")
    saved = run_ranks(save_after_training, 2, directory, 2)
    tag_dir = os.path.join(directory, "global_step3")
    assert sorted(os.listdir(tag_dir)) == ["manifest.json", "rank0.pt", "rank1.pt"]
    for rank in range(2):
        payload = torch.load(os.path.join(tag_dir, f"rank{rank}.pt"), weights_only=True)
        assert payload["global_step"] == 3

    reloaded_two = run_ranks(load_and_continue, 2, directory, 2)
    reloaded_one = load_and_continue(0, 1, directory, 2)  # world size 1, in this process
    expected_optimizer = merged([before for before, _ in saved])
    for loaded in [loaded for loaded, _ in reloaded_two] + [reloaded_one[0]]:
        assert_same(loaded["params"], saved[0][0]["params"])
        assert loaded["lr"] == saved[0][0]["lr"] and loaded["step"] == 3
    assert_same(merged([loaded for loaded, _ in reloaded_two]), expected_optimizer)
    assert_same(reloaded_one[0]["optimizer"], expected_optimizer)

    # Resuming at the same world size continues bit for bit like the run that never stopped.
    never_stopped = [after for _, after in saved]
    resumed = [after for _, after in reloaded_two]
    for rank in range(2):
        assert_same(resumed[rank]["params"], never_stopped[rank]["params"])
        assert resumed[rank]["step"] == never_stopped[rank]["step"] == 5
    assert_same(merged(resumed), merged(never_stopped))
