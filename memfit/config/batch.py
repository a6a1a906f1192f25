"""DeepSpeed's batch rule: train_batch_size = micro batch x accumulation steps x world size. Any
two give the third; one of train_batch_size / train_micro_batch_size_per_gpu alone means one
accumulation step. "auto" (or a missing key) is a member to derive. What can be checked without
the world size is checked at load time, the rest once the world size is known."""

from memfit.config.errors import ConfigError

TRAIN, MICRO, ACCUMULATION = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def check_world_size(world_size) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
    return world_size


def batch_problems(
    train: int | None, micro: int | None, accumulation: int | None, auto_keys: frozenset = frozenset()
) -> list[str]:
    """Problems that no world size can fix: too few members to derive the rest, or members whose
    product can never divide train_batch_size. auto_keys: the members given as "auto"."""
    if (problem := _underdetermined(train, micro, accumulation, auto_keys)) is not None:
        return [problem]
    factors = [(key, value) for key, value in ((MICRO, micro), (ACCUMULATION, accumulation)) if value is not None]
    product = 1
    for _, value in factors:
        product *= value
    if train is not None and factors and train % product:
        named = " x ".join(f"{key} {value}" for key, value in factors)
        total = f" = {product}" if len(factors) > 1 else ""
        return [f"{TRAIN}: {train} is not a multiple of {named}{total}, at any world size"]
    return []


def _underdetermined(train, micro, accumulation, auto_keys) -> str | None:
    if train is not None or micro is not None:
        return None
    if auto_keys:
        named = ", ".join(key for key in (TRAIN, MICRO, ACCUMULATION) if key in auto_keys)
        wanted = MICRO if accumulation is not None else f"{MICRO} and {ACCUMULATION}"
        return f'{named}: "auto" cannot be derived without {MICRO} or {TRAIN}; give {wanted}'
    return f"{MICRO}: required key missing (or give {TRAIN})"


def resolve_batch(
    train: int | None, micro: int | None, accumulation: int | None, world_size: int, auto_keys: frozenset = frozenset()
) -> tuple[int, int, int, dict[str, str]]:
    """(train_batch_size, micro batch, accumulation steps, {derived key: how}) for world_size
    ranks; a ConfigError, whose message names the world size, if they do not fit."""
    check_world_size(world_size)
    if (problem := _underdetermined(train, micro, accumulation, auto_keys)) is not None:
        raise ConfigError([problem])
    ranks = f"world size {world_size}"
    if train is not None and micro is not None and accumulation is not None:
        if train != micro * accumulation * world_size:
            raise ConfigError(
                [
                    f"{TRAIN}: {train} != {MICRO} {micro} x {ACCUMULATION} {accumulation} x {ranks} = "
                    f"{micro * accumulation * world_size}"
                ]
            )
        return train, micro, accumulation, {}
    if train is not None and micro is not None:
        accumulation = _quotient(train, [(MICRO, micro)], world_size)
        return train, micro, accumulation, {ACCUMULATION: f"derived: {TRAIN} / ({MICRO} x {ranks})"}
    if train is not None and accumulation is not None:
        micro = _quotient(train, [(ACCUMULATION, accumulation)], world_size)
        return train, micro, accumulation, {MICRO: f"derived: {TRAIN} / ({ACCUMULATION} x {ranks})"}
    if train is not None:
        micro = _quotient(train, [], world_size)
        return train, micro, 1, {MICRO: f"derived: {TRAIN} / {ranks}", ACCUMULATION: f"derived: 1 with {TRAIN} alone"}
    derived = {TRAIN: f"derived: {MICRO} x {ACCUMULATION} x {ranks}"}
    if accumulation is None:
        accumulation = 1
        derived[ACCUMULATION] = f"derived: 1 with {MICRO} alone"
    return micro * accumulation * world_size, micro, accumulation, derived


def _quotient(train: int, factors: list[tuple[str, int]], world_size: int) -> int:
    """train_batch_size / (factors x world size), which must be a whole number."""
    divisor = world_size
    for _, value in factors:
        divisor *= value
    quotient, remainder = divmod(train, divisor)
    if remainder:
        named = " x ".join([f"{key} {value}" for key, value in factors] + [f"world size {world_size}"])
        total = f" = {divisor}" if factors else ""
        raise ConfigError([f"{TRAIN}: {train} is not a multiple of {named}{total}"])
    return quotient
