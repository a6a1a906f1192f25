"""One setup of stage3_bench.py, run under torchrun on 2 gloo ranks: times training steps of the
same GPT-like stack in bf16 with AdamW and reports step time, its phases, peak RSS per rank and
the first losses as one JSON line from rank 0.

--profile (memfit stage 3 only) times memfit's stage-3 internals from outside: the worker wraps
Stage3Params methods with perf_counter, so memfit runs unchanged apart from that wrapping (which
adds its own small cost). --cprofile FILE writes rank 0's cProfile of the timed steps."""

import argparse
import collections
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB, SEQ, WIDTH, HEADS, LAYERS, MICRO_BATCH, LR = 8192, 128, 512, 8, 8, 4, 1e-4


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.qkv, self.proj = torch.nn.Linear(WIDTH, 3 * WIDTH), torch.nn.Linear(WIDTH, WIDTH)
        self.fc, self.out = torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):  # x: (batch, seq, width)
        batch, seq, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, seq, 3, HEADS, WIDTH // HEADS).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, seq, head_dim)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, WIDTH))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens, self.positions = torch.nn.Embedding(VOCAB, WIDTH), torch.nn.Embedding(SEQ, WIDTH)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens):  # tokens: (batch, seq) -> logits (batch, seq, vocab)
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_model():
    """The same fp32 weights on every rank and in every setup, rounded to bf16 values: memfit and
    DeepSpeed build their fp32 masters from the bf16 copy, FSDP2 keeps the fp32 tensor, and the
    same starting values keep their losses comparable."""
    torch.manual_seed(0)
    model = GPT()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    return model


def loss_of(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def memfit_setup(stage, overlap):
    import memfit

    engine = memfit.initialize(
        make_model(),
        {
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_clipping": 0.0,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {
                "stage": stage,
                "overlap_comm": overlap,
                "reduce_bucket_size": 5_000_000,
                "stage3_param_persistence_threshold": 100_000,
                "stage3_prefetch_bucket_size": 50_000_000,
            },
        },
    )

    def forward(tokens, targets):
        return loss_of(engine(tokens), targets)

    return forward, engine.backward, engine.step, engine


def fsdp2_setup(reduce_dtype):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
    model = make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def forward(tokens, targets):
        return loss_of(model(tokens), targets)

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward, lambda loss: loss.backward(), step, None


def deepspeed_setup():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_clipping": 0.0,
            "bf16": {"enabled": True},
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {
                "stage": 3,
                "reduce_bucket_size": 5_000_000,
                "stage3_param_persistence_threshold": 100_000,
                "stage3_prefetch_bucket_size": 50_000_000,
            },
            "steps_per_print": 10**9,
        },
    )

    def forward(tokens, targets):
        return loss_of(engine(tokens), targets)

    return forward, engine.backward, engine.step, None


class Stage3Probe:
    """perf_counter totals of memfit's stage-3 internals, wrapped from outside memfit."""

    def __init__(self, engine):
        from torch.autograd.graph import saved_tensors_hooks

        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        params = engine._stage3
        for name in (
            "gather",
            "_finish",
            "_start",
            "_release",
            "_pack",
            "_unpack",
            "_drop_prefetches",
            "check_same_use",
            "sync_persistent",
        ):
            setattr(params, name, self._timed(name, getattr(params, name)))
        # The schedule and the saved-tensor hooks hold the bound methods they were given.
        params.schedule.start = params._start
        params._saved = saved_tensors_hooks(params._pack, params._unpack)

    def _timed(self, name, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return timed

    def reset(self):
        self.seconds.clear()
        self.calls.clear()

    def per_step(self, steps):
        return {name: {"ms": 1000 * s / steps, "calls": self.calls[name] / steps} for name, s in self.seconds.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--setup",
        required=True,
        choices=[
            "memfit-stage3",
            "memfit-stage3-overlap",
            "memfit-stage2",
            "fsdp2",
            "fsdp2-bf16-reduce",
            "deepspeed-3",
        ],
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cprofile", default="")
    args = parser.parse_args()
    engine = None
    if args.setup == "deepspeed-3":
        forward, backward, step, _ = deepspeed_setup()
    else:
        dist.init_process_group("gloo")
        if args.setup.startswith("fsdp2"):
            forward, backward, step, _ = fsdp2_setup(
                torch.bfloat16 if args.setup == "fsdp2-bf16-reduce" else torch.float32
            )
        else:
            forward, backward, step, engine = memfit_setup(int(args.setup[12]), args.setup.endswith("-overlap"))
    rank, world = dist.get_rank(), dist.get_world_size()
    probe = Stage3Probe(engine) if args.profile and engine is not None and engine._stage3 is not None else None
    generator = torch.Generator().manual_seed(rank)
    data = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    tokens, targets = data[:, :-1], data[:, 1:]
    phases = {"step_s": [], "forward_s": [], "backward_s": [], "update_s": []}
    losses = []
    profiler = None
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            if probe is not None:
                probe.reset()
            if args.cprofile and rank == 0:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
        dist.barrier()
        started = time.perf_counter()
        loss = forward(tokens, targets)
        forwarded = time.perf_counter()
        backward(loss)
        backwarded = time.perf_counter()
        step()
        dist.barrier()
        ended = time.perf_counter()
        losses.append(loss.item())
        if index >= args.warmup:
            phases["step_s"].append(ended - started)
            phases["forward_s"].append(forwarded - started)
            phases["backward_s"].append(backwarded - forwarded)
            phases["update_s"].append(ended - backwarded)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    mine = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if engine is not None:
        report = engine.memory_report()
        mine["memfit_peak_rss_bytes"] = report["peak_rss_bytes"]
        if engine._stage3 is not None:
            mine["peak_gathered_bytes"] = engine._stage3.peak_gathered_bytes
    if probe is not None:
        mine["probe"] = probe.per_step(args.steps)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    all_losses = [None] * world
    dist.all_gather_object(all_losses, losses)
    if rank == 0:
        medians = {name: sorted(values)[len(values) // 2] for name, values in phases.items()}
        print(
            "RESULT "
            + json.dumps(
                {
                    "setup": args.setup,
                    **medians,
                    "losses": all_losses,
                    "ranks": gathered,
                    "params": sum(p.numel() for p in make_model().parameters()),
                }
            ),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
