"""Train the example LLaMA-style model, byte-level, with memfit.

    memfit run --nproc-per-node 2 examples/train_gpt.py --config examples/configs/zero2.json

Also runs under plain torchrun (pass --config) or as a single process. Default data: the Python
standard library's source files. Rank 0 shows a progress bar on a terminal (memfit's step lines
otherwise); metrics go to a JSONL file.
"""

import argparse
import json
import os
import sys

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
import xxhash
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from byte_data import batch_for, load_corpus  # noqa: E402
from gpt_model import GPT, PRESETS  # noqa: E402

import memfit  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a byte-level LLaMA-style model with memfit.")
    parser.add_argument("--config", default=os.environ.get("MEMFIT_CONFIG"), help="memfit JSON config")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default tiny)")
    parser.add_argument("--data", default=None, help="text file or folder (default: the Python standard library)")
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation losses")
    parser.add_argument("--eval-batches", type=int, default=4, help="micro-batches per validation")
    parser.add_argument("--metrics", default="runs/train_gpt/metrics.jsonl", help="JSONL metrics file")
    parser.add_argument(
        "--model-out", default="runs/train_gpt/model.safetensors", help="the final model (engine.save_16bit_model)"
    )
    parser.add_argument("--save-dir", default=None, help="checkpoint directory")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    args = parser.parse_args(argv)
    if args.config is None:
        parser.error("--config is required (or run under `memfit run --config FILE`)")
    if args.resume and args.save_dir is None:
        parser.error("--resume needs --save-dir")
    return args


def mean_over_ranks(value: float, engine) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if engine.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.item() / engine.world_size


def rss_per_rank(engine) -> list[int]:
    rss = psutil.Process().memory_info().rss
    if engine.world_size == 1:
        return [rss]
    gathered = [None] * engine.world_size
    dist.all_gather_object(gathered, rss)
    return gathered


def params_digest(engine) -> str:
    """XXH3 of every parameter's bytes: equal digests mean bit-identical models."""
    hasher = xxhash.xxh3_64()
    for _, param in sorted(engine.module.named_parameters()):
        with engine.gathered_parameters([param]):  # ZeRO stage 3: whole for the moment it is read
            hasher.update(param.detach().float().cpu().contiguous().view(torch.uint8).numpy())
    return hasher.hexdigest()


@torch.no_grad()
def validation_loss(engine, data, args, micro_batch, seq_len) -> float:
    engine.module.eval()
    total = 0.0
    for index in range(args.eval_batches):
        inputs, targets = batch_for(
            data,
            index,
            0,
            engine.rank,
            seed=engine.config.seed + 1,
            micro_batch=micro_batch,
            accumulation_steps=1,
            world_size=engine.world_size,
            seq_len=seq_len,
        )
        logits = engine(inputs.to(engine.device))
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.to(engine.device).flatten()).item()
    engine.module.train()
    return mean_over_ranks(total / args.eval_batches, engine)


def main(argv=None) -> None:
    args = parse_args(argv)
    model_cfg = PRESETS[args.preset]
    with open(args.config) as file:
        config = json.load(file)
    torch.manual_seed(0)
    # At ZeRO stage 3 with offload_param "nvme" the parameters go to NVMe as they are built (the
    # whole model is never in memory); with any other config this builds normally.
    with memfit.zero_init(config):
        model = GPT(model_cfg)
    # metrics go through memfit's JSONL monitor (one line per step, rank 0), unless the config has one
    config.setdefault("memfit", {}).setdefault("jsonl_monitor", {"enabled": True, "path": args.metrics})
    engine = memfit.initialize(model, config)
    train, validation, source = load_corpus(args.data)
    # Snapshots (config "snapshot"): each one keeps the data position, and a restarted job is
    # restored by memfit.initialize; the loop continues where the snapshot was taken.
    engine.set_client_state(lambda: {"data_position": engine.global_step})
    start_step = engine.client_state["data_position"] if engine.restored_from is not None else 0
    if args.resume and engine.restored_from is None:
        if os.path.exists(os.path.join(args.save_dir, "latest")):
            start_step = engine.load_checkpoint(args.save_dir)["data_position"]
        elif engine.rank == 0:
            print(f"train_gpt: --resume: no checkpoint in {args.save_dir} yet; starting at step 0", flush=True)

    micro, accumulation = engine.micro_batch_size, engine.gradient_accumulation_steps
    is_main = engine.rank == 0
    if is_main:
        num_params = sum(p.numel() for p in model.parameters())
        print(
            f"train_gpt: {args.preset} ({num_params / 1e6:.1f}M parameters), {engine.world_size} rank(s), "
            f"ZeRO stage {engine.stage}, data {source} ({len(train) / (1 << 20):.1f} MiB train)",
            flush=True,
        )
    # A bar on a terminal; in a log file, memfit's step lines (every steps_per_print steps) instead
    show_bar = is_main and sys.stdout.isatty()
    bar = tqdm(total=args.max_steps, initial=start_step, desc="train", disable=not show_bar, file=sys.stdout)

    for step in range(start_step, args.max_steps):
        step_loss = 0.0
        for micro_step in range(accumulation):
            inputs, targets = batch_for(
                train,
                step,
                micro_step,
                engine.rank,
                seed=engine.config.seed,
                micro_batch=micro,
                accumulation_steps=accumulation,
                world_size=engine.world_size,
                seq_len=model_cfg.seq_len,
            )
            logits = engine(inputs.to(engine.device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(engine.device).flatten())
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accumulation
        loss_value = mean_over_ranks(step_loss, engine)
        done = step + 1
        # memfit's monitor records the step (lr, tokens/s, grad norm, loss scale, restored_from, ...);
        # the example adds the loss averaged over ranks and what it measures itself
        record = {"loss": round(loss_value, 5)}
        if done % engine.config.steps_per_print == 0 or done == args.max_steps or done % args.eval_every == 0:
            record["rss_bytes_per_rank"] = rss_per_rank(engine)
            record["memory"] = engine.memory_report()
        if done % args.eval_every == 0 or done == args.max_steps:
            record["val_loss"] = round(validation_loss(engine, validation, args, micro, model_cfg.seq_len), 5)
        if done == args.max_steps:
            record["params_xxh3"] = params_digest(engine)
        if args.save_dir and ((args.save_every and done % args.save_every == 0) or done == args.max_steps):
            engine.save_checkpoint(args.save_dir, client_state={"data_position": done})
        engine.log_metrics(record)
        if is_main:
            postfix = {"loss": f"{loss_value:.3f}", "tok/s": f"{engine.step_stats.tokens_per_s or 0:.0f}"}
            if "rss_bytes_per_rank" in record:
                postfix["rss"] = "/".join(f"{b / 2**20:.0f}M" for b in record["rss_bytes_per_rank"])
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.3f}"
                tqdm.write(f"step {done}: loss {loss_value:.4f} val_loss {record['val_loss']:.4f}")
            bar.set_postfix(postfix)
        bar.update(1)
    bar.close()
    engine.save_16bit_model(os.path.dirname(args.model_out) or ".", os.path.basename(args.model_out))
    if is_main:
        print(f"train_gpt: done, model in {args.model_out}, metrics in {args.metrics}")


if __name__ == "__main__":
    main()
