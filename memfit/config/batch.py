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
        accumulation, remainder = divmod(train, micro * world_size)
        if remainder or accumulation == 0:
            raise ConfigError(
                [
                    f"train_batch_size: {train} is not a multiple of train_micro_batch_size_per_gpu {micro} x "
                    f"world size {world_size} = {micro * world_size}"
                ]
            )
    elif train is not None and accumulation is not None:
        micro, remainder = divmod(train, accumulation * world_size)
        if remainder or micro == 0:
            raise ConfigError(
                [
                    f"train_batch_size: {train} is not a multiple of gradient_accumulation_steps {accumulation} x "
                    f"world size {world_size} = {accumulation * world_size}"
                ]
            )
    elif micro is not None:
        accumulation = accumulation or 1
        train = micro * accumulation * world_size
    elif train is not None:
        accumulation = 1
        micro, remainder = divmod(train, world_size)
        if remainder or micro == 0:
            raise ConfigError([f"train_batch_size: {train} is not a multiple of world size {world_size}"])
    else:
        raise ConfigError(["train_micro_batch_size_per_gpu: required (or train_batch_size)"])
    return train, micro, accumulation
