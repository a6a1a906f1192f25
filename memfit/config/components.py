"""The optimizer and scheduler sections: their names (optimizer names in any case, as DeepSpeed
matches them), their params checked against what receives them, and "auto" in those params
resolved from what memfit.initialize was given, else from documented defaults:

  optimizer.params.K   the passed optimizer class's default for K, the passed optimizer's value
                       (param_groups[0], then defaults), else the registry optimizer's default
  scheduler.params     warmup_max_lr: the optimizer's lr (as the HF Trainer fills it);
                       total_num_steps: never (memfit does not know the run's length);
                       any other key: the schedule's default, which is DeepSpeed's
"""

import contextlib
import difflib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

from memfit.config.client import ClientComponents
from memfit.config.deepspeed_keys import NOT_MEMFIT, OPTIMIZER_PARAM_KEYS
from memfit.config.params import Keyword, check_params, keywords_of
from memfit.config.values import show

TOTAL_STEPS_UNKNOWN = '"auto" cannot be resolved: memfit does not know the number of training steps; give it'


@dataclass(frozen=True)
class Resolved:
    """A value memfit chose for the user: logged on rank 0 as `path = value (reason)`."""

    path: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.path} = {show(self.value)} ({self.reason})"


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resolved: list[Resolved] = field(default_factory=list)


def resolve_optimizer(section, client: ClientComponents, found: Findings) -> tuple[dict | None, float | None]:
    """(the optimizer section to validate, or None when a factory builds the optimizer; the
    optimizer's lr where it is known before the build)."""
    if client.optimizer_factory is not None or client.built_optimizer is not None:
        if section is not None:
            found.warnings.append(f"optimizer: ignored: {client.describe_optimizer()} is used")
        values = client.hyperparameters()
        return None, values.get("lr")
    section = dict(section or {})
    params = section.get("params", {})
    if not isinstance(params, dict):
        found.problems.append(f"optimizer.params: expected an object, got {show(params)}")
        return None, None
    if client.optimizer_class is not None:
        optimizer_class = client.optimizer_class
        named = section.get("type")
        if named is not None and str(named).lower() != optimizer_class.__name__.lower():
            found.warnings.append(f"optimizer.type: {show(named)} ignored: {client.describe_optimizer()} is used")
        keywords = keywords_of(optimizer_class, skip=2)
        source = f"the default of {client.describe_optimizer()}"
        extras = {}

        def attempt(values):
            import torch  # here, not at the top: `memfit --help` runs without torch

            with _stand_in_build():
                optimizer_class([torch.nn.Parameter(torch.zeros(4, 4))], **values)

    else:
        from memfit.optim.registry import OPTIMIZERS

        name = _registered_optimizer(section.get("type", "AdamW"), found)
        if name is None:
            return None, None
        section["type"] = name
        keywords = keywords_of(OPTIMIZERS[name], skip=1)
        source = f"{name}'s default"
        extras = OPTIMIZER_PARAM_KEYS.get(name.lower(), {})

        def attempt(values):
            import torch

            with _stand_in_build():
                OPTIMIZERS[name]([("attn.weight", torch.nn.Parameter(torch.zeros(4, 4)))], **values)

    params = _screen_extras("optimizer.params", params, extras, found)
    params, unresolved = _resolve_auto("optimizer.params", params, keywords, {}, source, found)
    params, problems = check_params("optimizer.params", params, keywords, attempt, unresolved)
    found.problems += problems
    section["params"] = params
    default_lr = next((k.default for k in keywords if k.name == "lr" and not k.required), None)
    return section, params.get("lr", default_lr)


@contextlib.contextmanager
def _stand_in_build():
    """The check builds the optimizer over one stand-in tensor: that a low-rank optimizer projects
    none of it says nothing about the model."""
    from memfit.optim.groups import NothingProjectedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingProjectedWarning)
        yield


def resolve_scheduler(section, client: ClientComponents, optimizer_lr, found: Findings) -> dict | None:
    """The scheduler section to validate, or None when memfit.initialize was given a scheduler."""
    from memfit.runtime.schedulers import SCHEDULERS

    if client.lr_scheduler is not None:
        if section is not None:
            found.warnings.append("scheduler: ignored: the lr_scheduler passed to memfit.initialize is used")
        return None
    if section is None:
        return None
    section = dict(section)
    name = _known_schedule(section.get("type"), found)
    params = section.get("params", {})
    if not isinstance(params, dict):
        found.problems.append(f"scheduler.params: expected an object, got {show(params)}")
        return None
    if name is None:
        return section
    schedule = SCHEDULERS[name]
    keywords = keywords_of(schedule, skip=2)
    lr_source = (
        "the optimizer's lr" if optimizer_lr is not None else "the optimizer's lr, read when the schedule is built"
    )
    special = {
        "warmup_max_lr": (optimizer_lr, f"auto: {lr_source}"),
        "total_num_steps": TOTAL_STEPS_UNKNOWN,
    }
    params, unresolved = _resolve_auto(
        "scheduler.params", params, keywords, special, f"DeepSpeed's {name} default", found
    )

    def attempt(values):
        import torch

        # as many param groups as the longest per-group list: the real count is known only at build
        num_groups = max([len(value) for value in values.values() if isinstance(value, list)], default=1)
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(max(1, num_groups))]
        schedule(torch.optim.AdamW(groups, lr=optimizer_lr or 1e-3), **values)

    section["params"], problems = check_params("scheduler.params", params, keywords, attempt, unresolved)
    found.problems += problems
    deepspeed_max_lr = next((k.default for k in keywords if k.name == "warmup_max_lr"), None)
    if "warmup_max_lr" not in params and deepspeed_max_lr is not None and optimizer_lr not in (None, deepspeed_max_lr):
        found.warnings.append(
            f"scheduler.params.warmup_max_lr: not given, so {name} warms up to {deepspeed_max_lr} (DeepSpeed's "
            f"default), not to the optimizer's lr {optimizer_lr}; give it, or \"auto\" for the optimizer's lr"
        )
    return section


def _registered_optimizer(name, found: Findings) -> str | None:
    from memfit.optim.registry import DEEPSPEED_ONLY, OPTIMIZERS, find_optimizer

    if not isinstance(name, str):
        found.problems.append(f"optimizer.type: expected a string, got {show(name)}")
        return None
    registered = find_optimizer(name)
    if registered is not None:
        return registered
    if name.lower() in {other.lower() for other in DEEPSPEED_ONLY}:
        found.problems.append(f"optimizer.type: {show(name)} is {NOT_MEMFIT}")
        return None
    close = difflib.get_close_matches(name, list(OPTIMIZERS), n=1, cutoff=0.5)
    hint = f" (did you mean {show(close[0])}?)" if close else ""
    found.problems.append(
        f"optimizer.type: unknown optimizer {show(name)}{hint}; known: {', '.join(sorted(OPTIMIZERS))}"
    )
    return None


def _known_schedule(name, found: Findings) -> str | None:
    import torch

    from memfit.runtime.schedulers import SCHEDULERS

    if not isinstance(name, str):
        message = "required key missing" if name is None else f"expected a string, got {show(name)}"
        found.problems.append(f"scheduler.type: {message}")
        return None
    if name in SCHEDULERS:
        return name
    if hasattr(torch.optim.lr_scheduler, name) and inspect.isclass(getattr(torch.optim.lr_scheduler, name)):
        found.problems.append(
            f"scheduler.type: {show(name)} (torch.optim.lr_scheduler) is {NOT_MEMFIT}; pass lr_scheduler= to "
            "memfit.initialize"
        )
    else:
        close = [known for known in SCHEDULERS if known.lower() == name.lower()]
        close = close or difflib.get_close_matches(name, list(SCHEDULERS), n=1, cutoff=0.5)
        hint = f" (did you mean {show(close[0])}?)" if close else ""
        found.problems.append(f"scheduler.type: unknown schedule {show(name)}{hint}; known: {', '.join(SCHEDULERS)}")
    return None


def _screen_extras(path: str, params: dict, extras: dict, found: Findings) -> dict:
    """DeepSpeed's extra optimizer keys: accepted when they change nothing, else an error."""
    kept = {}
    for key, value in params.items():
        if key == "max_grad_norm":
            found.problems.append(f"{path}.max_grad_norm: not an optimizer parameter; use gradient_clipping")
        elif key in extras:
            verdict = extras[key](value)
            found.problems += [f"{path}.{key}: {verdict.problem}"] if verdict.problem else []
            found.warnings += [f"{path}.{key}: {verdict.warning}"] if verdict.warning else []
        else:
            kept[key] = value
    return kept


def _resolve_auto(
    path: str, params: dict, keywords: list[Keyword], special: dict, source: str, found: Findings
) -> tuple[dict, frozenset]:
    """(params with each "auto" replaced, the keys whose "auto" could not be): special[key] is
    (value, reason) or a problem text; otherwise the keyword's default from `source`. Unknown
    keys are left for check_params."""
    by_name = {keyword.name: keyword for keyword in keywords}
    resolved, unresolved = {}, set()
    for key, value in params.items():
        if not (isinstance(value, str) and value == "auto") or key not in by_name:
            resolved[key] = value
        elif isinstance(special.get(key), str):
            found.problems.append(f"{path}.{key}: {special[key]}")
            unresolved.add(key)
        elif key in special:
            resolved[key], reason = special[key]
            found.resolved.append(Resolved(f"{path}.{key}", resolved[key], reason))
        elif by_name[key].required:
            found.problems.append(f'{path}.{key}: "auto" cannot be resolved: the key has no default; give a value')
            unresolved.add(key)
        else:
            resolved[key] = _as_config_value(by_name[key].default)
            found.resolved.append(Resolved(f"{path}.{key}", resolved[key], f"auto: {source}"))
    return resolved, frozenset(unresolved)


def _as_config_value(value):
    return [_as_config_value(item) for item in value] if isinstance(value, tuple) else value
