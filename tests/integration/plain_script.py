"""A training script that sets up no logging and no output of its own: what a user sees is what
memfit prints. The config comes from `memfit run --config`; argv: number of optimizer steps."""

import sys

import torch

import memfit

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Flatten(), torch.nn.Linear(32, 16))
engine = memfit.initialize(model)
for _ in range(int(sys.argv[1])):
    tokens = torch.randint(0, 16, (engine.micro_batch_size, 4))
    loss = torch.nn.functional.cross_entropy(engine(tokens), tokens[:, 0])
    engine.backward(loss)
    engine.step()
