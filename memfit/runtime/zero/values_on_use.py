"""A torch-function mode that keeps parameters' values out of memory between the torch calls that
use them: memfit.zero_init (the values rest in a birth file) and the end of memfit.initialize with
a model built under it (they rest in the stage-3 parameter store).

Design note.
- Resting. A resting parameter holds a placeholder of its shape (nothing in memory); `lookup`
  maps it to where its values rest: read() -> values, write(values), release() (the placeholder
  back). Calls that read only metadata (shape, dtype, device, requires_grad...) run on the
  placeholder; any other call with a resting parameter among its arguments (self, keyword
  arguments, lists and tuples of tensors) reads it in, runs, and releases it again, writing the
  values back when the call changed them (the parameter's version counter moved, or its data was
  replaced). So one tensor at a time is in memory, and every value equals an eager run's.
- Views. A call that returns a view of a parameter's memory (`w.data`, `w.view(-1)`, `w[0]`)
  would let later code write into memory the parameter no longer uses. Such a parameter stays in
  memory, pinned, while any such view is alive; it is written back and released at the first
  call after they are all gone, or when the mode ends (with a warning if a view outlives it).
- Autograd. A call run with gradients on saves a reference instead of (a view of) a parameter
  it read in (saved-tensor hooks, as stage 3 does), and backward reads the values again from
  where they rest: a graph built in the context stays exact (until initialize takes the values).
"""

import warnings
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from memfit.runtime.memory_stats import return_freed_pages

_METHODS = ("size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex", "get_device",
            "requires_grad_", "register_hook", "register_post_accumulate_grad_hook", "__len__")  # fmt: skip
_PROPERTIES = ("shape", "ndim", "dtype", "device", "requires_grad", "is_leaf", "layout", "is_cuda", "is_cpu",
               "is_meta", "is_sparse", "is_quantized", "grad", "grad_fn", "_version", "itemsize", "nbytes",
               "_backward_hooks")  # fmt: skip
METADATA = frozenset(
    [getattr(torch.Tensor, name) for name in _METHODS]
    + [getattr(torch.Tensor, name).__get__ for name in _PROPERTIES]
    + [torch.Tensor.grad.__set__, torch.Tensor.requires_grad.__set__, torch.numel, torch.is_floating_point]
    + [torch.is_complex]
)
# Resting values are read back contiguous: these answer as for a contiguous tensor of the shape.
LAYOUT = frozenset([torch.Tensor.is_contiguous, torch.Tensor.stride])
DATA_SET = torch.Tensor.data.__set__


def _among(func, functions: frozenset) -> bool:
    try:
        return func in functions
    except TypeError:  # an unhashable callable is none of torch's
        return False


def tensor_arguments(args, kwargs):
    """The tensors among a call's arguments, also inside lists and tuples."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, torch.Tensor):
            yield arg
        elif type(arg) in (list, tuple):
            for item in arg:
                if isinstance(item, torch.Tensor):
                    yield item


def _views_of(param, output) -> list:
    """Weak references to the tensors in output that share param's memory (param itself aside)."""
    if param.numel() == 0 or param.layout != torch.strided:
        return []
    pointer = param.untyped_storage().data_ptr()
    leaves, _ = tree_flatten(output)
    return [
        weakref.ref(leaf)
        for leaf in leaves
        if isinstance(leaf, torch.Tensor)
        and leaf is not param
        and leaf.layout == torch.strided
        and leaf.device == param.device
        and leaf.untyped_storage().data_ptr() == pointer
    ]


class _SavedValues:
    """What autograd keeps instead of (a view of) a parameter read in for one call."""

    __slots__ = ("place", "size", "stride", "offset")  # offset: from the parameter's first element

    def __init__(self, place, size, stride, offset):
        self.place, self.size, self.stride, self.offset = place, size, stride, offset


def _packer(held: list):
    """Saved-tensor pack hook: a tensor in the memory of a parameter in held [(param, place)]
    becomes a reference to where the parameter's values rest."""

    def pack(tensor):
        if tensor.layout != torch.strided:
            return tensor
        pointer = tensor.untyped_storage().data_ptr()
        for param, place in held:
            if param.numel() and tensor.device == param.device and param.untyped_storage().data_ptr() == pointer:
                offset = tensor.storage_offset() - param.storage_offset()
                return _SavedValues(place, tensor.size(), tensor.stride(), offset)
        return tensor

    return pack


def _unpack(saved):
    if not isinstance(saved, _SavedValues):
        return saved
    with torch._C.DisableTorchFunction():
        values = saved.place.read()
        return values.as_strided(saved.size, saved.stride, saved.offset)


class ValuesOnUse(TorchFunctionMode):
    def __init__(self, lookup):
        """lookup(tensor) -> its resting place (read, write, release), or None for any other tensor."""
        super().__init__()
        self.lookup = lookup
        self.pinned: dict[int, tuple] = {}  # id -> (param, resting place, weak refs to its views)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pinned:
            self.settle()
        resting, pinned = {}, {}
        for tensor in tensor_arguments(args, kwargs):
            key = id(tensor)
            if key in self.pinned:
                pinned[key] = tensor
            elif key not in resting and (place := self.lookup(tensor)) is not None:
                resting[key] = (tensor, place)
        if not resting and not pinned or _among(func, METADATA):
            return func(*args, **kwargs)
        if _among(func, LAYOUT) and resting and id(args[0]) in resting:
            return func(torch.empty(args[0].shape, device="meta"), *args[1:], **kwargs)
        versions = {}
        try:
            # `param.data = x` does not read param (unless x is param: Module.to that changes nothing)
            replaced = id(args[0]) if func == DATA_SET and args[1] is not args[0] else None
            for key, (param, place) in resting.items():
                if key != replaced:
                    param.data = place.read()
                    versions[key] = param._version
            held = [resting[key] for key in versions] + [self.pinned[key][:2] for key in pinned]
            if torch.is_grad_enabled() and any(param.requires_grad for param, _ in held):
                with saved_tensors_hooks(_packer(held), _unpack):
                    output = func(*args, **kwargs)
            else:
                output = func(*args, **kwargs)
        except BaseException:
            for key, (param, place) in resting.items():
                if key in versions:
                    self._rest(param, place, changed=param._version != versions[key])
            raise
        for key, (param, place) in resting.items():
            views = _views_of(param, output)
            if views:
                self.pinned[key] = (param, place, views)
            else:
                self._rest(param, place, changed=key not in versions or param._version != versions[key])
        for key, param in pinned.items():
            self.pinned[key][2].extend(_views_of(param, output))
        return output

    @staticmethod
    def _rest(param, place, changed: bool) -> None:
        with torch._C.DisableTorchFunction():
            if changed:
                place.write(param.data)
            place.release()
            return_freed_pages(param.numel() * param.element_size())

    def settle(self, ending: bool = False) -> None:
        """Writes back and releases each pinned parameter whose views are all gone (ending: every
        one, warning about views still alive)."""
        with torch._C.DisableTorchFunction():  # and so no call in here comes back to this mode
            done = [key for key, (_, _, views) in self.pinned.items() if ending or all(v() is None for v in views)]
            for key in done:
                param, place, views = self.pinned.pop(key)
                if any(view() is not None for view in views):
                    warnings.warn(
                        f"a view of a parameter of shape {tuple(param.shape)} outlives the context that keeps its "
                        "values off memory: what is written through it from now on is lost",
                        UserWarning,
                        stacklevel=3,
                    )
                self._rest(param, place, changed=True)  # writes through a view leave no trace on the parameter

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            self.settle(ending=True)
        finally:
            super().__exit__(exc_type, exc_value, traceback)
