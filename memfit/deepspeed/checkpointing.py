"""deepspeed.checkpointing on memfit, for Megatron-style scripts: checkpoint(function, *args)
runs function keeping only its inputs for backward (torch's non-reentrant checkpoint; at ZeRO
stage 3 the run in backward gathers what it uses), configure() takes DeepSpeed's arguments.
Only checkpoint_in_cpu acts (the saved inputs go to host memory when they are on a GPU); the
others concern DeepSpeed's model parallelism and buffers and are accepted with a warning."""

import warnings

from memfit.runtime import activation_checkpointing

_settings = {"configured": False, "checkpoint_in_cpu": False}
_IGNORED = ("partition_activations", "contiguous_checkpointing", "num_checkpoints", "synchronize", "profile")


def configure(
    mpu_=None,
    deepspeed_config=None,
    partition_activations=None,
    contiguous_checkpointing=None,
    num_checkpoints=None,
    checkpoint_in_cpu=None,
    synchronize=None,
    profile=None,
) -> None:
    """As DeepSpeed's: the config's activation_checkpointing section (a path, a dict or a
    memfit config), then the arguments given, which take precedence."""
    if deepspeed_config is not None:
        from memfit.config import load_config

        section = load_config(deepspeed_config).activation_checkpointing
        _settings["checkpoint_in_cpu"] = section.cpu_checkpointing
    if checkpoint_in_cpu is not None:
        _settings["checkpoint_in_cpu"] = bool(checkpoint_in_cpu)
    given = {
        "partition_activations": partition_activations,
        "contiguous_checkpointing": contiguous_checkpointing,
        "num_checkpoints": num_checkpoints,
        "synchronize": synchronize,
        "profile": profile,
    }
    for name in _IGNORED:
        if given[name]:
            warnings.warn(
                f"deepspeed.checkpointing.configure: {name}={given[name]!r} is ignored by memfit", stacklevel=2
            )
    _settings["configured"] = True


def is_configured() -> bool:
    return _settings["configured"]


def reset() -> None:
    """DeepSpeed frees its contiguous buffers here; memfit keeps none."""


def checkpoint(function, *args):
    """function(*args), keeping only args for backward."""
    return activation_checkpointing.checkpoint(function, *args, keep_inputs_on_host=_settings["checkpoint_in_cpu"])


__all__ = ["checkpoint", "configure", "is_configured", "reset"]
