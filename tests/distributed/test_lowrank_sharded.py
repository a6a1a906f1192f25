"""GaLore and FRUGAL from a JSON-style config, under ZeRO 1 and 2 on 2 gloo ranks, equal the same
optimizer in a single process: each owner projects the whole matrices it owns."""

import torch

import memfit
from tests.distributed.harness import run_ranks
from tests.distributed.models import global_batches, make_block, micro_batches

STEPS, GLOBAL_BATCH, ACCUMULATION = 7, 8, 2
OPTIMIZERS = {
    "galore": {"type": "GaLoreAdamW", "params": {"lr": 1e-2, "rank": 4, "update_proj_gap": 3, "scale": 0.5}},
    "galore-reset": {
        "type": "GaLoreAdamW",
        "params": {"lr": 1e-2, "rank": 4, "update_proj_gap": 3, "moments_on_refresh": "reset"},
    },
    "frugal-svd": {"type": "FRUGAL", "params": {"lr": 1e-2, "density": 0.25, "update_gap": 3, "proj_type": "svd"}},
    "frugal-random": {
        "type": "FRUGAL",
        "params": {"lr": 1e-2, "density": 0.25, "update_gap": 3, "proj_type": "random"},
    },
}


def config(optimizer, stage):
    return {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": ACCUMULATION,
        "gradient_clipping": 1.0,
        "optimizer": optimizer,
        "zero_optimization": {"stage": stage},
    }


def train(rank, world_size, cfg):
    engine = memfit.initialize(make_block(), cfg)
    for batch in global_batches(STEPS, GLOBAL_BATCH):
        for inputs, targets in micro_batches(batch, rank, world_size, ACCUMULATION):
            engine.backward(torch.nn.functional.mse_loss(engine(inputs), targets))
            engine.step()
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}, engine.optimizer.state_bytes()


def grid(rank, world_size):
    return {
        (name, stage): train(rank, world_size, config(opt, stage))
        for name, opt in OPTIMIZERS.items()
        for stage in (1, 2)
    }


def test_sharded_lowrank_equals_single_process():
    sharded = run_ranks(grid, 2)
    for name, optimizer in OPTIMIZERS.items():
        expected, total_state = train(0, 1, config(optimizer, 0))
        for stage in (1, 2):
            state_bytes = [sharded[rank][(name, stage)][1] for rank in range(2)]
            assert sum(state_bytes) == total_state, (name, stage)
            for rank in range(2):
                params = sharded[rank][(name, stage)][0]
                for key, value in expected.items():
                    torch.testing.assert_close(
                        params[key], value, rtol=1e-4, atol=1e-5, msg=f"{key}: {name} stage {stage} rank {rank}"
                    )
