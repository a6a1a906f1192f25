"""The training state of one rank as a payload of tensors and numbers, and its restoration from
the payloads of any earlier world size.

A payload, as a checkpoint file (and later a snapshot) holds it for one rank:
    params           {name: fp32 value} of the tensors the rank owns (stage 0: rank 0 holds all)
    optimizer_state  {name: {key: value}} for the same tensors
    param_groups     the rank's optimizer groups: hyperparameters plus "param_names"
    frozen           {name: tensor}: parameters with requires_grad=False (rank 0 only)
    buffers          {name: tensor}: the rank's module buffers (BatchNorm statistics)
    state_dict_layout  persistent buffer names and tied-parameter aliases (for `memfit export`)
    scheduler, rng, global_step, micro_step, client_state
Everything is keyed by parameter name, and every rank computes the same ownership plan, so a
rank restores by reading the payloads that hold the tensors it owns now. Group hyperparameters
are matched by parameter names, never by position: groups differ between ranks (GaLore's
projected group exists only where a rank owns a projected matrix).
"""

from typing import Protocol

import torch

from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.optimizer_change import check_optimizer_kind, keep_config_hyperparameters, log_changes
from memfit.runtime.distributed import rng_state, set_rng_state

STRUCTURAL_GROUP_KEYS = ("params", "names", "param_names")  # describe this rank's group, never copied
PLACEHOLDER_GROUP_KEYS = ("lr", "initial_lr")  # all a group without tensors needs (for the scheduler)


class StateSource(Protocol):
    """Where a restore reads payloads from: a checkpoint directory, or a snapshot."""

    world_size: int
    owner_of: dict[str, int]
    description: str

    def payload(self, rank: int) -> dict:
        """The rank's payload; its non-tensor content is verified."""

    def tensor(self, rank: int, path: str) -> torch.Tensor:
        """A tensor of the rank's payload by its path ("params/mlp.weight"), verified."""

    def file_of(self, rank: int) -> str:
        """The file that holds the rank's payload, for messages."""


def _copy(source: StateSource, rank: int, path: str, target: torch.Tensor) -> None:
    """target.copy_(source.tensor(rank, path)), through the source's own copy where it has one (a
    snapshot slot reads straight into target, checking the bytes on the way)."""
    copy_into = getattr(source, "copy_into", None)
    if copy_into is not None:
        copy_into(rank, path, target)
    else:
        target.copy_(source.tensor(rank, path))


def export_rank_state(engine, client_state: dict) -> dict:
    optimizer = engine.optimizer
    saved = optimizer.state_dict()
    flat = [param for group in optimizer.param_groups for param in group["params"]]
    index_of = {id(param): index for index, param in enumerate(flat)}
    name_of = {id(master): name for name, master in zip(engine.masters.names, engine.masters.masters)}
    params, states = {}, {}
    master_of = getattr(optimizer, "master_of", lambda param: None)
    # The NVMe tier: tensors over its swap file, read as they are written out (never all in RAM).
    swapped = engine._update.swapped_tensors() if hasattr(engine._update, "swapped_tensors") else {}
    if engine.stage > 0 or engine.rank == 0:  # stage 0: every rank holds the same values
        for name, master in zip(engine.masters.names, engine.masters.masters):
            on_swap = swapped.get(name, {})
            # an optimizer that keeps the fp32 master of a 16-bit tensor
            held = on_swap["master"] if "master" in on_swap else master_of(master)
            params[name] = (held if held is not None else master).detach().float().cpu()
            states[name] = {
                key: _portable(key, value)
                for key, value in saved["state"].get(index_of[id(master)], {}).items()
                if key != "master"
            }
            states[name].update((key, value) for key, value in on_swap.items() if key != "master")
    groups = []
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        hyper = {key: value for key, value in saved_group.items() if key != "params"}
        hyper["param_names"] = [name_of[id(p)] for p in group["params"] if id(p) in name_of]
        groups.append(hyper)
    module = engine.module
    return {
        "params": params,
        "optimizer_state": states,
        "param_groups": groups,
        "frozen": {n: p.detach().cpu() for n, p in module.named_parameters() if not p.requires_grad}
        if engine.rank == 0
        else {},
        "buffers": {name: buffer.detach().cpu() for name, buffer in module.named_buffers()},
        "state_dict_layout": state_dict_layout(module),
        "global_step": engine.global_step,
        "global_samples": engine.global_samples,
        "micro_step": engine.micro_step,
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": engine.loss_scaler.state_dict() if engine.loss_scaler is not None else None,
        "skipped_steps": engine.skipped_steps,
        "rng": rng_state(),
        "client_state": client_state,
    }


def state_dict_layout(module: torch.nn.Module) -> dict:
    """What the module's state_dict holds beyond the saved tensors, for `memfit export`: the names
    of its persistent buffers (named_buffers also lists the others), and every second name of a
    tied parameter, with the name it was saved under."""
    persistent = [
        f"{prefix}.{name}" if prefix else name
        for prefix, child in module.named_modules()
        for name, buffer in child.named_buffers(recurse=False)
        if buffer is not None and name not in child._non_persistent_buffers_set
    ]
    first_name, aliases = {}, {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return {"persistent_buffers": persistent, "aliases": aliases}


def _portable(key: str, value):
    """State in a form every optimizer of the family loads: the step as a number (torch's Adam
    keeps a tensor, CPUAdamW an int), tensors on the CPU."""
    if key == "step" and torch.is_tensor(value) and value.numel() == 1:
        return int(value.item())
    return value.cpu() if torch.is_tensor(value) else value


def restore_rank_state(engine, source: StateSource, load_optimizer_states: bool = True) -> dict:
    """Loads this rank's share of the state from source; returns the client state. Without
    load_optimizer_states, the optimizer and the scheduler keep their fresh state."""
    if load_optimizer_states:
        check_optimizer_kind(engine, source)
    same_world = source.world_size == engine.world_size
    base_rank = engine.rank if engine.rank < source.world_size else 0
    base = source.payload(base_rank)
    _check_names(engine, source)
    by_name = dict(engine._named_params)
    restore_master = getattr(engine._update, "restore_master", None)  # the NVMe tier's swapped masters
    with torch.no_grad():
        for name, master in zip(engine.masters.names, engine.masters.masters):
            owner_rank, path = source.owner_of[name], f"params/{name}"
            value = source.tensor(owner_rank, path)
            _check_shape(name, value, master, source)
            if restore_master is not None:
                restore_master(name, value)
            else:
                _copy(source, owner_rank, path, master)
            if by_name[name] is not master:
                _copy(source, owner_rank, path, by_name[name])
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:
                value = source.tensor(0, f"frozen/{name}")
                _check_shape(name, value, param, source)
                _copy(source, 0, f"frozen/{name}", param)
        buffers = base["buffers"]
        for name, buffer in engine.module.named_buffers():
            if name not in buffers:
                raise CheckpointError(f"{source.description}: no saved value for module buffer {name!r}")
            value = source.tensor(base_rank, f"buffers/{name}")
            # copy_ would broadcast a (1, 1) value over a (3, 1) buffer without a word
            if value.shape != buffer.shape:
                raise CheckpointError(
                    f"{source.file_of(base_rank)}: module buffer {name!r} has shape {tuple(value.shape)} there, "
                    f"{tuple(buffer.shape)} in the model"
                )
            _copy(source, base_rank, f"buffers/{name}", buffer)
        if getattr(source, "every_rank", False) and engine.stage in (1, 2):
            _copy_unowned_params(engine, source)
        else:
            engine.sync_params()  # owners hand the restored values to every rank
    if load_optimizer_states:
        _restore_optimizer(engine, source, same_world)
    finish = getattr(source, "finish", None)
    if finish is not None:  # before the step, scheduler and RNG change
        finish()
    set_master = getattr(engine.optimizer, "set_master", None)
    if set_master is not None:  # an optimizer that keeps the fp32 master of each 16-bit tensor
        for name, master in zip(engine.masters.names, engine.masters.masters):
            if master.dtype != torch.float32:
                set_master(master, source.tensor(source.owner_of[name], f"params/{name}"))
    if engine.host_tier is not None:
        engine.host_tier.adopt(engine.optimizer)
    engine.global_step, engine.micro_step = base["global_step"], base["micro_step"]
    # a checkpoint from before global_samples was saved: its steps all ran at its own world size
    samples_per_step = engine.micro_batch_size * engine.gradient_accumulation_steps * source.world_size
    engine.global_samples = base.get("global_samples", base["global_step"] * samples_per_step)
    if load_optimizer_states and engine.lr_scheduler is not None and base["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(base["scheduler"])
    if engine.loss_scaler is not None and base.get("loss_scaler") is not None:  # fp16: the scale goes on
        engine.loss_scaler.load_state_dict(base["loss_scaler"])
    engine.skipped_steps = base.get("skipped_steps", 0)
    set_rng_state(_verified_tree(source, base_rank, base["rng"], "rng"))
    return base["client_state"]


def _copy_unowned_params(engine, source: StateSource) -> None:
    """What sync_params would broadcast, read from the owners' payloads instead (snapshot slots of
    every rank on this node): the values each owner copied into its own parameters just now."""
    owned = set(engine.masters.names)
    for name, param in engine._named_params:
        if name not in owned:
            owner_rank, path = source.owner_of[name], f"params/{name}"
            _check_shape(name, source.tensor(owner_rank, path), param, source)
            _copy(source, owner_rank, path, param)


def _check_names(engine, source: StateSource) -> None:
    trainable = [name for name, _ in engine._named_params]
    missing = [name for name in trainable if name not in source.owner_of]
    unexpected = sorted(set(source.owner_of) - set(trainable))
    if missing or unexpected:
        raise CheckpointError(
            f"{source.description}: parameters differ from the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _check_shape(name: str, value: torch.Tensor, target: torch.Tensor, source: StateSource) -> None:
    if value.shape != target.shape:
        raise CheckpointError(
            f"{source.description}: {name!r} has shape {tuple(value.shape)} in the checkpoint, "
            f"{tuple(target.shape)} in the model"
        )


def _verified_tree(source: StateSource, rank: int, tree, prefix: str, into=None):
    """tree with each tensor replaced by a verified copy from the source (a copy: the source may
    be a memory-mapped file or a shared-memory slot that must not stay aliased). The copy goes
    into the tensor at the same place in `into` (the optimizer's current state) where that one
    has the same shape, dtype and device: memory already touched, not allocated anew."""
    if torch.is_tensor(tree):
        value = source.tensor(rank, prefix)
        if torch.is_tensor(into) and (into.shape, into.dtype, into.device) == (value.shape, value.dtype, value.device):
            _copy(source, rank, prefix, into)
            return into
        copied = torch.empty_like(value, memory_format=torch.contiguous_format)
        _copy(source, rank, prefix, copied)
        return copied
    if isinstance(tree, dict):
        into = into if isinstance(into, dict) else {}
        return {
            key: _verified_tree(source, rank, value, f"{prefix}/{key}", into.get(key)) for key, value in tree.items()
        }
    if isinstance(tree, list):
        return [_verified_tree(source, rank, value, f"{prefix}/{index}") for index, value in enumerate(tree)]
    return tree


def _restore_optimizer(engine, source: StateSource, same_world: bool) -> None:
    optimizer = engine.optimizer
    name_of = {id(master): name for name, master in zip(engine.masters.names, engine.masters.masters)}
    per_rank_keys = set(getattr(optimizer, "per_rank_group_keys", ()))
    saved_groups = []  # (hyperparameters, names) of every saved group that holds one of our tensors
    for owner_rank in sorted({source.owner_of[name] for name in engine.masters.names}):
        saved_groups += [(g, set(g["param_names"])) for g in source.payload(owner_rank)["param_groups"]]
    current = optimizer.state_dict()
    tensor_steps = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
    restore_state = getattr(engine._update, "restore_state", None)  # the NVMe tier's swapped state
    state, groups, index, changed = {}, [], 0, {}
    for group, current_group in zip(optimizer.param_groups, current["param_groups"]):
        names = [name_of[id(p)] for p in group["params"] if id(p) in name_of]
        merged = {key: value for key, value in current_group.items() if key != "params"}
        match = next((g for g, saved_names in saved_groups if saved_names & set(names)), None)
        if match is not None:
            exact = same_world and match["param_names"] == names
            skipped = set(STRUCTURAL_GROUP_KEYS) | (set() if exact else per_rank_keys)
            merged.update({key: value for key, value in match.items() if key not in skipped})
            keep_config_hyperparameters(engine, merged, match, current_group, changed)
        elif not names:  # a rank that owns no tensor: its placeholder group follows the lr
            first = source.payload(engine.rank if same_world else 0)["param_groups"]
            if first:
                merged.update({key: first[0][key] for key in PLACEHOLDER_GROUP_KEYS if key in first[0]})
        indices = []
        for param in group["params"]:
            if id(param) in name_of:
                name = name_of[id(param)]
                owner_rank = source.owner_of[name]
                saved_state = source.payload(owner_rank)["optimizer_state"].get(name, {})
                if restore_state is not None:  # tensor by tensor into the swap file, not through RAM
                    tensors = [key for key, value in saved_state.items() if torch.is_tensor(value) and value.dim()]
                    restore_state(
                        name, {key: source.tensor(owner_rank, f"optimizer_state/{name}/{key}") for key in tensors}
                    )
                    saved_state = {key: value for key, value in saved_state.items() if key not in tensors}
                state[index] = _verified_tree(
                    source, owner_rank, saved_state, f"optimizer_state/{name}", current["state"].get(index)
                )
                if tensor_steps and isinstance(state[index].get("step"), int):
                    state[index]["step"] = torch.tensor(float(state[index]["step"]))
            indices.append(index)
            index += 1
        groups.append({**merged, "params": indices})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    log_changes(engine, source, changed)
