"""Finished collectives are kept on the main thread (see collectives.py), but only the newest: a
gloo work holds its tensors, and keeping every one until the step held a whole model's gathered
copies and gradients on each rank of a stage-3 job."""

import gc
import weakref

from memfit.runtime.zero import collectives


class FinishedWork:
    """Stands for a completed work object and the tensors it holds."""


def test_only_the_newest_works_are_kept_until_the_step():
    collectives.release_kept_works()
    works = [FinishedWork() for _ in range(10 * collectives.KEPT_NEWEST)]
    alive = [weakref.ref(work) for work in works]
    for work in works:
        collectives.keep(work)
    del works, work
    gc.collect()
    kept = [ref() is not None for ref in alive]
    assert all(kept[-collectives.KEPT_NEWEST :]), "a recent work was let go before the step"
    assert sum(kept) == collectives.KEPT_NEWEST, f"{sum(kept)} works still held"
    collectives.release_kept_works()
    gc.collect()
    assert not any(ref() is not None for ref in alive)
