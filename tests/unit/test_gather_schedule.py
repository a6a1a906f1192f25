"""The stage-3 prefetch plan, on its own: what it starts ahead of use, within the prefetch window
and the live limit, and how it follows, leaves and re-learns a step's order."""

from memfit.runtime.zero.gather_schedule import GatherSchedule


class Tensor:
    def __init__(self, name: str, numel: int):
        self.name, self.numel = name, numel

    def __repr__(self):
        return self.name


A, B, C, D = Tensor("a", 10), Tensor("b", 20), Tensor("c", 30), Tensor("d", 40)


class Harness:
    """Plays the engine's part: a released set, starts recorded, live elements counted."""

    def __init__(self, prefetch: int, max_live: int = 1000):
        self.started = []
        self.released = {id(t): t for t in (A, B, C, D)}
        self.schedule = GatherSchedule(lambda t: t.numel, prefetch, max_live, self.start)

    def start(self, tensor):
        self.started.append(tensor)
        del self.released[id(tensor)]
        self.schedule.live_numel += tensor.numel

    def use(self, tensor):
        if id(tensor) in self.released:  # not prefetched: gathered on demand, first
            self.start(tensor)
        self.schedule.before_gather(tensor, self.released)

    def release_all(self):
        for tensor in (A, B, C, D):
            if id(tensor) not in self.released:
                self.released[id(tensor)] = tensor
                self.schedule.live_numel -= tensor.numel

    def step(self, order):
        self.started = []
        for tensor in order:
            self.use(tensor)
        self.release_all()
        self.schedule.next_step()
        return self.started


def test_the_first_step_gathers_on_demand_and_the_next_prefetches_within_the_window():
    harness = Harness(prefetch=50)
    assert harness.step([A, B, C, D]) == [A, B, C, D]  # no order known yet
    # using a starts it, then what fits in the next 50 elements of the order: b (20) and c (30)
    harness.started = []
    harness.use(A)
    assert harness.started == [A, B, C]


def test_prefetch_stops_at_the_live_limit():
    harness = Harness(prefetch=1000, max_live=45)
    harness.step([A, B, C, D])
    harness.started = []
    harness.use(A)
    assert harness.started == [A, B]  # c would pass 45 live elements


def test_a_tensor_used_twice_is_prefetched_again_after_its_release():
    harness = Harness(prefetch=25)
    order = [A, B, A, B]
    harness.step(order)
    harness.started = []
    harness.use(A)
    assert harness.started == [A, B]  # b prefetched on the first use of a
    harness.released[id(A)] = A  # the module that used a ended
    harness.schedule.live_numel -= A.numel
    harness.use(B)
    assert harness.started == [A, B, A]  # the second a is in the window again: started ahead


def test_leaving_the_order_stops_prefetching_and_the_new_order_is_learned():
    harness = Harness(prefetch=1000)
    harness.step([A, B, C])
    started = harness.step([A, D, C])  # d instead of b: the order is left at the second gather
    assert started == [A, B, C, D]  # b and c were prefetched already; d on demand; nothing after
    assert harness.schedule.trace == [A, D, C]
    harness.started = []
    harness.use(A)
    assert harness.started == [A, D, C]


def test_no_prefetch_window_means_no_prefetch():
    harness = Harness(prefetch=0)
    harness.step([A, B])
    assert harness.step([A, B]) == [A, B]
