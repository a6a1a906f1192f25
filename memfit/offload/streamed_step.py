"""ZeRO stage 3 with parameters and optimizer state on NVMe (offload_param and
offload_optimizer "nvme", any optimizer): gradients and weights stream through the step instead
of all being in memory at once.

- A gradient leaves memory as backward produces it: the post-accumulate-grad hook writes it to the
  parameter swap file (added to what an earlier micro-step stored there, as autograd would have
  added it to .grad) and drops .grad. On the boundary micro-step its fp32 norm and whether it is
  finite are kept (a few bytes each), so clipping and the fp16 overflow check need no second pass.
- The update (nvme_kernel.NvmeKernelUpdate, or for an optimizer torch steps
  nvme_optimizer.NvmeOptimizerUpdate) reads each sub-group's 16-bit weights and gradients with
  its masters and state, and writes the weights back once their last piece is updated.
So from backward to the end of the step a rank holds one sub-group of weights and gradients, not
all of them. The arithmetic is the resident path's: the same additions, norms and kernel, so the
result is the same bit for bit.

On several ranks a gradient is reduced to its owner in buckets first (grad_sync.py). The owner
sends, as stage 2 does, what it would hold in its bucket buffer: its own gradient added to what
an earlier micro-step stored (contribution); the reduced sum goes to the swap file when the
bucket's reduce completes (take_reduced), and the bucket's memory with it. A tensor that no rank
gave a gradient in a backward keeps what it had, as a stage-2 owner's has_grad: the ranks' marks
are reduced with the bucket."""

import torch


class StoredGradient:
    """A gradient resting in the swap file, as the step's clipping and overflow check see it."""

    __slots__ = ("steps", "param", "norm", "finite")

    def __init__(self, steps: "StreamedStep", param, norm, finite):
        self.steps, self.param, self.norm, self.finite = steps, param, norm, finite

    def fp32_norm(self) -> torch.Tensor:
        if self.norm is None:  # last produced before the boundary micro-step
            self.norm = self.steps.norm_of(self.steps.read_grad(self.param))
        return self.norm

    def is_finite(self) -> bool:
        if self.finite is None:
            self.finite = bool(torch.isfinite(self.steps.read_grad(self.param)).all())
        return self.finite


class StreamedStep:
    def __init__(self, stage3, norm_of, *, needs_norm: bool, needs_finite: bool, backward_update=None):
        """stage3: the Stage3Params whose store holds the tensors; norm_of(grad) -> fp32 norm, the
        engine's; needs_norm / needs_finite: the step clips / checks fp16 overflow;
        backward_update: a BackwardUpdate (memfit.update_in_backward: backward_update.py)."""
        self.stage3, self.store, self.norm_of = stage3, stage3.store, norm_of
        self.needs_norm, self.needs_finite = needs_norm, needs_finite
        self.backward_update = backward_update
        self.params = list(stage3.owned_managed)
        self.streamed_ids = {id(p) for p in self.params}
        self.stored: dict[int, StoredGradient] = {}  # since the last step
        # A tensor whose gradient is stored has .grad = a marker (one NaN seen in its shape), so
        # that what the script does to .grad is seen: zero_grad (set to None, or the marker
        # zeroed) discards the stored gradient, a tensor assigned by hand replaces it. Off during
        # backward, which would add into it.
        self._markers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (marker, its one element)
        self._final_backward = True  # the backward running is the step's last micro-step
        self._writing: list[tuple] = []  # (request, gradient) of writes in flight
        self._brought: dict[int, list] = {}  # id -> [tensor, weights, gradient, their reads] for the update
        # on one rank the post-accumulate-grad hook takes each gradient; on several the reduce does
        self.takes_from_backward = stage3.world_size == 1
        self._stored_before: set[int] = set()  # ids stored when the running backward began

    # ---- around backward ------------------------------------------------------------------------
    def before_backward(self, final: bool) -> None:
        if self.backward_update is not None and self.backward_update.done_now:
            raise RuntimeError(
                "memfit.update_in_backward: a second backward before step, after the first had updated the tensors; "
                "call backward once per micro-step, or turn update_in_backward off"
            )
        self.reconcile()
        self._final_backward = final
        self._stored_before = set(self.stored)
        for stored in self.stored.values():
            stored.param.grad = None

    def take(self, param) -> None:
        """The post-accumulate-grad hook of a streamed tensor: .grad goes to the swap file, or on
        the boundary micro-step with update_in_backward, into the tensor's update."""
        if param.grad is not None:
            self.take_reduced(param, self.contribution(param))

    def contribution(self, param) -> torch.Tensor:
        """The tensor's gradient so far: its .grad added to what an earlier micro-step stored, as
        autograd adds into a stage-2 bucket buffer (zeros where neither is); on several ranks, what
        the owner sends to the reduce of the tensor's bucket. Its .grad is let go."""
        grad, param.grad = param.grad, None
        if id(param) in self.stored:
            stored = self.read_grad(param)
            return stored if grad is None else stored.add_(grad)
        if grad is None:
            return torch.zeros(self.stage3.shape_of[id(param)], dtype=param.dtype, device=param.device)
        return grad

    def take_reduced(self, param, grad, got_grad_anywhere: bool = True) -> None:
        """The tensor's gradient of this backward, with what was stored before added in, goes to
        the swap file, or on the boundary micro-step with update_in_backward into the update.
        got_grad_anywhere: some rank gave it a gradient in this backward; where none did and none
        is stored, it has no gradient (as stage 2's has_grad) and the zeros are dropped."""
        if not got_grad_anywhere and id(param) not in self._stored_before:
            return
        self._reap_writes()
        if self.backward_update is not None and self._final_backward:
            self._update_now(param, grad)
            return
        self._writing.append((self.store.start_write_grad(param, grad), grad))
        norm = finite = None
        if self._final_backward:
            norm = self.norm_of(grad) if self.needs_norm else None
            finite = bool(torch.isfinite(grad).all()) if self.needs_finite else None
        self.stored[id(param)] = StoredGradient(self, param, norm, finite)
        self._mark(param)

    def _update_now(self, param, grad) -> None:
        """Updates the tensor with its final gradient and starts writing its weights back."""
        if self.backward_update.updated(param):
            raise RuntimeError(
                f"memfit.update_in_backward: {self.stage3.name_of[id(param)]} got a second gradient after its "
                "update in this step's backward; call backward once per micro-step, or turn update_in_backward off"
            )
        self.stored.pop(id(param), None)
        self._markers.pop(id(param), None)
        brought = not self.stage3.holds(param)  # a bias, say: its gradient needs no weights
        if brought:
            param.data = self.store.read(param, self.stage3.shape_of[id(param)])
        self.backward_update.run(param, grad)
        weights = param.data
        self._writing.append((self.store.start_write(param, weights), weights))
        if brought:
            param.data = self.stage3.released_value(param)
        self._mark(param)  # so that a later change to .grad is seen, and refused at the step

    def after_backward(self) -> None:
        if self.backward_update is not None:
            self.backward_update.settle()
        for key, stored in self.stored.items():
            if stored.param.grad is None:
                stored.param.grad = self._markers[key][0]

    def _mark(self, param) -> None:
        element = torch.full((1,), float("nan"), dtype=param.dtype, device=param.device)
        marker = element.expand(self.stage3.shape_of[id(param)])
        self._markers[id(param)] = (marker, element)
        param.grad = marker

    def read_grad(self, param) -> torch.Tensor:
        return self.store.read_grad(param, self.stage3.shape_of[id(param)])

    def _reap_writes(self, wait: bool = False) -> None:
        """Lets go of the gradients whose writes have finished (all of them when wait)."""
        still = []
        for request, grad in self._writing:
            if wait or request.done():
                request.wait()  # raises a failed write
            else:
                still.append((request, grad))
        self._writing = still

    # ---- at the step ----------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Applies what the script did to .grad since the last backward (see _markers)."""
        self._reap_writes(wait=True)
        for param in self.params:
            if self.backward_update is not None and self.backward_update.updated(param):
                self._check_untouched(param)
                continue
            key, grad = id(param), param.grad
            marker, element = self._markers.get(key, (None, None))
            if grad is None or grad is not marker or not bool(element.isnan().all()):
                if grad is marker:
                    param.grad = None  # zeroed in place: discarded
                    grad = None
                self.stored.pop(key, None)
                self._markers.pop(key, None)
                if grad is not None:  # assigned by hand: it is the gradient now
                    self.take(param)

    def _check_untouched(self, param) -> None:
        marker, element = self._markers[id(param)]
        if param.grad is not marker or not bool(element.isnan().all()):
            raise RuntimeError(
                f"memfit.update_in_backward: the gradient of {self.stage3.name_of[id(param)]} changed after backward "
                "had updated the tensor with it (zero_grad, clipping, an assignment); leave gradients alone between "
                "backward and step, or turn update_in_backward off"
            )

    def updated_in_backward(self) -> list:
        """The tensors this step's backward updated, once: their markers are dropped (at the step)."""
        if self.backward_update is None:
            return []
        updated = [param for param in self.params if self.backward_update.updated(param)]
        for param in updated:
            param.grad = None
            del self._markers[id(param)]
        self.backward_update.end_step()
        return updated

    def has_grad(self, param) -> bool:
        return id(param) in self.stored

    def discard(self) -> None:
        """After the step (the optimizer's zero_grad): the stored gradients are spent."""
        if self.backward_update is not None and self.backward_update.done_now:
            raise RuntimeError(
                "memfit.update_in_backward: zero_grad between backward and step, after backward had updated the "
                "tensors; leave gradients alone between backward and step, or turn update_in_backward off"
            )
        for key, stored in self.stored.items():
            if stored.param.grad is self._markers[key][0]:
                stored.param.grad = None
        self.stored.clear()
        self._markers.clear()

    def start_bring(self, param) -> None:
        """Starts reading a streamed tensor's weights and gradient, for the update."""
        key = id(param)
        if key not in self._brought:
            shape = self.stage3.shape_of[key]
            grad, grad_read = self.store.start_read(param, shape, grad=True)
            if self.stage3.owned_whole:  # read whole for a snapshot or a checkpoint already
                self._brought[key] = [param, None, grad, [grad_read]]
                return
            weights, weights_read = self.store.start_read(param, shape)
            self._brought[key] = [param, weights, grad, [weights_read, grad_read]]

    def bring(self, param) -> torch.Tensor:
        """The tensor's weights in it (read now, or as started) and its gradient, for the update."""
        self.start_bring(param)
        entry = self._brought[id(param)]
        if entry[3]:
            for request in entry[3]:
                request.wait()
            entry[3] = []
            if entry[1] is not None:
                param.data = entry[1]
        return entry[2]

    def put_back(self, param) -> None:
        """After the tensor's last piece is updated: its weights go back to the swap file (unless
        they were in memory already, to be written back with the others)."""
        if self._brought[id(param)][1] is None:
            del self._brought[id(param)]
            return
        self.store.write(param, param.data)
        self._forget(param)

    def drop_brought(self) -> None:
        """A failed update: the tensors read for it are released unwritten (the store keeps their
        values from before the step)."""
        for param, weights, _, reads in list(self._brought.values()):
            for request in reads:
                request.wait()
            if weights is None:
                del self._brought[id(param)]
            else:
                self._forget(param)

    def _forget(self, param) -> None:
        param.data = self.stage3.released_value(param)
        del self._brought[id(param)]
