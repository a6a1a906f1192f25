"""One setup of offload_bench.py under torchrun: trains the example's LLaMA-style decoder (bf16
compute, AdamW, clipping 1.0, ZeRO-2 with the optimizer offloaded to the host) for a few steps and
prints one RESULT JSON line from rank 0 with the median step time and every rank's peak RSS."""

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from gpt_model import GPT, GPTConfig  # noqa: E402

LR, CLIP = 1e-4, 1.0


def make_model(dim: int, layers: int, seq_len: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(dim=dim, n_layers=layers, n_heads=dim // 64, seq_len=seq_len))


def training_config(micro_batch: int) -> dict:
    """The same config for both: DeepSpeed's keys mean the same in memfit."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_clipping": CLIP,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    }


def memfit_setup(model, micro_batch: int):
    import memfit

    dist.init_process_group("gloo")
    return memfit.initialize(model, training_config(micro_batch))


def deepspeed_setup(model, micro_batch: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {**training_config(micro_batch), "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", choices=["memfit", "deepspeed"], required=True)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    model = make_model(args.dim, args.layers, args.seq_len)
    params = sum(p.numel() for p in model.parameters())
    if args.setup == "memfit":
        engine = memfit_setup(model, args.micro_batch)
    else:
        engine = deepspeed_setup(model, args.micro_batch)
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 256, (args.micro_batch, args.seq_len + 1), generator=generator)
    times, losses = [], []
    for index in range(args.warmup + args.steps):
        dist.barrier()
        started = time.perf_counter()
        logits = engine(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        dist.barrier()
        losses.append(loss.item())
        if index >= args.warmup:
            times.append(time.perf_counter() - started)
    mine = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        times.sort()
        result = {"setup": args.setup, "world": world, "params": params, "step_s": times[len(times) // 2]}
        print("RESULT " + json.dumps({**result, "ranks": gathered, "losses": losses}), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
