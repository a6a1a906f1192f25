"""Param groups for the low-rank optimizers: 2-D weights of the named target modules are
projected; everything else (embeddings, norms, the output layer, biases) gets full AdamW.
Each group carries its parameters' names, which seed per-matrix random choices by name."""

import torch


def split_projectable(named_params, target_modules=("attn", "mlp")):
    projected, plain = [], []
    for name, param in named_params:
        module_name = name.rsplit(".", 1)[0]
        is_target = any(target in module_name for target in target_modules)
        (projected if is_target and param.dim() == 2 else plain).append((name, param))
    return projected, plain


def _groups(named_params, target_modules, projected_options: dict) -> list[dict]:
    if isinstance(named_params, torch.nn.Module):
        named_params = [(n, p) for n, p in named_params.named_parameters() if p.requires_grad]
    projected, plain = split_projectable(list(named_params), target_modules)
    groups = []
    if plain:
        groups.append({"params": [p for _, p in plain], "names": [n for n, _ in plain]})
    if projected:
        groups.append({"params": [p for _, p in projected], "names": [n for n, _ in projected], **projected_options})
    return groups


def galore_param_groups(model, rank: int, target_modules=("attn", "mlp"), **options) -> list[dict]:
    """galore-torch's grouping: 2-D weights in modules whose name contains a target get `rank`
    (and any other GaLore group option given); the rest run plain AdamW."""
    return _groups(model, target_modules, {"rank": rank, **options})


def frugal_param_groups(model, target_modules=("attn", "mlp"), **options) -> list[dict]:
    """FRUGAL's grouping: the same 2-D target weights are projectable (`projectable=True`); the
    rest get full AdamW, as in the reference."""
    return _groups(model, target_modules, {"projectable": True, **options})
