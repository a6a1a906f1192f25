"""DeepSpeed ZeRO-Infinity as the anchor of the "bigger than RAM" benchmark: ZeRO-3 with both
offload_param and offload_optimizer on NVMe, the example decoder built under deepspeed.zero.Init
(never materialized whole), bf16, AdamW, every decoder block under activation checkpointing, and
the batch and optimizer of examples/configs/zero3_nvme.json (micro batch 1 x 256 tokens, lr 3e-4,
clipping 1.0). One rank on the CPU accelerator (DS_ACCELERATOR=cpu).

The driver starts the job under torchrun, samples the resident memory of the whole process tree
twice a second and prints peak RSS, step times and losses; the job (--worker) prints one STEP
JSON line per optimizer step.

    python benchmarks/zero_infinity_deepspeed.py --preset 400m --steps 3 --nvme-path /tmp/dsinf
    python benchmarks/zero_infinity_deepspeed.py --preset tiny --steps 2 --nvme-path /tmp/dsinf  # quick check
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt_model import GPT, PRESETS  # noqa: E402

# DeepSpeed's documented async I/O settings (deepspeed/runtime/swap_tensor/constants.py, AIO_FORMAT;
# the "aio" section of its config docs).
DOCUMENTED_AIO = {
    "block_size": 1048576,
    "queue_depth": 8,
    "intra_op_parallelism": 1,
    "single_submit": False,
    "overlap_events": True,
    "use_gds": False,
}


def deepspeed_config(nvme_path: str, sub_group_size: int, pipeline: bool) -> dict:
    """examples/configs/zero3_nvme.json translated to DeepSpeed: the same batch, optimizer,
    clipping and parameter persistence threshold; both offloads on NVMe, DeepSpeed's aio settings.
    memfit's own keys (offload_optimizer.buffer_size, the memfit section) have no DeepSpeed
    counterpart and are left out; DeepSpeed rejects unknown keys."""
    memfit_config = json.load(open(os.path.join(ROOT, "examples", "configs", "zero3_nvme.json")))
    memfit_zero = memfit_config["zero_optimization"]
    nvme = {"device": "nvme", "nvme_path": nvme_path}
    return {
        "train_micro_batch_size_per_gpu": memfit_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": memfit_config["gradient_accumulation_steps"],
        "gradient_clipping": memfit_config["gradient_clipping"],
        "optimizer": memfit_config["optimizer"],
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": memfit_zero["stage3_param_persistence_threshold"],
            # Tile of the optimizer step: each sub-group's fp32 state is swapped in whole, so
            # DeepSpeed's default of 1e9 elements would hold 12 GB of it in RAM at once.
            "sub_group_size": sub_group_size,
            # Release each parameter's swap buffer right after use: with the default reuse distance
            # (1e9) the parameters a checkpointed block will use again in its recompute stay
            # resident, and at 1b step 2 stopped with "AssertionError: Not enough buffers 0 for
            # swapping 1" (5 of offload_param's 5 buffers held).
            "stage3_max_reuse_distance": 0,
            # max_in_cpu left at DeepSpeed's default (1e9 elements): the 16-bit parameters of a
            # model under a billion parameters stay in host memory; memfit's equivalent is
            # zero3_nvme_sizes.py --max-in-cpu 1e9
            "offload_param": nvme,
            "offload_optimizer": {
                **nvme,
                "buffer_count": memfit_zero["offload_optimizer"]["buffer_count"],
                # Overlapping the swaps (DeepSpeed's default: off) failed the first step here at 400m
                # with this buffer count: "assert new_alloc_buffers is not None" in
                # pipelined_optimizer_swapper.py, when AdamW's fresh state asks for two more buffers.
                "pipeline_read": pipeline,
                "pipeline_write": pipeline,
            },
        },
        "aio": DOCUMENTED_AIO,
    }


class CheckpointedBlock(torch.nn.Module):
    """A decoder block whose activations are recomputed in the backward pass."""

    def __init__(self, block: torch.nn.Module, kind: str):
        super().__init__()
        self.block, self.kind = block, kind

    def forward(self, x, cos, sin):
        if self.kind == "deepspeed":
            import deepspeed

            return deepspeed.checkpointing.checkpoint(self.block, x, cos, sin)
        return torch.utils.checkpoint.checkpoint(self.block, x, cos, sin, use_reentrant=False)


def train(args) -> None:
    """The job itself, one rank under torchrun."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = deepspeed_config(args.nvme_path, args.sub_group_size, args.pipeline)
    if args.checkpoint == "deepspeed":
        deepspeed.checkpointing.configure(None, deepspeed_config=config)
    preset = PRESETS[args.preset]
    with deepspeed.zero.Init(config_dict_or_path=config):
        torch.manual_seed(0)
        model = GPT(preset)
    model.blocks = torch.nn.ModuleList(CheckpointedBlock(block, args.checkpoint) for block in model.blocks)
    num_params = sum(p.ds_numel for p in model.parameters())
    print(f"PARAMS {num_params}", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    generator = torch.Generator().manual_seed(0)
    micro, accumulation = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    for step in range(args.steps):
        started, step_loss = time.perf_counter(), 0.0
        for _ in range(accumulation):
            tokens = torch.randint(0, 256, (micro, preset.seq_len + 1), generator=generator)
            logits = engine(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accumulation
        print(
            "STEP " + json.dumps({"step": step + 1, "loss": step_loss, "s": time.perf_counter() - started}), flush=True
        )


def describe(args, report: dict) -> str:
    """The results-file section for one run."""
    from common import command_line, deepspeed_version, machine_description

    params = f"{report['params'] / 1e9:.2f}B parameters" if report["params"] else "parameter count not reached"
    lines = [
        machine_description(args.nvme_path),
        f"- command: `{command_line()}`",
        f"- deepspeed: {deepspeed_version()}, DS_ACCELERATOR=cpu, one rank under torchrun",
        f"- model: the example's `{args.preset}` preset, {params}; ZeRO-3, offload_param and offload_optimizer "
        f"nvme, bf16, AdamW, {args.checkpoint} activation checkpointing per block, sub_group_size "
        f"{args.sub_group_size}, pipelined optimizer swaps {'on' if args.pipeline else 'off'}",
        f"- load average before the run: {', '.join(map(str, report['load_before']))}; "
        f"after: {', '.join(map(str, report['load_after']))}",
        f"- {report['status']} after {report['wall_s']} s; peak RSS of the process tree {report['peak_rss_gib']} GiB",
        f"- step times (s): {', '.join(map(str, report['step_s'])) or 'none'}",
        f"- losses: {', '.join(map(str, report['losses'])) or 'none'}",
    ]
    if "why" in report:
        lines.append(f"- why: `{report['why']}`")
    return "\n".join(lines)


def drive(args) -> None:
    """Runs the job under torchrun with the tree's RSS sampled, then reports."""
    from bigger_than_ram import failure_line, run_child
    from common import write_section

    os.makedirs(args.nvme_path, exist_ok=True)
    present = set(os.listdir(args.nvme_path))  # never removed: only what this run made is
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29613"]
    command += [os.path.abspath(__file__), "--worker", "--preset", args.preset, "--steps", str(args.steps)]
    command += ["--nvme-path", args.nvme_path, "--checkpoint", args.checkpoint]
    command += ["--sub-group-size", str(args.sub_group_size)] + (["--pipeline"] if args.pipeline else [])
    load_before = os.getloadavg()
    result = run_child(command, args.timeout, {**os.environ, "DS_ACCELERATOR": "cpu"})
    lines = result["output"].splitlines()
    steps = [json.loads(line[5:]) for line in lines if line.startswith("STEP ")]
    params = [int(line.split()[1]) for line in lines if line.startswith("PARAMS ")]
    report = {
        "preset": args.preset,
        "params": params[0] if params else None,
        "status": result["status"],
        "wall_s": round(result["wall_s"], 1),
        "peak_rss_gib": round(result["peak_rss_bytes"] / 2**30, 3),
        "step_s": [round(s["s"], 2) for s in steps],
        "losses": [round(s["loss"], 4) for s in steps],
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    if not result["ok"]:
        report["why"] = failure_line(result["output"])[:500]
    if args.log:
        with open(args.log, "w") as file:
            file.write(result["output"])
    print("RESULT " + json.dumps(report), flush=True)
    if args.write:
        print(
            "written to",
            write_section(f"ZeRO-Infinity anchor, {args.preset} (zero_infinity_deepspeed.py)", describe(args, report)),
        )
    if not args.keep_swap:
        made = sorted(set(os.listdir(args.nvme_path)) - present)
        subprocess.run(["rm", "-rf", *(os.path.join(args.nvme_path, name) for name in made)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nvme-path", default="/tmp/dsinf", help="directory for DeepSpeed's swap files")
    parser.add_argument("--checkpoint", default="deepspeed", choices=["deepspeed", "torch"],
                        help="deepspeed.checkpointing.checkpoint or torch.utils.checkpoint (non-reentrant)")  # fmt: skip
    parser.add_argument("--sub-group-size", type=int, default=100_000_000, help="zero_optimization.sub_group_size")
    parser.add_argument("--pipeline", action="store_true", help="offload_optimizer pipeline_read and pipeline_write")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the job is killed")
    parser.add_argument("--write", action="store_true", help="add the result to benchmarks/results/")
    parser.add_argument("--log", help="file for the job's full output")
    parser.add_argument("--keep-swap", action="store_true", help="leave the swap files in --nvme-path")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    (train if args.worker else drive)(args)


if __name__ == "__main__":
    main()
