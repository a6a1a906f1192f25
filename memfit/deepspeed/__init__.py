"""DeepSpeed's entry points on memfit: a DeepSpeed training script runs with
`import memfit.deepspeed as deepspeed` and nothing else changed.

    parser = deepspeed.add_config_arguments(parser)        # --deepspeed, --deepspeed_config
    engine, optimizer, loader, scheduler = deepspeed.initialize(args=args, model=model,
                                                                 model_parameters=model.parameters())
    loss = engine(batch); engine.backward(loss); engine.step()
    engine.save_checkpoint(dir, tag, client_state); path, client_state = engine.load_checkpoint(dir)

The config is read as DeepSpeed reads it (config=, config_params=, or args.deepspeed_config).
An optimizer passed in, as an instance (the usual `torch.optim.AdamW(model.parameters(), ...)`)
or as a callable, is rebuilt over the tensors each rank owns with the same class and
hyperparameters; model_parameters given as param groups keep their per-group hyperparameters
(weight-decay groups), matched by tensor. memfit.initialize stays the plain API.
"""

import inspect
import logging
import os

import torch
import torch.distributed as dist

import memfit
from memfit.runtime.distributed import init_distributed as _init_distributed

logger = logging.getLogger("memfit")


def add_config_arguments(parser):
    """Adds DeepSpeed's --deepspeed and --deepspeed_config (and the deprecated --deepscale ones)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations (run by memfit)")
    group.add_argument("--deepspeed", default=False, action="store_true", help="Enable DeepSpeed (no effect)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true", help="Deprecated; no effect.")
    group.add_argument("--deepscale_config", default=None, type=str, help="Deprecated --deepspeed_config.")
    return parser


def init_distributed(dist_backend=None, auto_mpi_discovery=True, distributed_port=None, verbose=True, **kwargs):
    """Joins the process group torchrun describes (gloo on the CPU, NCCL on GPUs); a no-op when
    it is joined already or when running as one process."""
    if dist_backend not in (None, "gloo", "nccl"):
        raise ValueError(f"dist_backend: memfit runs on gloo or nccl, got {dist_backend!r}")
    _init_distributed()


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
        raise ValueError("model: required")
    if mpu is not None or mesh_param is not None:
        raise ValueError("mpu / mesh_param: model parallelism is supported by DeepSpeed, not by memfit")
    config = _config_source(args, config, config_params)
    factory = _optimizer_factory(model, optimizer, model_parameters)
    if lr_scheduler is not None and not callable(lr_scheduler):
        raise TypeError(
            "lr_scheduler: pass a callable optimizer -> scheduler; a scheduler already built is bound to an "
            "optimizer that memfit replaces with one over the tensors each rank owns"
        )
    engine = DeepSpeedEngine(memfit.initialize(model, config, optimizer=factory, lr_scheduler=lr_scheduler))
    loader = engine.deepspeed_io(training_data, collate_fn=collate_fn) if training_data is not None else None
    return engine, engine.optimizer, loader, engine.lr_scheduler


def _config_source(args, config, config_params):
    if config is None and config_params is not None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise ValueError("config: given both in args.deepspeed_config and to initialize(); give one")
        config = from_args
    if config is None:
        raise ValueError("config: none given (pass config=, or --deepspeed_config through add_config_arguments)")
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
            return cls(_owned_groups(named_params, groups), **_constructor_keywords(cls, defaults))

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


class DeepSpeedEngine:
    """DeepSpeed's engine interface over a memfit Engine; anything else reaches the memfit engine."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    forward = __call__

    @property
    def module(self):
        return self._engine.module

    @property
    def optimizer(self):
        return self._engine.optimizer

    @property
    def lr_scheduler(self):
        return self._engine.lr_scheduler

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        if not scale_wrt_gas:
            raise ValueError("scale_wrt_gas=False: memfit always divides the loss by gradient_accumulation_steps")
        self._engine.backward(loss, retain_graph=retain_graph)
        return loss

    def step(self, lr_kwargs=None):
        if lr_kwargs:
            raise ValueError("lr_kwargs: not supported by memfit's schedulers")
        self._engine.step()

    def zero_grad(self):
        self._engine.module.zero_grad()

    def train(self, mode: bool = True):
        self._engine.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def global_steps(self) -> int:
        return self._engine.global_step

    @property
    def global_samples(self) -> int:
        return self._engine.global_step * self.train_batch_size()

    @property
    def skipped_steps(self) -> int:
        return self._engine.skipped_steps

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self._engine.optimizer.param_groups]

    def get_loss_scale(self) -> float:
        return self._engine.loss_scaler.scale if self._engine.loss_scaler is not None else 1.0

    def train_batch_size(self) -> int:
        return self._engine.micro_batch_size * self._engine.gradient_accumulation_steps * self._engine.world_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._engine.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self._engine.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return self._engine.is_boundary()

    @property
    def global_rank(self) -> int:
        return self._engine.rank

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def dp_world_size(self) -> int:
        return self._engine.world_size

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        if not save_latest or exclude_frozen_parameters:
            raise ValueError("save_latest=False / exclude_frozen_parameters=True: not supported by memfit")
        self._engine.save_checkpoint(save_dir, tag, client_state or {})
        return True

    def load_checkpoint(
        self,
        load_dir,
        tag=None,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_only=False,
        custom_load_fn=None,
    ):
        """(path, client_state); (None, None) with a warning when load_dir holds no checkpoint,
        as in DeepSpeed."""
        if not (load_module_strict and load_optimizer_states and load_lr_scheduler_states) or load_module_only:
            raise ValueError("load_checkpoint: memfit restores everything; partial loads are not supported")
        if custom_load_fn is not None:
            raise ValueError("custom_load_fn: not supported by memfit")
        if tag is None and not os.path.exists(os.path.join(os.fspath(load_dir), "latest")):
            logger.warning("no checkpoint in %s (no 'latest' file); nothing loaded", load_dir)
            return None, None
        client_state = self._engine.load_checkpoint(load_dir, tag)
        tag = tag or open(os.path.join(os.fspath(load_dir), "latest")).read().strip()
        return os.path.join(os.fspath(load_dir), tag), client_state

    def deepspeed_io(self, dataset, batch_size=None, route=None, pin_memory=True, data_sampler=None, collate_fn=None,
                     num_local_io_workers=None):  # fmt: skip
        """A DataLoader of micro-batches, each rank its own shard (DistributedSampler), as DeepSpeed's."""
        world_size, rank = self._engine.world_size, self._engine.rank
        if data_sampler is None and world_size > 1:
            data_sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world_size, rank=rank)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size or self._engine.micro_batch_size,
            sampler=data_sampler,
            collate_fn=collate_fn,
            num_workers=num_local_io_workers or 0,
        )


def is_initialized() -> bool:
    return dist.is_initialized()
