"""What a client state may hold. It is restored from a slot's index (a pickle that may name no
class) or from a checkpoint file (torch.load with weights_only=True): a numpy scalar, a datetime
or any other object would be written into every snapshot and then refused by the restore that
needed it, losing the job's crash protection. So it is refused when it is given or saved, naming
the key path and the type."""

import torch

# Exact types, not subclasses: numpy.float64 is a float, and an IntEnum an int, yet each pickles
# as its own class, which a restore refuses.
PLAIN_TYPES = (type(None), bool, int, float, str, bytes)
TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# Not sets: the checkpoint's metadata digest would see a set of strings in a different order in
# the process that loads it.
CONTAINER_TYPES = (dict, list, tuple)
ALLOWED = "None, bools, numbers, strings, bytes, tensors, and dicts, lists or tuples of them"


MAX_DEPTH = 64  # a data position nests a few levels; the slot's writer walks it recursively


def client_state_problem(state, where: str = "client_state", ancestors: tuple = ()) -> str | None:
    """The first value in state that a restore could not load, as one line naming its key path
    and type; None when every value loads."""
    kind = type(state)
    if kind in PLAIN_TYPES or kind in TENSOR_TYPES:
        return None
    if kind not in CONTAINER_TYPES:
        return f"{where}: {_type_name(kind)} cannot be restored from a snapshot or checkpoint; store {ALLOWED}"
    if id(state) in ancestors:
        return f"{where}: holds itself (a cycle), which a snapshot cannot store"
    if len(ancestors) >= MAX_DEPTH:
        return f"{where}: nested more than {MAX_DEPTH} levels deep"
    if kind is dict:
        for key in state:
            if type(key) not in PLAIN_TYPES:
                return f"{where}: key {key!r} is {_type_name(type(key))}; keys must be strings, numbers or None"
        children = [(child, f"{where}[{key!r}]") for key, child in state.items()]
    else:
        children = [(child, f"{where}[{index}]") for index, child in enumerate(state)]
    for child, path in children:
        if (problem := client_state_problem(child, path, (*ancestors, id(state)))) is not None:
            return problem
    return None


def check_client_state(state, where: str) -> None:
    """Raises ValueError naming where (the call that gave state) and the value at fault."""
    if (problem := client_state_problem(state)) is not None:
        raise ValueError(f"{where}: {problem}")


def _type_name(kind: type) -> str:
    module = kind.__module__
    name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    return f"a {name}"
