"""The equivalence table: one case is a model, a ZeRO stage, overlap on or off, accumulation
steps, clipping, an optimizer, a compute dtype and a user habit. The engine on N ranks is
compared with plain PyTorch in one process on the concatenated batch."""

import itertools
from dataclasses import dataclass

import torch

import memfit
from memfit.optim.registry import build_optimizer
from tests.distributed.models import make_model

STEPS, MICRO_BATCH, IN_FEATURES, OUT_FEATURES = 3, 2, 16, 8
PERSISTENCE_THRESHOLD = 50
# The low-rank optimizers project the attn and mlp modules. The default rule would also project
# the moe model's rank-routed experts, whose gradients have rank 2 at one micro-step: Adam then
# runs on projected coordinates that cancel to nearly 0, where a last-bit difference in the
# summation order moves parameters by about 4e-3 (GaLore, rank 4 > 2) or 1e-6 (FRUGAL), which
# says nothing about the engine.
LOW_RANK_TARGETS = ["attn", "mlp"]
OPTIMIZERS = {
    "AdamW": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
    "GaLoreAdamW": {
        "type": "GaLoreAdamW",
        "params": {
            "lr": 1e-2,
            "weight_decay": 0.1,
            "rank": 4,
            "update_proj_gap": 2,
            "target_modules": LOW_RANK_TARGETS,
        },
    },
    "FRUGAL": {
        "type": "FRUGAL",
        "params": {
            "lr": 1e-2,
            "weight_decay": 0.1,
            "density": 0.5,
            "update_gap": 2,
            "proj_type": "random",
            "target_modules": LOW_RANK_TARGETS,
        },
    },
    "CPUAdamW": {"type": "CPUAdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
    "SGD": {"type": "SGD", "params": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1}},
}
# habit: what the training loop does besides backward and step.
#   zero_start  model.zero_grad() and optimizer.zero_grad() at the start of every step
#   zero_mid    model.zero_grad() before the second micro-step: the first one is discarded
#   twice       two backward() calls per micro-step, on the two halves of the micro-batch
#   no_backward step() once with no backward at all before training
HABITS = ("none", "zero_start", "zero_mid", "twice", "no_backward")


@dataclass(frozen=True)
class Case:
    model: str
    stage: int
    overlap: bool
    accumulation: int
    clip: float
    optimizer: str
    dtype: str = "float32"
    habit: str = "none"
    offload: str = "none"
    steps: int = STEPS

    def __str__(self):
        return (
            f"{self.model} stage{self.stage} {'overlap' if self.overlap else 'no-overlap'} acc{self.accumulation} "
            f"clip{self.clip} {self.optimizer} {self.dtype} {self.habit} offload-{self.offload} steps{self.steps}"
        )


def grid(**axes) -> list[Case]:
    names = list(axes)
    return [Case(**dict(zip(names, values))) for values in itertools.product(*axes.values())]


def config(case: Case, world_size: int) -> dict:
    return {
        "train_batch_size": world_size * case.accumulation * MICRO_BATCH,
        "gradient_accumulation_steps": case.accumulation,
        "gradient_clipping": case.clip,
        "optimizer": OPTIMIZERS[case.optimizer],
        "bf16": {"enabled": case.dtype == "bfloat16"},
        "zero_optimization": {
            "stage": case.stage,
            "overlap_comm": case.overlap,
            "reduce_bucket_size": 300,
            "offload_optimizer": {"device": case.offload},
            # stage 3: weights are gathered at each use, biases (at most 40 elements) stay whole
            "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
        },
    }


def batches(case: Case, world_size: int):
    generator = torch.Generator().manual_seed(7)
    size = world_size * case.accumulation * MICRO_BATCH
    return [
        (torch.randn(size, IN_FEATURES, generator=generator), torch.randn(size, OUT_FEATURES, generator=generator))
        for _ in range(case.steps)
    ]


def micro_batches(batch, rank: int, world_size: int, accumulation: int):
    """This rank's micro-batches of one global batch: rank-major, then micro-step."""
    inputs, targets = batch
    per_rank = inputs.shape[0] // world_size
    start = rank * per_rank
    return [
        (
            inputs[start + i * MICRO_BATCH : start + (i + 1) * MICRO_BATCH],
            targets[start + i * MICRO_BATCH : start + (i + 1) * MICRO_BATCH],
        )
        for i in range(accumulation)
    ]


def pieces(case: Case, inputs, targets):
    """The (inputs, targets) each backward sees within one micro-step."""
    if case.habit == "twice":
        return [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])]
    return [(inputs, targets)]


def discarded(case: Case, micro_index: int) -> bool:
    return case.habit == "zero_mid" and case.accumulation > 1 and micro_index == 0


def run_engine(case: Case, rank: int, world_size: int) -> dict:
    engine = memfit.initialize(make_model(case.model), config(case, world_size))
    dtype = getattr(torch, case.dtype)
    if case.habit == "no_backward":
        for _ in range(case.accumulation):
            engine.step()
    for step, batch in enumerate(batches(case, world_size)):
        for micro_index, (inputs, targets) in enumerate(micro_batches(batch, rank, world_size, case.accumulation)):
            if case.habit == "zero_start" and micro_index == 0:
                engine.module.zero_grad()
                engine.optimizer.zero_grad()
            if case.habit == "zero_mid" and micro_index == 1:
                engine.module.zero_grad()
            for piece_inputs, piece_targets in pieces(case, inputs, targets):
                output = engine(piece_inputs.to(dtype), route=rank, step=step).float()
                engine.backward(torch.nn.functional.mse_loss(output, piece_targets))
            engine.step()
    with engine.gathered_parameters():  # stage 3: each tensor whole on every rank
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def run_reference(case: Case, world_size: int) -> dict:
    """Plain PyTorch in one process: every rank's micro-batches in turn, mean loss scaled as the
    engine scales it, clipping over the parameters that have a gradient, the same optimizer."""
    model = make_model(case.model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(OPTIMIZERS[case.optimizer]["type"], named, dict(OPTIMIZERS[case.optimizer]["params"]))
    for step, batch in enumerate(batches(case, world_size)):
        for rank in range(world_size):
            for micro_index, (inputs, targets) in enumerate(micro_batches(batch, rank, world_size, case.accumulation)):
                if discarded(case, micro_index):
                    continue
                for piece_inputs, piece_targets in pieces(case, inputs, targets):
                    loss = torch.nn.functional.mse_loss(model(piece_inputs, route=rank, step=step), piece_targets)
                    (loss / (case.accumulation * world_size)).backward()
        if case.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in named if p.grad is not None], case.clip)
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_cases(rank: int, world_size: int, cases: list[Case]) -> list[dict]:
    return [run_engine(case, rank, world_size) for case in cases]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)
