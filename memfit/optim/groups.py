"""Which tensors GaLore and FRUGAL project, and the param groups that say so.

The default rule works on any model from its parameter names and shapes alone: every trainable
2-D parameter is projected except the first and the last, the model's input and output layers
(a language model's token embedding and LM head, an MLP's first and last Linear). The order is
registration order (`named_parameters`); frozen parameters (requires_grad=False) take no part,
so with a frozen embedding the first trainable matrix counts as the input layer. From a module,
a tied weight is listed under each of its names, so a head tied to the embedding is the last
entry and every hidden matrix stays projected; a (name, tensor) list says nothing of ties, so
pass the module, or named_parameters(remove_duplicate=False), for a tied model. Tensors that
are not 2-D (norms, biases, convolutions) are never projected. `target_modules` replaces the
rule: then the 2-D parameters whose module name contains one of the given strings are projected.

The answer depends on the whole model, while inside memfit's engine each rank builds its
optimizer over the tensors it owns. memfit.initialize therefore builds it inside
`model_layout(model)`, and the config factories classify their tensors against that layout, so
every rank projects exactly what a single process would. Each group carries its parameters'
names, which seed per-matrix random choices by name."""

import contextlib
import contextvars
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch

_MODEL_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("memfit_model_layout", default=None)


class NothingProjectedWarning(UserWarning):
    """A low-rank optimizer whose groups project no tensor: it runs full AdamW on everything."""


def warn_nothing_projected(optimizer_name: str, group_key: str) -> None:
    warnings.warn(
        f"{optimizer_name}: nothing is projected (no parameter is in a group with {group_key!r}), so every "
        f"tensor gets full AdamW state; build the groups with galore_param_groups / frugal_param_groups "
        f"or name the layers with target_modules",
        NothingProjectedWarning,
        stacklevel=3,
    )


def layout_of(model_or_named) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in registration order: of a module's trainable parameters (a tied tensor
    under each of its names), or of a list of (name, tensor or shape) as given."""
    if isinstance(model_or_named, torch.nn.Module):
        named = [(n, p) for n, p in model_or_named.named_parameters(remove_duplicate=False) if p.requires_grad]
    else:
        named = model_or_named
    return [(name, tuple(value.shape) if torch.is_tensor(value) else tuple(value)) for name, value in named]


@contextlib.contextmanager
def model_layout(model_or_named) -> Iterator[None]:
    """While active, the config factories ("GaLoreAdamW", "FRUGAL") decide which of the tensors
    they are given to project from this whole model, not from those tensors alone."""
    token = _MODEL_LAYOUT.set(layout_of(model_or_named))
    try:
        yield
    finally:
        _MODEL_LAYOUT.reset(token)


def current_layout() -> list[tuple[str, tuple[int, ...]]] | None:
    return _MODEL_LAYOUT.get()


@contextlib.contextmanager
def quiet_if_model_projects(model_or_named, target_modules: Sequence[str] | None = None) -> Iterator[None]:
    """Silences NothingProjectedWarning while an optimizer is built over one rank's share of a
    model that does project something (another rank owns those tensors)."""
    with warnings.catch_warnings():
        if projected_names(model_or_named, target_modules):
            warnings.simplefilter("ignore", NothingProjectedWarning)
        yield


def _check_targets(target_modules) -> tuple[str, ...] | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules) if isinstance(target_modules, Iterable) else None
    if not targets or not all(isinstance(target, str) and target for target in targets):
        raise ValueError(f"target_modules: expected a non-empty list of module name parts, got {target_modules!r}")
    return targets


def projected_names(model_or_named, target_modules: Sequence[str] | None = None) -> list[str]:
    """The names the rule projects, in model order. model_or_named: a module, or the whole
    model's (name, tensor or shape) pairs in registration order."""
    targets = _check_targets(target_modules)
    layout = layout_of(model_or_named)
    matrices = [name for name, shape in layout if len(shape) == 2]
    if targets is not None:
        chosen = {name for name in matrices if any(target in name.rsplit(".", 1)[0] for target in targets)}
    else:
        chosen = set(matrices[1:-1])
    return [name for name, _ in layout if name in chosen]


def split_projectable(named_params, target_modules: Sequence[str] | None = None, *, layout=None):
    """(projected, plain) lists of (name, tensor); layout: the whole model to decide from (a
    module or its (name, tensor or shape) pairs), when named_params holds only a share of it."""
    named_params = list(named_params)
    chosen = set(projected_names(named_params if layout is None else layout, target_modules))
    projected = [(name, param) for name, param in named_params if name in chosen]
    plain = [(name, param) for name, param in named_params if name not in chosen]
    return projected, plain


def _groups(model, target_modules, projected_options: dict, layout) -> list[dict]:
    if isinstance(model, torch.nn.Module):
        if layout is None:
            layout = model
        model = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    projected, plain = split_projectable(model, target_modules, layout=layout)
    groups = []
    if plain:
        groups.append({"params": [p for _, p in plain], "names": [n for n, _ in plain]})
    if projected:
        groups.append({"params": [p for _, p in projected], "names": [n for n, _ in projected], **projected_options})
    return groups


def galore_param_groups(
    model, rank: int, target_modules: Sequence[str] | None = None, *, layout=None, **options
) -> list[dict]:
    """GaLoreAdamW groups: the projected 2-D weights (see the module docstring) get `rank` and
    any other GaLore group option given; the rest run plain AdamW. model: a module (its
    trainable parameters) or (name, tensor) pairs; layout: the whole model when model is a share."""
    return _groups(model, target_modules, {"rank": rank, **options}, layout)


def frugal_param_groups(model, target_modules: Sequence[str] | None = None, *, layout=None, **options) -> list[dict]:
    """FRUGAL groups: the same 2-D weights are projectable (`projectable=True`); the rest get
    full AdamW, as in the reference."""
    return _groups(model, target_modules, {"projectable": True, **options}, layout)
