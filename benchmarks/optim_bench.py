"""Optimizer step time and state memory on the example's base model (~114M parameters).

memfit GaLoreAdamW (rank 128, T=200; fp32 and bf16 projection), memfit FRUGAL (density 0.25),
galore-torch GaLoreAdamW, and torch AdamW (foreach, fused), all with the same param groups
(2-D attention/MLP weights projected), alternating one step each per round. The step time with
the projector refresh amortized over T is regular + (refresh step - regular) / T. The floor is
the projection matmuls alone (project and project back: 4 m n r FLOPs per matrix) in plain torch.

    python benchmarks/optim_bench.py --rounds 5
"""

import argparse
import os
import sys
import time

import torch
from common import command_line, machine_description, median, write_section

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from gpt_model import GPT, PRESETS  # noqa: E402

from memfit.optim import FRUGAL, GaLoreAdamW, galore_param_groups  # noqa: E402
from memfit.optim.galore import gemm_dtype  # noqa: E402
from memfit.optim.groups import split_projectable  # noqa: E402

RANK, GAP, LR = 128, 200, 1e-3


def state_bytes(optimizer) -> int:
    """Tensor state, plus galore-torch's projector objects (their ortho_matrix is state too)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif getattr(value, "ortho_matrix", None) is not None:
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
    return total


def build(model):
    named = [(n, p) for n, p in model.named_parameters()]
    projected, plain = split_projectable(named)
    plain_params, projected_params = [p for _, p in plain], [p for _, p in projected]
    galore_options = {"rank": RANK, "update_proj_gap": GAP, "scale": 0.25, "proj_type": "std"}
    optimizers = {
        "torch AdamW foreach": torch.optim.AdamW(model.parameters(), lr=LR, foreach=True),
        "torch AdamW fused": torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        "memfit GaLoreAdamW (randomized, default)": GaLoreAdamW(
            galore_param_groups(named, RANK, update_proj_gap=GAP, scale=0.25), lr=LR
        ),
        "memfit GaLoreAdamW svd": GaLoreAdamW(
            galore_param_groups(named, RANK, update_proj_gap=GAP, scale=0.25), lr=LR, projector="svd"
        ),
        "memfit GaLoreAdamW bf16 proj": GaLoreAdamW(
            galore_param_groups(named, RANK, update_proj_gap=GAP, scale=0.25), lr=LR, proj_dtype=torch.bfloat16
        ),
        "memfit FRUGAL": FRUGAL(
            [{"params": plain_params}, {"params": projected_params, "projectable": True}],
            lr=LR,
            density=0.25,
            update_gap=GAP,
        ),
    }
    try:
        import galore_torch

        optimizers["galore-torch GaLoreAdamW"] = galore_torch.GaLoreAdamW(
            [{"params": plain_params}, {"params": projected_params, **galore_options}],
            lr=LR,
            no_deprecation_warning=True,
        )
    except ImportError:
        pass
    return optimizers, projected_params


def force_refresh(name, optimizer):
    """Moves every step counter to a multiple of T so the next step renews the projection."""
    for group in optimizer.param_groups:
        if "frugal_step" in group:
            group["frugal_step"] = GAP * 10
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state and ("rank" in group or "galore" in name.lower()):
                state["step"] = GAP * 10 if isinstance(state["step"], int) else state["step"]


def projection_floor(projected_params, dtype) -> float:
    """Seconds for project + project back of every projected matrix (std side), plain torch. The
    low-rank factor is column-major, the layout in which CPU bf16 GEMM is fast (fp32 does not care)."""
    pairs = []
    for param in projected_params:
        m, n = param.shape
        grad = torch.randn(m, n, dtype=dtype)
        if m >= n:
            basis, low = torch.randn(RANK, n, dtype=dtype), torch.randn(RANK, m, dtype=dtype).t()
            pairs.append((lambda g=grad, q=basis, lo=low: (g @ q.t(), lo @ q)))
        else:
            basis, low = torch.randn(m, RANK, dtype=dtype), torch.randn(n, RANK, dtype=dtype).t()
            pairs.append((lambda g=grad, p=basis, lo=low: (p.t() @ g, p @ lo)))
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for run in pairs:
            run()
        times.append(time.perf_counter() - started)
    return median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(PRESETS["base"])
    num_params = sum(p.numel() for p in model.parameters())
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizers, projected = build(model)
    first = {}
    for name, optimizer in optimizers.items():  # first step: state allocation and the first refresh
        started = time.perf_counter()
        optimizer.step()
        first[name] = time.perf_counter() - started
    times = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            started = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - started)
    refresh = {}
    for name, optimizer in optimizers.items():
        if "AdamW foreach" in name or "AdamW fused" in name:
            continue
        force_refresh(name, optimizer)
        started = time.perf_counter()
        optimizer.step()
        refresh[name] = time.perf_counter() - started
    floor32 = projection_floor(projected, torch.float32)
    floor16 = projection_floor(projected, torch.bfloat16)

    regular = {name: median(values) for name, values in times.items()}
    amortized = {
        name: regular[name] + max(0.0, refresh.get(name, regular[name]) - regular[name]) / GAP for name in regular
    }
    adam_foreach, galore_ref = amortized["torch AdamW foreach"], amortized.get("galore-torch GaLoreAdamW")
    rows = [
        "| optimizer | state (MiB) | regular step (ms) | refresh step (ms) | amortized step (ms) | / projection floor "
        "| / torch AdamW foreach | / galore-torch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    bf16_gemm = gemm_dtype(torch.empty(0, dtype=torch.bfloat16))  # what the bf16 opt-in runs its matmuls in here
    for name, optimizer in optimizers.items():
        floor = floor16 if "bf16" in name and bf16_gemm == torch.bfloat16 else floor32
        rows.append(
            f"| {name} | {state_bytes(optimizer) / 2**20:.0f} | {regular[name] * 1e3:.0f} | "
            f"{refresh.get(name, float('nan')) * 1e3:.0f} | {amortized[name] * 1e3:.0f} | {amortized[name] / floor:.2f}x | "
            f"{amortized[name] / adam_foreach:.2f}x | {amortized[name] / galore_ref if galore_ref else float('nan'):.2f}x |"
        )
    body = "\n".join(
        [
            f"Command: `{command_line()}`",
            "",
            machine_description(),
            f"- galore-torch: {'installed' if galore_ref else 'not installed'}",
            "",
            f"Model: examples/gpt_model.py preset base, {num_params / 1e6:.1f}M parameters, fp32; "
            f"{len(projected)} projected matrices (attn/mlp weights), rank {RANK}, T = {GAP}. Median of {args.rounds} "
            "alternating rounds after one warm-up step each. Projection floor (project + project back, plain torch): "
            f"{floor32 * 1e3:.0f} ms fp32, {floor16 * 1e3:.0f} ms bf16. The bf16 opt-in stores its basis in bf16 and "
            f"runs its matmuls in {str(bf16_gemm).removeprefix('torch.')} on this machine (float32 where the CPU has no "
            "native bf16 GEMM) and is compared with that floor.",
            "",
            *rows,
        ]
    )
    print(body)
    print("written to", write_section("Optimizers on the base model (benchmarks/optim_bench.py)", body))


if __name__ == "__main__":
    main()
