"""DeepSpeed's side of bigger_than_ram.py, under torchrun: the same decoder preset and batch as
examples/configs/nvme.json, with ZeRO-3 and DeepSpeed's NVMe optimizer offload (which it offers
only at stage 3), built as its documentation shows. Prints one STEP JSON line per optimizer step."""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--nvme-path", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    memfit_config = json.load(open(os.path.join(ROOT, "examples", "configs", "nvme.json")))
    config = {key: memfit_config[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
    config.update(
        gradient_clipping=memfit_config["gradient_clipping"],
        optimizer=memfit_config["optimizer"],
        scheduler=memfit_config["scheduler"],
        bf16={"enabled": True},
        steps_per_print=10**9,
        zero_optimization={
            "stage": 3,
            "offload_optimizer": {
                "device": "nvme",
                "nvme_path": args.nvme_path,
                "pipeline_read": True,
                "pipeline_write": True,
            },
        },
        aio=memfit_config["aio"],
    )
    preset = PRESETS[args.preset]
    with deepspeed.zero.Init(config_dict_or_path=config):
        torch.manual_seed(0)
        model = GPT(preset)
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


if __name__ == "__main__":
    main()
