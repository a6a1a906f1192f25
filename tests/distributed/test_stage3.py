"""ZeRO stage 3 beyond the equivalence table: checkpoints that move between stages 2 and 3 and
world sizes 1 and 2 and resume bit for bit, save_16bit_model gathering tensor by tensor,
deepspeed.zero.GatheredParameters with a modifier rank, and what a rank holds between steps."""

import os

import pytest
import torch
from safetensors.torch import load_file

import memfit
import memfit.deepspeed as deepspeed
from tests.distributed.harness import run_ranks
from tests.distributed.models import TiedModel, global_batches, micro_batches

GLOBAL_BATCH, ACCUMULATION, STEPS, SAVED_AT = 8, 2, 5, 3


def config(stage: int, dtype: str = "float32", **zero) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 20, **zero},
    }


def tied_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TiedModel()


def train(engine, batches, rank, world_size):
    dtype = next(engine.module.parameters()).dtype
    for batch in batches:
        for inputs, targets in micro_batches(batch, rank, world_size, ACCUMULATION):
            engine.backward(torch.nn.functional.mse_loss(engine(inputs.to(dtype)).float(), targets))
            engine.step()


def whole_params(engine) -> dict:
    with engine.gathered_parameters():
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def save_and_resume(rank, world_size, root, dtype):
    """(never stopped, resumed at the same stage, at the other stage) for saves at stages 3 and 2."""
    batches = global_batches(STEPS, GLOBAL_BATCH, seed=5)
    results = {}
    for saved_stage, other_stage in ((3, 2), (2, 3)):
        directory = os.path.join(root, f"{dtype}-stage{saved_stage}")
        engine = memfit.initialize(tied_model(), config(saved_stage, dtype))
        train(engine, batches[:SAVED_AT], rank, world_size)
        engine.save_checkpoint(directory)
        train(engine, batches[SAVED_AT:], rank, world_size)
        runs = {"never stopped": whole_params(engine)}
        for stage in (saved_stage, other_stage):
            resumed = memfit.initialize(tied_model(seed=9), config(stage, dtype))
            resumed.load_checkpoint(directory)
            train(resumed, batches[SAVED_AT:], rank, world_size)
            runs[f"resumed at stage {stage}"] = whole_params(resumed)
        results[saved_stage] = runs
    return results


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoints_move_between_stages_and_world_sizes(tmp_path, dtype):
    per_rank = run_ranks(save_and_resume, 2, str(tmp_path), dtype)
    for saved_stage in (3, 2):
        for rank in range(2):
            runs = per_rank[rank][saved_stage]
            for label, params in runs.items():
                for name, value in params.items():
                    assert torch.equal(value, runs["never stopped"][name]), f"saved at {saved_stage}, {label}: {name}"
    # the stage-3 checkpoint resharded onto one rank, at stage 3
    engine = memfit.initialize(tied_model(seed=9), config(3, dtype))
    engine.load_checkpoint(str(tmp_path / f"{dtype}-stage3"))
    train(engine, global_batches(STEPS, GLOBAL_BATCH, seed=5)[SAVED_AT:], 0, 1)
    tolerance = 1e-6 if dtype == "float32" else 3e-2
    for name, value in whole_params(engine).items():
        torch.testing.assert_close(value, per_rank[0][3]["never stopped"][name], rtol=tolerance, atol=tolerance)


def export_and_modify(rank, world_size, root):
    engine = memfit.initialize(tied_model(), config(3, "bfloat16", stage3_gather_16bit_weights_on_model_save=True))
    train(engine, global_batches(2, GLOBAL_BATCH), rank, world_size)
    engine.save_16bit_model(root, "model.safetensors")
    expected = {name: p.clone() for name, p in whole_bf16(engine).items()}
    refused = memfit.initialize(tied_model(), config(3))
    written_without_flag = refused.save_16bit_model(os.path.join(root, "refused"), "model.safetensors")

    weight = engine.module.embed.weight
    with deepspeed.zero.GatheredParameters(weight, modifier_rank=1):
        if rank == 1:
            weight.data.fill_(0.25)
    with deepspeed.zero.GatheredParameters([weight]):
        seen_after = weight.detach().clone()
    owner_master = None
    if engine.ownership()["owner_of"]["embed.weight"] == rank:
        owner_master = engine.masters.masters[engine.masters.names.index("embed.weight")].detach().clone()
    return expected, written_without_flag, seen_after, owner_master


def whole_bf16(engine) -> dict:
    with engine.gathered_parameters():
        return {name: p.detach().clone() for name, p in engine.module.state_dict(keep_vars=True).items()}


def test_save_16bit_model_and_gathered_parameters(tmp_path):
    per_rank = run_ranks(export_and_modify, 2, str(tmp_path))
    written = load_file(str(tmp_path / "model.safetensors"))
    expected = per_rank[0][0]
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        assert value.dtype == torch.bfloat16 and torch.equal(written[name], value), name
    assert [result[1] for result in per_rank] == [False, False]  # no gather flag: nothing written
    assert not os.path.exists(tmp_path / "refused" / "model.safetensors")
    for _, _, seen_after, owner_master in per_rank:
        assert torch.equal(seen_after, torch.full_like(seen_after, 0.25))  # rank 1's change, on every rank
        if owner_master is not None:  # and in the owner's fp32 master, which the next step updates
            assert owner_master.dtype == torch.float32 and torch.equal(
                owner_master, torch.full_like(owner_master, 0.25)
            )
    assert sum(result[3] is not None for result in per_rank) == 1


def held_between_steps(rank, world_size):
    engine = memfit.initialize(tied_model(), config(3, stage3_param_persistence_threshold=20))
    train(engine, global_batches(2, GLOBAL_BATCH), rank, world_size)
    owner_of = engine.ownership()["owner_of"]
    expected = whole = 0
    for name, param in engine.module.named_parameters():
        num_bytes = param.ds_numel * param.element_size()
        whole += num_bytes
        if owner_of.get(name) == rank or param.ds_numel < 20:
            expected += num_bytes
    return engine.memory_report()["params"], expected, whole


def test_a_rank_holds_only_what_it_owns_between_steps():
    for held, expected, whole in run_ranks(held_between_steps, 2):
        assert held == expected and held < whole


def test_parameters_on_nvme_at_world_size_one(tmp_path):
    """offload_param "nvme" on one rank: between uses each tensor rests in the swap file only (the
    model holds just the small ones), training ends bit for bit as at stage 2, and a checkpoint
    saved with the tensors on NVMe resumes exactly."""
    swap_dir = tmp_path / "swap"
    swap_dir.mkdir()
    nvme = {"offload_param": {"device": "nvme", "nvme_path": str(swap_dir)}}
    batches = global_batches(STEPS, GLOBAL_BATCH, seed=5)
    plain = memfit.initialize(tied_model(), config(2, "bfloat16"))
    train(plain, batches, 0, 1)
    engine = memfit.initialize(tied_model(), config(3, "bfloat16", **nvme))
    train(engine, batches[:SAVED_AT], 0, 1)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    train(engine, batches[SAVED_AT:], 0, 1)
    report = engine.memory_report()
    small = sum(p.ds_numel * p.element_size() for p in engine.module.parameters() if p.ds_numel < 20)
    assert report["params"] == small and report["by_tier"]["nvme"] > 0
    assert [name for name in os.listdir(swap_dir) if name.endswith(".swap")]  # the file exists while training
    resumed = memfit.initialize(tied_model(seed=9), config(3, "bfloat16", **nvme))
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    train(resumed, batches[SAVED_AT:], 0, 1)
    expected = whole_params(plain)
    for run in (engine, resumed):
        for name, value in whole_params(run).items():
            assert torch.equal(value, expected[name]), name


def _reduce_group_timeout(rank, world_size, store_path):
    import datetime

    import torch.distributed as dist

    dist.destroy_process_group()  # the harness's group has torch's 30-minute default, as new_group does
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300)
    )
    engine = memfit.initialize(tied_model(), config(3, "bfloat16"))
    group = engine._grad_sync.reducer.group
    assert group is not None and group is not dist.group.WORLD
    another = memfit.initialize(tied_model(), config(3, "bfloat16"))
    assert another._grad_sync.reducer.group is group  # one per job, not one per engine
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_stage3_reduces_run_on_a_group_with_the_default_groups_timeout(tmp_path):
    """At stage 3 the gradient reduces have a process group of their own (a bucket launched at a
    different moment on each rank is never matched with a gather): it waits as long as the group
    the job made (collective_timeout_s), not torch's 30-minute default for a new group, and every
    engine of the process shares it."""
    assert run_ranks(_reduce_group_timeout, 2, str(tmp_path / "store")) == [300.0, 300.0]
