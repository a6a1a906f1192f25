"""The example GPT ('tiny') trained a few steps at ZeRO stage 3 with its parameters on NVMe, built
eagerly and under memfit.zero_init, in one process. test_stage3_zero_init.py calls train() on one
rank and runs this file under torchrun on two:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/zero_init_job.py DIR

Each rank seeds its build differently, so the runs agree only if both start from rank 0's weights.
Exits non-zero when a loss or a final parameter differs."""

import os
import sys

import torch
import torch.nn.functional as F

import memfit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402

BATCH, SEQ_LEN = 2, 32


def config(nvme_path: str) -> dict:
    nvme = {"device": "nvme", "nvme_path": nvme_path}
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # every tensor goes through the store
            "offload_param": nvme,
            "offload_optimizer": {**nvme, "buffer_size": 1 << 20, "buffer_count": 2},
        },
    }


def train(deferred: bool, nvme_path: str, steps: int = 3) -> tuple[list[float], dict]:
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(100 + rank)
    if deferred:
        with memfit.zero_init(config(nvme_path)):
            model = GPT(PRESETS["tiny"])
    else:
        model = GPT(PRESETS["tiny"])
    engine = memfit.initialize(model, config(nvme_path))
    data = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 256, (BATCH, SEQ_LEN + 1), generator=data)
        logits = engine(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with engine.gathered_parameters():
        params = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    return losses, params


def differences(eager, deferred) -> list[str]:
    found = [f"losses {eager[0]} != {deferred[0]}"] if eager[0] != deferred[0] else []
    return found + [
        f"parameter {name} differs" for name, p in eager[1].items() if not torch.equal(p, deferred[1][name])
    ]


def main() -> None:
    nvme_path = sys.argv[1]
    found = differences(train(False, nvme_path), train(True, nvme_path))
    if found:
        print(f"rank {os.environ.get('RANK')}: " + "; ".join(found), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
