"""memfit.update_in_backward: under the streamed step (streamed_step.py), with no gradient
clipping and no fp16 loss scaling, nothing needs every gradient before the update. So each tensor
is updated as soon as its gradient of the boundary micro-step is final (Fuyou's overlap of the
optimizer with backward): its gradient never goes to the swap file, and its weights, in memory
for backward already, are not read again.

The update of one tensor is what NvmeKernelUpdate.run does to it at the step: the same sub-group
pieces, kernel and constants (the group's lr and step count at that moment; the scheduler steps
after the update in both), so the result is the same bit for bit. Its optimizer state is read
into the ring buffers one sub-group at a time; the next piece expected is read ahead, in the order
the tensors were updated in the previous step (the reverse of the model's order until then).

A script must call backward once per micro-step and leave the gradients alone between backward
and step (zero_grad, clipping of its own, a gradient assigned by hand): the update has already
run, so either is refused with an error rather than ignored."""

import torch

from memfit.optim.cpu_adam import group_constants


class BackwardUpdate:
    def __init__(self, update):
        """update: the NvmeKernelUpdate whose ring, swap space and kernel do the work."""
        self.update = update
        self.group_of = {}
        for group_index, group in enumerate(update.optimizer.param_groups):
            for param in group["params"]:
                if id(param) in update.index_of:
                    self.group_of[update.index_of[id(param)]] = group_index
        # per tensor: its pieces, grouped by the sub-group (so the ring buffer) they share
        self.chunks: dict[int, list[list]] = {}
        for pieces in update.groups:
            for piece in pieces:
                chunks = self.chunks.setdefault(piece.index, [])
                if chunks and chunks[-1][0] is pieces:
                    chunks[-1][1].append(piece)
                else:
                    chunks.append((pieces, [piece]))
        self.chunks = {index: [pieces for _, pieces in chunks] for index, chunks in self.chunks.items()}
        self.order: list[int] = list(reversed(range(len(update.params))))  # expected order of updates
        self.done_now: list[int] = []  # updated in this step, in order
        self._done: set[int] = set()  # the same, for the hooks' lookups
        self.writes = [[] for _ in update.ring]  # per ring buffer: the writes of what it last held
        self.next_buffer = 0
        self.read_ahead = None  # (chunk, buffer index, its reads) started before it was due

    def updated(self, param) -> bool:
        return self.update.index_of[id(param)] in self._done

    def run(self, param, grad: torch.Tensor) -> None:
        """Updates param (its weights in param.data) with its final gradient."""
        update = self.update
        index = update.index_of[id(param)]
        group_index = self.group_of[index]
        state = update.optimizer.state[param]
        state["step"] = state.get("step", 0) + 1
        key = (group_index, state["step"])
        constants = {key: group_constants(update.optimizer.param_groups[group_index], state["step"], 1.0)}
        grads = {index: grad if grad.is_contiguous() else grad.contiguous()}
        self.done_now.append(index)
        self._done.add(index)
        for chunk in self.chunks[index]:
            buffer_index, reads = self._reads_of(chunk)
            self._read_ahead(index, chunk)
            update.space.wait(reads, "reading")
            buffer = update.ring[buffer_index]
            self.writes[buffer_index] = update._update(chunk, buffer, grads, {index: key}, constants)
        update.stored[index].update(update.kinds[index])

    def _reads_of(self, chunk) -> tuple[int, list]:
        """The ring buffer holding chunk's state, read ahead or read now."""
        if self.read_ahead is not None:
            ahead, buffer_index, reads = self.read_ahead
            self.read_ahead = None
            if ahead is chunk:
                return buffer_index, reads
            self.update.space.wait(reads, "reading")  # a wrong guess: its buffer is free again
        return self._start(chunk)

    def _start(self, chunk) -> tuple[int, list]:
        buffer_index = self.next_buffer
        self.next_buffer = (self.next_buffer + 1) % len(self.update.ring)
        self.update.space.wait(self.writes[buffer_index], "writing")
        self.writes[buffer_index] = []
        return buffer_index, self.update._start_reads(chunk, self.update.ring[buffer_index])

    def _read_ahead(self, index: int, chunk) -> None:
        """Starts reading the chunk expected after this one (with one ring buffer, none)."""
        if len(self.update.ring) < 2:
            return
        chunks = self.chunks[index]
        position = next(k for k, c in enumerate(chunks) if c is chunk)
        if position + 1 < len(chunks):
            following = chunks[position + 1]
        else:
            following = None
            upcoming = self.order[self.order.index(index) + 1 :] if index in self.order else []
            for candidate in upcoming:
                if candidate not in self._done and candidate in self.chunks:
                    following = self.chunks[candidate][0]
                    break
        if following is not None:
            self.read_ahead = (following, *self._start(following))

    def settle(self) -> None:
        """Waits for every write and drops a read ahead nothing used (the end of backward)."""
        if self.read_ahead is not None:
            self.update.space.wait(self.read_ahead[2], "reading")
            self.read_ahead = None
        for buffer_index, writes in enumerate(self.writes):
            self.update.space.wait(writes, "writing")
            self.writes[buffer_index] = []

    def end_step(self) -> None:
        """After the step: this step's order is the next one's guess."""
        if self.done_now:
            rest = [index for index in self.order if index not in self._done]
            self.order = self.done_now + rest
        self.done_now, self._done = [], set()
