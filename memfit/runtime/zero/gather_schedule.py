"""Which stage-3 tensors to gather ahead of their use: the order of the last step's gathers,
followed while the current step repeats it.

Every rank sees the same gathers in the same order (stage 3 requires it), and every decision
here depends only on that order and on tensor sizes, so every rank issues the same prefetch
broadcasts in the same order. Gathers made with autograd off (an evaluation between steps) are
neither recorded nor followed; a step that leaves the recorded order stops prefetching for its
remainder (the broadcasts already issued complete as usual) and its own order is used next."""

import itertools


class GatherSchedule:
    def __init__(self, numel_of, prefetch_numel: int, max_live_numel: int, start):
        """numel_of(param) -> elements; start(param): issue the asynchronous gather of a released
        tensor (it is then in flight until it is used or the step ends)."""
        self.numel_of = numel_of
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        self.start = start
        self.trace: list = []  # the last step's gathers, in order
        self.recording: list = []
        self.position = 0  # next entry of the trace the step should gather
        self.following = False
        self.live_numel = 0  # elements gathered or in flight now (whoever owns them)

    def before_gather(self, param, released: dict) -> None:
        """Called as param is gathered for use (its own broadcast already started), with autograd
        on or in backward."""
        self.recording.append(param)
        if not self.following:
            return
        if self.position < len(self.trace) and self.trace[self.position] is param:
            self.position += 1
            self._top_up(released)
        else:
            self.following = False

    def _top_up(self, released: dict) -> None:
        """Starts the released tensors among the next prefetch_numel elements of the trace."""
        ahead = 0
        for candidate in itertools.islice(self.trace, self.position, None):
            numel = self.numel_of(candidate)
            ahead += numel
            if ahead > self.prefetch_numel:
                return
            if id(candidate) in released:
                if self.live_numel + numel > self.max_live_numel:
                    return
                self.start(candidate)

    def next_step(self) -> None:
        """At the optimizer step: this step's order is the one the next step follows."""
        if self.recording:
            self.trace, self.recording = self.recording, []
        self.position = 0
        self.following = bool(self.trace) and self.prefetch_numel > 0
