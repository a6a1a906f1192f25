"""DeepSpeed's batch rule: train_batch_size = micro batch x accumulation steps x world size; any
two of the three give the third."""

from memfit.config.errors import ConfigError


def resolve_batch(config, world_size: int) -> tuple[int, int, int]:
    train = config.train_batch_size
    micro = config.train_micro_batch_size_per_gpu
    accumulation = config.gradient_accumulation_steps
    if train is not None and micro is not None and accumulation is not None:
        if train != micro * accumulation * world_size:
            raise ConfigError(
                [
                    f"train_batch_size: {train} != train_micro_batch_size_per_gpu {micro} x "
                    f"gradient_accumulation_steps "
                    f"{accumulation} x world size {world_size} = {micro * accumulation * world_size}"
                ]
            )
    elif train is not None and micro is not None:
        accumulation = _quotient(
            train,
            f"train_micro_batch_size_per_gpu {micro} x world size {world_size} = {micro * world_size}",
            micro * world_size,
        )
    elif train is not None and accumulation is not None:
        micro = _quotient(
            train,
            f"gradient_accumulation_steps {accumulation} x world size {world_size} = {accumulation * world_size}",
            accumulation * world_size,
        )
    elif micro is not None:
        accumulation = accumulation or 1
        train = micro * accumulation * world_size
    elif train is not None:
        accumulation = 1
        micro = _quotient(train, f"world size {world_size}", world_size)
    else:
        raise ConfigError(["train_micro_batch_size_per_gpu: required (or train_batch_size)"])
    return train, micro, accumulation


def _quotient(train: int, factors: str, divisor: int) -> int:
    """train_batch_size / divisor, which must be a positive whole number."""
    quotient, remainder = divmod(train, divisor)
    if remainder or quotient == 0:
        raise ConfigError([f"train_batch_size: {train} is not a multiple of {factors}"])
    return quotient
