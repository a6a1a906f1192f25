"""global_samples counts the samples each step actually ran, so a run resumed at another world
size goes on from the samples it had (DeepSpeed's engine.global_samples)."""

import torch

import memfit
import memfit.deepspeed as deepspeed
from tests.distributed.harness import run_ranks
from tests.distributed.models import make_mlp

MICRO_BATCH = 4
CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO_BATCH,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},  # deepspeed.initialize trains only with one
    "zero_optimization": {"stage": 2},
}


def train(engine, num_steps):
    for _ in range(num_steps):
        engine.backward(torch.nn.functional.mse_loss(engine(torch.randn(MICRO_BATCH, 16)), torch.randn(MICRO_BATCH, 8)))
        engine.step()


def resume_and_train(rank, world_size, directory):
    engine, *_ = deepspeed.initialize(model=make_mlp(), config=CONFIG)
    engine.load_checkpoint(directory)
    resumed = engine.global_samples
    train(engine, 2)
    return resumed, engine.global_samples, engine.global_steps


def test_global_samples_survive_a_resume_at_another_world_size(tmp_path):
    engine = memfit.initialize(make_mlp(), CONFIG)  # one rank: 4 samples per step
    train(engine, 3)
    assert engine.global_samples == 12
    engine.save_checkpoint(tmp_path)
    # two ranks: 8 samples per step, added to the 12 the first rank ran (not 5 steps x 8)
    for resumed, samples, steps in run_ranks(resume_and_train, 2, str(tmp_path)):
        assert (resumed, samples, steps) == (12, 28, 5)
