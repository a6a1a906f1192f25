"""DeepSpeed's entry points on memfit: a DeepSpeed training script runs with
`import memfit.deepspeed as deepspeed` and nothing else changed.

    parser = deepspeed.add_config_arguments(parser)        # --deepspeed, --deepspeed_config
    engine, optimizer, loader, scheduler = deepspeed.initialize(args=args, model=model,
                                                                 model_parameters=model.parameters())
    loss = engine(batch); engine.backward(loss); engine.step()
    engine.save_checkpoint(dir, tag, client_state); path, client_state = engine.load_checkpoint(dir)

The config is read as DeepSpeed reads it (config=, config_params=, or args.deepspeed_config).
An optimizer passed in as an instance (the usual `torch.optim.AdamW(model.parameters(), ...)`)
is re-pointed at the tensors each rank owns, keeping its hyperparameters and param groups, and
is the optimizer initialize returns and the engine steps; a scheduler built over it stays the
same object. A callable optimizer is called with those tensors. model_parameters given as param
groups keep their per-group hyperparameters (weight-decay groups), matched by tensor. With no
optimizer (none passed, no optimizer section) the engine runs forward only, as DeepSpeed's.
memfit.initialize stays the plain API.
"""

import inspect
import logging
import os
import warnings

import torch
import torch.distributed as dist

import memfit
from memfit.deepspeed import checkpointing, comm, ops, zero  # noqa: F401  (deepspeed.checkpointing, .comm, .ops.adam, .zero)
from memfit.deepspeed.engine import DeepSpeedEngine
from memfit.deepspeed.errors import DeepSpeedUsageError

logger = logging.getLogger("memfit")

# The DeepSpeed release whose API and semantics memfit.deepspeed follows; scripts compare it.
__version__ = "0.19.8"
__git_hash__ = f"memfit-{memfit.__version__}"  # no DeepSpeed commit: this is memfit
__git_branch__ = "memfit"
__version_major__, __version_minor__, __version_patch__ = 0, 19, 8


def add_config_arguments(parser):
    """Adds DeepSpeed's --deepspeed and --deepspeed_config (and the deprecated --deepscale ones)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations (run by memfit)")
    group.add_argument("--deepspeed", default=False, action="store_true", help="Enable DeepSpeed (no effect)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true", help="Deprecated; no effect.")
    group.add_argument("--deepscale_config", default=None, type=str, help="Deprecated --deepspeed_config.")
    return parser


init_distributed = comm.init_distributed


def initialize(
    args=None,
    model=None,
    optimizer=None,
    model_parameters=None,
    training_data=None,
    lr_scheduler=None,
    distributed_port=None,
    mpu=None,
    dist_init_required=None,
    collate_fn=None,
    config=None,
    mesh_param=None,
    config_params=None,
):
    """DeepSpeed's initialize: returns (engine, optimizer, training dataloader or None, scheduler)."""
    if model is None:
        raise DeepSpeedUsageError("model: required")
    if mpu is not None or mesh_param is not None:
        raise ValueError("mpu / mesh_param: model parallelism is supported by DeepSpeed, not by memfit")
    config = _config_source(args, config, config_params)
    factory = _optimizer_factory(model, optimizer, model_parameters)
    if lr_scheduler is not None and hasattr(lr_scheduler, "optimizer") and hasattr(lr_scheduler, "step"):
        if lr_scheduler.optimizer is not optimizer:
            raise DeepSpeedUsageError(
                "lr_scheduler: built over another optimizer than the one passed as optimizer=; build it over "
                "that optimizer, or pass a callable optimizer -> scheduler"
            )
        lr_scheduler = rebinding(lr_scheduler)
    elif lr_scheduler is not None and not callable(lr_scheduler):
        raise TypeError(
            "lr_scheduler: expected a scheduler or a callable optimizer -> scheduler, "
            f"got {type(lr_scheduler).__name__}"
        )
    memfit_engine = memfit.initialize(model, config, optimizer=factory, lr_scheduler=lr_scheduler)
    has_optimizer = optimizer is not None or memfit_engine.config.optimizer is not None
    if not has_optimizer and (lr_scheduler is not None or memfit_engine.config.scheduler is not None):
        warnings.warn("scheduler ignored: no optimizer to schedule (none passed, no optimizer section)", stacklevel=2)
    engine = DeepSpeedEngine(memfit_engine, has_optimizer=has_optimizer)
    loader = engine.deepspeed_io(training_data, collate_fn=collate_fn) if training_data is not None else None
    return engine, engine.optimizer, loader, engine.lr_scheduler


SCHEDULED_GROUP_KEYS = ("lr", "initial_lr", "betas", "momentum")


def rebinding(scheduler):
    """A scheduler built over the client's optimizer, kept as it is. memfit re-points that
    optimizer at the tensors each rank owns, which rebuilds its param groups; what the scheduler
    wrote into the groups (the current lr, initial_lr, betas or momentum) is read now and written
    back into the new groups."""
    old_groups = scheduler.optimizer.param_groups
    scheduled = [{key: group[key] for key in SCHEDULED_GROUP_KEYS if key in group} for group in old_groups]

    def build(optimizer):
        assert optimizer is scheduler.optimizer, "the client's optimizer is the one memfit steps"
        if len(optimizer.param_groups) != len(scheduled):
            raise ValueError(
                f"lr_scheduler: built over {len(scheduled)} param groups, but this rank's optimizer has "
                f"{len(optimizer.param_groups)} (a group with no tensor on this rank); pass a callable "
                "optimizer -> scheduler instead"
            )
        for group, values in zip(optimizer.param_groups, scheduled):
            group.update({k: v for k, v in values.items() if k in group or k == "initial_lr"})
        return scheduler

    return build


def _config_source(args, config, config_params):
    if config is None and config_params is not None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise DeepSpeedUsageError("config: given both in args.deepspeed_config and to initialize(); give one")
        config = from_args
    if config is None:
        config = os.environ.get("MEMFIT_CONFIG")  # `memfit run --config FILE`
    if config is None:
        raise DeepSpeedUsageError(
            "config: none given (pass config=, --deepspeed_config through add_config_arguments, or memfit run --config)"
        )
    return config


def _optimizer_factory(model, optimizer, model_parameters):
    """What memfit.initialize builds the optimizer from: None (the config's), or a factory over
    the (name, tensor) pairs of the owned tensors that keeps the user's class, hyperparameters and
    param groups."""
    groups = _user_groups(model, model_parameters)
    if optimizer is None and groups is None:
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        cls, defaults = type(optimizer), dict(optimizer.defaults)
        if groups is None:  # the optimizer's own groups say which tensors get which hyperparameters
            groups = _groups_by_tensor(model, optimizer.param_groups)

        def build(named_params, _from_config):
            # the client's own object, re-pointed at the tensors this rank owns (its state starts
            # anew): what initialize returns is what the engine steps, as in DeepSpeed
            optimizer.__init__(_owned_groups(named_params, groups), **_constructor_keywords(cls, defaults))
            return optimizer

    elif optimizer is None:

        def build(named_params, from_config):
            built = from_config(named_params)
            cls = type(built)
            if hasattr(built, "planned_state_bytes"):  # GaLore, FRUGAL: groups of their own
                raise ValueError(
                    f"model_parameters: param groups with the config's {cls.__name__}; build its groups with "
                    "memfit.optim's group helpers and pass the optimizer instead"
                )
            return cls(_owned_groups(named_params, groups), **_constructor_keywords(cls, built.defaults))

        build.uses_config = True  # the config's optimizer section is read, checked and used

    elif callable(optimizer):

        def build(named_params, _from_config):
            if groups is not None:
                return optimizer(_owned_groups(named_params, groups))
            return optimizer([tensor for _, tensor in named_params])

    else:
        raise TypeError(f"optimizer: expected an Optimizer or a callable, got {type(optimizer).__name__}")
    build.memfit_named = True  # memfit.initialize passes (name, tensor) pairs and the config's builder
    return build


def _constructor_keywords(cls, defaults: dict) -> dict:
    accepted = inspect.signature(cls).parameters
    return {key: value for key, value in defaults.items() if key in accepted and key != "params"}


def _user_groups(model, model_parameters):
    """model_parameters as param groups keyed by parameter name, or None when it is a plain
    iterable of tensors (or absent)."""
    if model_parameters is None:
        return None
    items = list(model_parameters)
    if not items or not isinstance(items[0], dict):
        return None
    return _groups_by_tensor(model, items)


def _groups_by_tensor(model, param_groups) -> list[dict]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [
        {"names": {name_of[id(p)] for p in group["params"] if id(p) in name_of}}
        | {key: value for key, value in group.items() if key not in ("params", "names", "initial_lr")}
        for group in param_groups
    ]


def _owned_groups(named_params, groups) -> list[dict]:
    """The user's groups restricted to the tensors this rank owns (empty groups dropped)."""
    owned = []
    for group in groups:
        tensors = [tensor for name, tensor in named_params if name in group["names"]]
        if tensors:
            owned.append({"params": tensors, **{k: v for k, v in group.items() if k != "names"}})
    return owned or [{"params": [tensor for _, tensor in named_params]}]


def is_initialized() -> bool:
    return dist.is_initialized()
