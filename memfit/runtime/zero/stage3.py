"""ZeRO stage 3 by whole tensors: each tensor's values live with its owner only, and every rank
holds a copy of it just while it is in use.

Design note.
- Which tensors move. A trainable tensor of at least stage3_param_persistence_threshold elements
  is *managed*; a smaller one stays resident on every rank and its owner broadcasts it after each
  step, as at stage 1/2. Frozen tensors stay resident (they have no owner in the plan).
- Gathered on use, not on a module's hooks alone. While the model's forward runs, a torch-function
  mode looks at the arguments of every torch call; a managed tensor that is released is gathered
  there (its owner broadcasts it) before the call runs. So a tensor read by any module (a tied
  output head written as `h @ self.emb.weight.t()` in the parent's forward, a module run twice, a
  parameter read by two modules) is always whole when used, with no registration and no trace.
- Released when its user is done. A tensor is released when the forward of the innermost module
  that was running when it was gathered ends. Backward needs some of them again: autograd's saved
  tensors that are (views of) a gathered tensor are saved as a reference instead of the values,
  and gathered again when backward unpacks them; such a tensor is released once its gradient is
  accumulated, and whatever backward left gathered is released when engine.backward returns.
- One state machine on every rank. Collectives match by issue order, so the owner goes through
  the same gathers and releases as everyone else: its copy stays in place, a release is only a
  mark, and its gather is the broadcast that sends. Every rank must therefore run the same
  modules in the same order (as DeepSpeed's stage 3 requires); which ones may change between
  steps.
- Gradients take stage 2's path: reduced to the owner as backward produces them, dropped by the
  other ranks.
"""

import itertools
import logging

import torch
import torch.distributed as dist
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from memfit.runtime.zero.collectives import keep
from memfit.runtime.zero.gather_schedule import GatherSchedule

logger = logging.getLogger("memfit")
SEQUENCE_MODULUS = (1 << 61) - 1


class _SavedParam:
    """What autograd keeps instead of a gathered tensor (or a view of one)."""

    __slots__ = ("param", "size", "stride", "offset")

    def __init__(self, param, size, stride, offset):
        self.param, self.size, self.stride, self.offset = param, size, stride, offset


class _GatherOnUse(TorchFunctionMode):
    def __init__(self, params: "Stage3Params"):
        super().__init__()
        self.params = params

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        absent = self.params.absent
        if absent:
            for arg in itertools.chain(args, kwargs.values()):
                if type(arg) in (list, tuple):
                    for item in arg:
                        if id(item) in absent:
                            self.params.gather(item)
                elif id(arg) in absent:
                    self.params.gather(arg)
        return func(*args, **kwargs)


class Stage3Params:
    def __init__(self, model, named_params, plan, rank: int, world_size: int, zero_config):
        self.rank, self.world_size = rank, world_size
        self.owner_of = {id(p): plan.owner_of[name] for name, p in named_params}
        self.name_of = {id(p): name for name, p in named_params}
        distributed = world_size > 1
        threshold = zero_config.stage3_param_persistence_threshold
        self.managed = [p for _, p in named_params if distributed and p.numel() >= threshold]
        managed_ids = {id(p) for p in self.managed}
        self.persistent = [(name, p) for name, p in named_params if id(p) not in managed_ids]
        self.shape_of = {id(p): p.shape for p in self.managed}
        self.update_master = None  # param -> None: the owner's optimizer copy follows a change (set by the build)
        self.released: dict[int, torch.nn.Parameter] = {}  # not held, no gather in flight
        self.absent: dict[int, torch.nn.Parameter] = {}  # not usable yet: released or in flight
        self._in_flight: dict[int, tuple] = {}  # id -> (work, buffer) of a prefetch
        self._prefetched: list[torch.nn.Parameter] = []  # whole, not yet taken by a module
        self.schedule = GatherSchedule(
            lambda p: self.shape_of[id(p)].numel(),
            zero_config.stage3_prefetch_bucket_size,
            zero_config.stage3_max_live_parameters,
            self._start,
        )
        self._by_storage: dict[int, torch.nn.Parameter] = {}  # gathered tensors, by their storage
        self._frames: list[list[torch.nn.Parameter]] = []  # per running module: what it gathered
        self._in_backward: list[torch.nn.Parameter] = []  # gathered while backward unpacked
        self._nan: dict = {}
        self._mode = _GatherOnUse(self)
        self._saved = saved_tensors_hooks(self._pack, self._unpack)
        self._depth = 0
        self.index_of = {id(p): index for index, p in enumerate(self.managed)}
        self._sequence = 0  # a digest of this step's gathers, compared across ranks at the step
        # held now by non-owned gathered copies: every managed tensor is whole until release_all
        self.gathered_bytes = sum(p.numel() * p.element_size() for p in self.managed if self.owner_of[id(p)] != rank)
        self.peak_gathered_bytes = 0
        for _, param in named_params:
            param.memfit_params = self  # for deepspeed.zero.GatheredParameters
            param.ds_numel, param.ds_shape = param.numel(), param.shape  # what DeepSpeed's users read
        if not self.managed:
            return
        self._own_storage()
        for module in model.modules():
            module.register_forward_pre_hook(self._enter_module)
            module.register_forward_hook(self._exit_module, always_call=True)
        for param in self.managed:
            param.register_post_accumulate_grad_hook(self._after_grad)

    def _own_storage(self) -> None:
        """A managed tensor the owner keeps gets storage of its own: autograd's saved views are
        matched to their tensor by storage."""
        seen = set()
        for param in self.managed:
            pointer = param.untyped_storage().data_ptr()
            if pointer in seen or param.storage_offset() != 0 or not param.is_contiguous():
                param.data = param.data.clone(memory_format=torch.contiguous_format)
            seen.add(param.untyped_storage().data_ptr())

    # ---- gather and release ---------------------------------------------------------------------
    def release_all(self) -> None:
        self._drop_prefetches()
        for param in self.managed:
            self._release(param)
        self._in_backward = []

    def _release(self, param) -> None:
        key = id(param)
        if key in self.absent:
            return
        # marked absent last: the torch-function mode would gather an absent tensor these calls touch
        self._by_storage.pop(param.untyped_storage().data_ptr(), None)
        if self.owner_of[key] != self.rank:
            self.gathered_bytes -= param.numel() * param.element_size()
            param.data = self._released_value(param)
        self.schedule.live_numel -= self.shape_of[key].numel()
        self.released[key] = self.absent[key] = param

    def _released_value(self, param) -> torch.Tensor:
        """What a released copy holds: one NaN seen in the tensor's full shape. Autograd checks the
        gradient it accumulates against the parameter's shape, and code that reads a released
        tensor outside the model's forward gets NaN rather than plausible numbers."""
        key = (param.dtype, param.device)
        if key not in self._nan:
            self._nan[key] = torch.full((1,), float("nan"), dtype=param.dtype, device=param.device)
        return self._nan[key].expand(self.shape_of[id(param)])

    def gather(self, param) -> None:
        """Makes an absent tensor whole on every rank (its owner broadcasts it, or a prefetch
        already did) for the running module, or for backward."""
        key = id(param)
        self._sequence = (self._sequence * 1_000_003 + self.index_of[key] + 1) % SEQUENCE_MODULUS
        if torch.is_grad_enabled() or not self._frames:
            self.schedule.before_gather(param, self.released)
        if key not in self._in_flight:
            self._start(param)
        self._finish(param)
        (self._frames[-1] if self._frames else self._in_backward).append(param)

    def _start(self, param) -> None:
        """Issues the owner's broadcast of a released tensor."""
        key = id(param)
        del self.released[key]
        owner = self.owner_of[key]
        numel = self.shape_of[key].numel()
        if owner == self.rank:
            buffer = param.data
        else:
            buffer = torch.empty(self.shape_of[key], dtype=param.dtype, device=param.device)
        self._in_flight[key] = (dist.broadcast(buffer, src=owner, async_op=True), buffer)
        self.schedule.live_numel += numel

    def _finish(self, param) -> None:
        key = id(param)
        work, buffer = self._in_flight.pop(key)
        work.wait()
        keep(work)
        if self.owner_of[key] != self.rank:
            param.data = buffer
            self.gathered_bytes += buffer.numel() * buffer.element_size()
            self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)
        self._by_storage[param.untyped_storage().data_ptr()] = param
        del self.absent[key]

    # ---- module hooks: a frame per running module -----------------------------------------------
    def _enter_module(self, module, args) -> None:
        if self._depth == 0:
            self._mode.__enter__()
            self._saved.__enter__()
        self._depth += 1
        self._frames.append([])

    def _exit_module(self, module, args, output) -> None:
        for param in self._frames.pop():
            self._release(param)
        self._depth -= 1
        if self._depth == 0:
            self._saved.__exit__(None, None, None)
            self._mode.__exit__(None, None, None)

    # ---- backward -------------------------------------------------------------------------------
    def _pack(self, tensor):
        if not self._by_storage or tensor.is_sparse:
            return tensor
        param = self._by_storage.get(tensor.untyped_storage().data_ptr())
        if param is None:
            return tensor
        return _SavedParam(param, tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, saved):
        if not isinstance(saved, _SavedParam):
            return saved
        param = saved.param
        if id(param) in self.absent:
            self.gather(param)
        return param.detach().as_strided(saved.size, saved.stride, saved.offset)

    def _after_grad(self, param) -> None:
        if id(param) not in self.absent and not self._frames:
            self._release(param)

    def after_backward(self) -> None:
        for param in self._in_backward:
            self._release(param)
        self._in_backward = []

    def _drop_prefetches(self) -> None:
        """Completes every prefetch still in flight and releases what no module took (the step
        left the recorded order, or it ended)."""
        for key in list(self._in_flight):
            param = self.absent[key]
            self._finish(param)
            self._prefetched.append(param)
        for param in self._prefetched:
            self._release(param)
        self._prefetched = []

    # ---- at the optimizer step ------------------------------------------------------------------
    def check_same_use(self) -> None:
        """Raises, before the update, when the ranks gathered different tensors since the last
        step: a module run on some ranks only (data-dependent routing) makes their broadcasts
        pair up wrongly, which may hand a rank another tensor's values."""
        self._drop_prefetches()
        digest = torch.tensor([self._sequence, -self._sequence], dtype=torch.int64)
        self._sequence = 0
        self.schedule.next_step()
        if self.world_size == 1:
            return
        dist.all_reduce(digest, op=dist.ReduceOp.MAX)
        if int(digest[0]) != -int(digest[1]):
            raise RuntimeError(
                "ZeRO stage 3: the ranks used different parameters since the last step (a module that runs on "
                "some ranks only, such as data-routed experts); at stage 3 every rank must run the same modules "
                "in the same order. Use stage 2, or run every module on every rank."
            )

    def sync_persistent(self) -> None:
        """Owners broadcast their updated resident tensors, one flat message per owner."""
        if self.world_size == 1:
            return
        for owner in range(self.world_size):
            tensors = [p.data for name, p in self.persistent if self.owner_of[id(p)] == owner]
            if not tensors:
                continue
            flat = torch._utils._flatten_dense_tensors(tensors)
            dist.broadcast(flat, src=owner)
            if owner != self.rank:
                for tensor, value in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
                    tensor.copy_(value)

    # ---- whole tensors on request ---------------------------------------------------------------
    def gathered(self, params, modifier_rank: int | None = None):
        """A context in which the given tensors (all managed ones: None) are whole on every rank,
        released again at its end. Every rank must enter it with the same tensors. modifier_rank:
        at the end that rank's values go to every rank, and the owner's optimizer master copy."""
        return _Gathered(self, params, modifier_rank)

    def keep_modified(self, params, modifier_rank: int) -> None:
        """Every rank takes modifier_rank's values of params; each owner updates its master copy."""
        for param in params:
            if self.world_size > 1:
                dist.broadcast(param.data, src=modifier_rank)
            if self.update_master is not None and self.owner_of[id(param)] == self.rank:
                self.update_master(param)


class _Gathered:
    def __init__(self, owner: Stage3Params, params, modifier_rank: int | None):
        self.owner = owner
        wanted = owner.managed if params is None else params
        self.params = [p for p in wanted if id(p) in owner.owner_of]  # trainable ones of this engine
        self.modifier_rank = modifier_rank

    def __enter__(self):
        self.owner._frames.append([])
        for param in self.params:
            if id(param) in self.owner.absent:
                self.owner.gather(param)
        return self

    def __exit__(self, exc_type, *exc):
        if self.modifier_rank is not None and exc_type is None:
            self.owner.keep_modified(self.params, self.modifier_rank)
        for param in self.owner._frames.pop():
            self.owner._release(param)
        return False
