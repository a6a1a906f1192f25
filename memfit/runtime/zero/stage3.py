"""ZeRO stage 3 by whole tensors: each tensor's values live with its owner only, and every rank
holds a copy of it just while it is in use.

Design note.
- Which tensors move. On several ranks (or with a store) a trainable tensor of at least
  stage3_param_persistence_threshold elements is *managed*; a smaller one stays resident on every
  rank and its owner broadcasts it after each step, as at stage 1/2. Frozen tensors stay resident
  (they have no owner in the plan).
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
- With a store (offload_param "nvme", memfit/offload/param_store.py) the owner releases its copy too: its
  gather reads the tensor back, and it holds its tensors only around the optimizer step and
  checkpoints (owned_in_memory), on its own. Prefetching follows gather_schedule.py. With the
  optimizer on NVMe too, gradients and the step stream as well (streamed_step.py).
- Activation checkpointing runs a block's forward again inside backward: there gathers go to
  backward's list (autograd keeps the parameters until the block's backward is done) and the
  checkpoint's own saved-tensor hooks, not ours, keep what the block saves.
"""

import contextlib
import itertools
import logging
import weakref

import torch
import torch.distributed as dist
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

from memfit.runtime.zero.collectives import keep
from memfit.runtime.zero.gather_schedule import GatherSchedule

logger = logging.getLogger("memfit")
SEQUENCE_MODULUS = (1 << 61) - 1
_LIVE: "weakref.WeakSet[Stage3Params]" = weakref.WeakSet()  # engines whose tensors come and go


@contextlib.contextmanager
def gathering_on_use():
    """Code run in it gathers the stage-3 tensors it uses, as a module's forward does."""
    with contextlib.ExitStack() as stack:
        for params in list(_LIVE):
            stack.enter_context(params.running())
        yield


class _SavedParam:
    """What autograd keeps instead of a gathered tensor (or a view of one)."""

    __slots__ = ("param", "size", "stride", "offset")  # offset: from the tensor's first element

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
    def __init__(self, model, named_params, plan, rank: int, world_size: int, zero_config, open_store=None):
        """open_store(named owned tensors) -> where this rank's managed tensors rest between uses
        (offload_param "nvme"); None: the owner keeps them in memory."""
        self.rank, self.world_size = rank, world_size
        self.owner_of = {id(p): plan.owner_of[name] for name, p in named_params}
        self.name_of = {id(p): name for name, p in named_params}
        moving = world_size > 1 or open_store is not None
        threshold = zero_config.stage3_param_persistence_threshold
        self.managed = [p for _, p in named_params if moving and p.numel() >= threshold]
        managed_ids = {id(p) for p in self.managed}
        self.persistent = [(name, p) for name, p in named_params if id(p) not in managed_ids]
        self.shape_of = {id(p): p.shape for p in self.managed}
        self.owned_managed = [p for p in self.managed if self.owner_of[id(p)] == rank]
        self.store = None
        if open_store is not None:
            self.store = open_store([(self.name_of[id(p)], p) for p in self.owned_managed])
        self.update_master = None  # param -> None: the owner's optimizer copy follows a change (set by the build)
        self.streamed = None  # the StreamedStep, where gradients and the update stream (set by the build)
        self.owned_whole = False  # inside owned_in_memory: the owned tensors are in memory
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
        self._by_storage: dict[int, list] = {}  # gathered tensors, by the storage they are in
        self._frames: list[list[torch.nn.Parameter]] = []  # per running module: what it gathered
        self._in_backward: list[torch.nn.Parameter] = []  # gathered while backward unpacked
        self._nan: dict = {}
        self._mode = _GatherOnUse(self)
        self._saved = saved_tensors_hooks(self._pack, self._unpack)
        self._depth = 0
        self._saving = False  # our saved-tensor hooks are on (outside backward)
        self.index_of = {id(p): index for index, p in enumerate(self.managed)}
        self._sequence = 0  # a digest of this step's gathers, compared across ranks at the step
        # held now by copies that come and go: every managed tensor is whole until release_all
        self.gathered_bytes = sum(p.numel() * p.element_size() for p in self.managed if self._moves(id(p)))
        self.peak_gathered_bytes = 0
        for _, param in named_params:
            param.memfit_params = self  # for deepspeed.zero.GatheredParameters
            param.ds_numel, param.ds_shape = param.numel(), param.shape  # what DeepSpeed's users read
        if not self.managed:
            return
        _LIVE.add(self)
        for module in model.modules():
            module.register_forward_pre_hook(self._enter_module)
            module.register_forward_hook(self._exit_module, always_call=True)
        for param in self.managed:
            param.register_post_accumulate_grad_hook(self._after_grad)

    # ---- gather and release ---------------------------------------------------------------------
    def release_all(self) -> None:
        self._drop_prefetches()
        if self.store is not None:
            for param in self.owned_managed:
                if id(param) not in self.absent:
                    self.store.write(param, param.data)
        for param in self.managed:
            self._release(param)
        self._in_backward = []

    def _moves(self, key: int) -> bool:
        """Whether this rank's copy comes and goes (not the owner's kept in memory)."""
        return self.owner_of[key] != self.rank or self.store is not None

    def _release(self, param) -> None:
        key = id(param)
        if key in self.absent:
            return
        # marked absent last: the torch-function mode would gather an absent tensor these calls touch
        pointer = param.untyped_storage().data_ptr()
        remaining = [p for p in self._by_storage.get(pointer, []) if p is not param]
        if remaining:
            self._by_storage[pointer] = remaining
        else:
            self._by_storage.pop(pointer, None)
        if self._moves(key):
            self.gathered_bytes -= param.numel() * param.element_size()
            param.data = self.released_value(param)
        self.schedule.live_numel -= self.shape_of[key].numel()
        self.released[key] = self.absent[key] = param

    def holds(self, param) -> bool:
        """Whether this rank holds the tensor's values now (its own, or gathered)."""
        key = id(param)
        return key not in self.absent or not self._moves(key)

    def released_value(self, param) -> torch.Tensor:
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
        if key not in self._in_flight:
            self._start(param)  # first: what is needed now goes out before any prefetch
        if torch.is_grad_enabled() or not self._frames:
            self.schedule.before_gather(param, self.released)
        self._finish(param)
        (self._frames[-1] if self._frames else self._in_backward).append(param)

    def _start(self, param) -> None:
        """Issues the owner's broadcast of a released tensor (on one rank, the read from the store)."""
        key = id(param)
        del self.released[key]
        owner = self.owner_of[key]
        numel = self.shape_of[key].numel()
        work = None  # what _finish waits for
        if owner != self.rank:
            buffer = torch.empty(self.shape_of[key], dtype=param.dtype, device=param.device)
        elif self.store is not None and self.world_size == 1:
            buffer, work = self.store.start_read(param, self.shape_of[key])
        elif self.store is not None:
            buffer = self.store.read(param, self.shape_of[key])  # whole before the owner sends it
        else:
            buffer = param.data
        if self.world_size > 1:
            work = dist.broadcast(buffer, src=owner, async_op=True)
        self._in_flight[key] = (work, buffer)
        self.schedule.live_numel += numel

    def _finish(self, param) -> None:
        key = id(param)
        work, buffer = self._in_flight.pop(key)
        if work is not None:
            work.wait()
            if self.world_size > 1:
                keep(work)
        if self._moves(key):
            param.data = buffer
            self.gathered_bytes += buffer.numel() * buffer.element_size()
            self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)
        self._by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(param)
        del self.absent[key]

    # ---- module hooks: a frame per running module -----------------------------------------------
    def _enter_module(self, module, args, own_saving: bool = True) -> None:
        if self._depth == 0:
            self._mode.__enter__()
            # A forward run again inside backward (activation checkpointing) saves its tensors
            # through the checkpoint's own hooks, which keep what they save until the block's
            # backward: ours stay out of the way there, and inside a checkpointed function.
            self._saving = own_saving and torch._C._current_graph_task_id() == -1
            if self._saving:
                self._saved.__enter__()
        self._depth += 1
        self._frames.append([])

    def _exit_module(self, module, args, output) -> None:
        frame = self._frames.pop()
        if torch._C._current_graph_task_id() != -1:
            # run again in backward: autograd holds the parameters themselves until the block's
            # backward is done; each is released once its gradient is accumulated
            self._in_backward.extend(frame)
        else:
            for param in frame:
                self._release(param)
        self._depth -= 1
        if self._depth == 0:
            if self._saving:
                self._saved.__exit__(None, None, None)
            self._mode.__exit__(None, None, None)

    @contextlib.contextmanager
    def running(self):
        """As a module's forward: gathers on use inside (activation checkpointing runs a block's
        forward again in backward, outside any module)."""
        self._enter_module(None, (), own_saving=False)
        try:
            yield
        finally:
            self._exit_module(None, (), None)

    # ---- backward -------------------------------------------------------------------------------
    def _pack(self, tensor):
        if not self._by_storage or tensor.is_sparse:
            return tensor
        sharing = self._by_storage.get(tensor.untyped_storage().data_ptr())
        if not sharing:
            return tensor
        address = tensor.data_ptr()
        for param in sharing:  # several in one storage where the host tier's arena holds them
            start = param.data_ptr()
            if start <= address < start + param.numel() * param.element_size():
                relative = tensor.storage_offset() - param.storage_offset()
                return _SavedParam(param, tensor.size(), tensor.stride(), relative)
        return tensor

    def _unpack(self, saved):
        if not isinstance(saved, _SavedParam):
            return saved
        param = saved.param
        if id(param) in self.absent:
            self.gather(param)
        values = param.detach()
        return values.as_strided(saved.size, saved.stride, values.storage_offset() + saved.offset)

    def _after_grad(self, param) -> None:
        streamed = self.streamed
        if streamed is not None and streamed.takes_from_backward and id(param) in streamed.streamed_ids:
            streamed.take(param)
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
        """Every rank takes modifier_rank's values of params; each owner updates its master copy
        (and the store)."""
        for param in params:
            if self.world_size > 1:
                dist.broadcast(param.data, src=modifier_rank)
            if self.owner_of[id(param)] == self.rank:
                if self.update_master is not None:
                    self.update_master(param)
                if self.store is not None and id(param) in self.shape_of:
                    self.store.write(param, param.data)

    @contextlib.contextmanager
    def owned_in_memory(self, streamed_update: bool = False):
        """With offload_param "nvme": the tensors this rank owns read into memory on this rank
        alone (no collective), for the optimizer step or a checkpoint, then written back and
        released. Elsewhere nothing moves, nor where streamed_update (the update reads and writes
        each tensor itself: streamed_step.py)."""
        if self.store is None or streamed_update:
            yield
            return
        placed = [p for p in self.owned_managed if id(p) in self.absent]
        self.owned_whole = True
        for param in placed:
            param.data = self.store.read(param, self.shape_of[id(param)])
        written = False
        try:
            yield
            for param in placed:
                self.store.write(param, param.data)
            written = True
        finally:
            self.owned_whole = False
            for param in placed:
                param.data = self.released_value(param)
            if not written and placed:
                logger.warning("stage 3: the step failed; the stored parameters keep their values from before it")


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
