"""A training script in DeepSpeed's idiom, run on memfit by changing only its import; with
--api memfit, the same training through memfit's own API, for comparison."""

import argparse
import json

import torch

import memfit
import memfit.deepspeed as deepspeed

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=-1)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--save_dir", required=True)
parser.add_argument("--save_at", type=int, default=3)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--out", required=True)
parser.add_argument("--api", choices=["deepspeed", "memfit"], default="deepspeed")
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
generator = torch.Generator().manual_seed(1)
dataset = torch.utils.data.TensorDataset(
    torch.randn(96, 16, generator=generator), torch.randn(96, 8, generator=generator)
)

if args.api == "deepspeed":
    deepspeed.init_distributed()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model.parameters(), training_data=dataset
    )
    start = 0
    if args.resume:
        path, client_state = engine.load_checkpoint(args.save_dir)
        start = client_state["step"]
else:
    with open(args.deepspeed_config) as file:
        config = json.load(file)
    engine = memfit.initialize(
        model, config, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    )
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, engine.world_size, engine.rank)
    loader = torch.utils.data.DataLoader(dataset, batch_size=engine.micro_batch_size, sampler=sampler)
    start = 0

engine.train()
batches = list(loader)
accumulation = len(batches) // args.steps
for step in range(start, args.steps):
    for inputs, targets in batches[step * accumulation : (step + 1) * accumulation]:
        loss = torch.nn.functional.mse_loss(engine(inputs), targets)
        engine.backward(loss)
        engine.step()
    if args.api == "deepspeed" and step + 1 == args.save_at and not args.resume:
        engine.save_checkpoint(args.save_dir, tag=f"step{step + 1}", client_state={"step": step + 1})
if torch.distributed.get_rank() == 0:
    steps = engine.global_steps if args.api == "deepspeed" else engine.global_step
    torch.save({"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}, "steps": steps},
               args.out)  # fmt: skip
