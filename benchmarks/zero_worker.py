"""One setup of zero_bench.py, run under torchrun on 2 gloo ranks: times training steps of the
same MLP stack and reports per-rank memory as one JSON line from rank 0."""

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

HIDDEN, LAYERS, MICRO_BATCH, LR = 2048, 6, 16, 1e-4


def make_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def state_bytes(optimizer):
    return tensor_bytes(v for s in optimizer.state.values() for v in s.values())


def memfit_setup(stage, overlap):
    import memfit

    engine = memfit.initialize(
        make_model(),
        {
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {"stage": stage, "overlap_comm": overlap, "reduce_bucket_size": 5_000_000},
        },
    )

    def step(inputs, targets):
        engine.backward(torch.nn.functional.mse_loss(engine(inputs), targets))
        engine.step()

    def memory():
        return state_bytes(engine.optimizer), engine.grad_bytes_after_reduce

    return step, memory


def ddp_zero_setup():
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=0.0)

    def step(inputs, targets):
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def memory():
        return state_bytes(optimizer.optim), tensor_bytes(p.grad for p in model.parameters())

    return step, memory


def deepspeed_setup(stage):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000},
            "steps_per_print": 10**9,
        },
    )

    def step(inputs, targets):
        engine.backward(torch.nn.functional.mse_loss(engine(inputs), targets))
        engine.step()

    def memory():
        return state_bytes(optimizer.optimizer), None

    return step, memory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.setup.startswith("deepspeed"):
        step, memory = deepspeed_setup(int(args.setup[-1]))
    else:
        dist.init_process_group("gloo")
        if args.setup == "ddp+zero":
            step, memory = ddp_zero_setup()
        else:  # memfit-stageN[-overlap]
            step, memory = memfit_setup(int(args.setup.split("-")[1][-1]), args.setup.endswith("overlap"))
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(rank)
    inputs, targets = (
        torch.randn(MICRO_BATCH, HIDDEN, generator=generator),
        torch.randn(MICRO_BATCH, HIDDEN, generator=generator),
    )
    times = []
    for index in range(args.warmup + args.steps):
        dist.barrier()
        started = time.perf_counter()
        step(inputs, targets)
        dist.barrier()
        if index >= args.warmup:
            times.append(time.perf_counter() - started)
    optimizer_bytes, grad_bytes = memory()
    mine = {
        "optimizer_state_bytes": optimizer_bytes,
        "grad_bytes": grad_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        times.sort()
        print(
            "RESULT "
            + json.dumps(
                {
                    "setup": args.setup,
                    "step_s": times[len(times) // 2],
                    "ranks": gathered,
                    "params": sum(p.numel() for p in make_model().parameters()),
                }
            ),
            flush=True,
        )
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
