"""Trains a ~4M-parameter model and checkpoints after every step, forever: new tags with
rotation, and one tag re-saved in place. The kill test SIGKILLs it at random moments."""

import sys

import torch

import memfit

save_dir = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(1024, 1024),
    torch.nn.GELU(),
    torch.nn.Linear(1024, 1024),
    torch.nn.GELU(),
    torch.nn.Linear(1024, 1024),
    torch.nn.LayerNorm(1024),
)
engine = memfit.initialize(
    model,
    {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    },
)
while True:
    engine.backward(engine(torch.randn(2, 1024)).pow(2).mean())
    engine.step()
    engine.save_checkpoint(save_dir, keep=2, client_state={"step": engine.global_step})
    engine.save_checkpoint(save_dir, tag="rolling", client_state={"step": engine.global_step})
    if engine.rank == 0:
        print("saved", engine.global_step, flush=True)
