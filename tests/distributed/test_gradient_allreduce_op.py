"""gradient_allreduce_op: "sum" makes the step use the sum of the ranks' gradients, "mean" (the
default) their average, as in DeepSpeed; 2 gloo ranks, ZeRO stages 0 and 2."""

import torch

import memfit.deepspeed as deepspeed
from tests.distributed.harness import run_ranks


def sgd_steps(rank, world_size):
    """{(op, stage): the weight after one SGD step}, every case in one spawn of the ranks."""
    return {(op, stage): one_sgd_step(rank, op, stage) for op in ("sum", "mean") for stage in (0, 2)}


def one_sgd_step(rank, op, stage):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_allreduce_op": op, "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config)
    inputs = torch.tensor([[1.0, 2.0]]) * (rank + 1)  # gradients (1, 2) on rank 0, (2, 4) on rank 1
    engine.backward(engine(inputs).sum())
    engine.step()
    return model.weight.detach().tolist()


def test_sum_steps_on_the_sum_and_mean_on_the_average():
    for weights in run_ranks(sgd_steps, 2):
        for stage in (0, 2):
            assert weights[("sum", stage)] == [[-3.0, -6.0]], stage
            assert weights[("mean", stage)] == [[-1.5, -3.0]], stage
