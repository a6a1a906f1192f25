"""Engine checkpoints: per-tensor state, one file per rank plus a manifest.

Each rank writes the fp32 (master) value and optimizer state of the tensors it owns, keyed by
parameter name, so a checkpoint loads at any world size: every rank reads the entries for the
tensors it owns in the new plan. Files hold only tensors, numbers and strings, so
torch.load(weights_only=True) reads them.

    <dir>/<tag>/rank<r>.pt, <dir>/<tag>/manifest.json, <dir>/latest
"""

import json
import os

import torch

from memfit.runtime.distributed import rng_state, set_rng_state

MANIFEST = "manifest.json"


def _rank_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.pt")


def save_checkpoint(engine, save_dir, tag, client_state: dict) -> str:
    tag = tag or f"global_step{engine.global_step}"
    directory = os.path.join(os.fspath(save_dir), tag)
    os.makedirs(directory, exist_ok=True)
    optimizer_state = engine.optimizer.state_dict()
    index_of = {id(p): i for i, p in enumerate(p for g in engine.optimizer.param_groups for p in g["params"])}
    saves_tensors = engine.stage > 0 or engine.rank == 0  # stage 0: every rank holds the same values
    params, states = {}, {}
    if saves_tensors:
        for name, master in zip(engine.masters.names, engine.masters.masters):
            index = index_of[id(master)]
            params[name] = master.detach().cpu()
            states[name] = {
                k: (v.cpu() if torch.is_tensor(v) else v) for k, v in optimizer_state["state"].get(index, {}).items()
            }
    payload = {
        "params": params,
        "optimizer_state": states,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer_state["param_groups"]],
        "global_step": engine.global_step,
        "micro_step": engine.micro_step,
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "rng": rng_state(),
        "client_state": client_state,
    }
    _atomic_save(payload, _rank_file(directory, engine.rank))
    engine.barrier()
    if engine.rank == 0:
        manifest = {
            "tag": tag,
            "world_size": engine.world_size,
            "stage": engine.stage,
            "global_step": engine.global_step,
            "owner_of": engine.ownership()["owner_of"],
        }
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        with open(os.path.join(os.fspath(save_dir), "latest"), "w") as f:
            f.write(tag)
    engine.barrier()
    return directory


def _atomic_save(payload, path: str) -> None:
    temporary = path + ".tmp"
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(engine, load_dir, tag=None) -> dict:
    load_dir = os.fspath(load_dir)
    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    directory = os.path.join(load_dir, tag)
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    saved = [
        torch.load(_rank_file(directory, r), map_location="cpu", weights_only=True)
        for r in range(manifest["world_size"])
    ]
    params = {name: t for payload in saved for name, t in payload["params"].items()}
    states = {name: s for payload in saved for name, s in payload["optimizer_state"].items()}
    missing = [name for name, _ in engine._named_params if name not in params]
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks parameters {missing[:5]}")

    with torch.no_grad():
        for name, param in engine._named_params:
            param.copy_(params[name].to(param.dtype))
        for name, master in zip(engine.masters.names, engine.masters.masters):
            if master is not dict(engine._named_params)[name]:
                master.copy_(params[name])
    _load_optimizer_state(engine, states, saved[0]["param_groups"])

    mine = saved[engine.rank] if engine.rank < len(saved) else saved[0]
    engine.global_step, engine.micro_step = mine["global_step"], mine["micro_step"]
    if engine.lr_scheduler is not None and mine["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(mine["scheduler"])
    set_rng_state(mine["rng"])
    return mine["client_state"]


def _load_optimizer_state(engine, states: dict, saved_groups: list) -> None:
    optimizer = engine.optimizer
    name_of = {id(m): n for n, m in zip(engine.masters.names, engine.masters.masters)}
    current = optimizer.state_dict()
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    new_state = {}
    for index, param in enumerate(flat):
        state = states.get(name_of[id(param)], {})
        if state:
            new_state[index] = {
                k: (v.to(param.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()
            }
    groups = []
    for group_index, group in enumerate(current["param_groups"]):
        hyper = saved_groups[group_index] if group_index < len(saved_groups) else {}
        groups.append({**group, **hyper, "params": group["params"]})
    optimizer.load_state_dict({"state": new_state, "param_groups": groups})
