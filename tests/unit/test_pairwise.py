"""The all-pairs generator behind the fast tier's equivalence table: every pair of values of two
factors is in some row, rows are the same on every call, and the set stays near the lower bound
(the product of the two largest factors) instead of the full product."""

import itertools
import math

import pytest

from tests.pairwise import all_pairs

AXES = [
    {"a": [1, 2, 3, 4, 5], "b": [0, 1, 2], "c": [False, True], "d": [1, 3], "e": [0.0, 0.5], "f": "xyz", "g": "pq"},
    {"a": [1, 2], "b": [3]},
    {"a": list(range(4)), "b": list(range(4)), "c": list(range(4)), "d": list(range(4))},
    {"only": [1, 2, 3]},
    {"a": [1], "b": [2], "c": [3]},
    {"a": list(range(7)), "b": list(range(2)), "c": list(range(6)), "d": [0, 1, 2], "e": [0], "f": [0, 1]},
]


@pytest.mark.parametrize("axes", AXES)
def test_every_pair_is_covered(axes):
    rows = all_pairs(axes)
    for row in rows:
        assert set(row) == set(axes) and all(row[name] in axes[name] for name in axes)
    for first, second in itertools.combinations(axes, 2):
        wanted = set(itertools.product(axes[first], axes[second]))
        assert wanted <= {(row[first], row[second]) for row in rows}, (first, second)
    if len(axes) == 1:
        assert len(rows) == len(next(iter(axes.values())))


@pytest.mark.parametrize("axes", AXES)
def test_rows_are_deterministic_and_few(axes):
    rows = all_pairs(axes)
    assert rows == all_pairs(dict(axes))
    sizes = sorted((len(values) for values in axes.values()), reverse=True)
    lower_bound = sizes[0] * (sizes[1] if len(sizes) > 1 else 1)
    assert lower_bound <= len(rows) <= max(lower_bound * 2, lower_bound + 6)
    assert len(rows) <= math.prod(sizes)


def test_the_equivalence_table_is_a_few_dozen_cases():
    from tests.distributed.test_equivalence import HABIT_TABLE, MAIN_TABLE, PAIRWISE_TABLE

    assert len(MAIN_TABLE) == 720 and len(HABIT_TABLE) == 120
    assert 20 <= len(PAIRWISE_TABLE) <= 60
    assert set(PAIRWISE_TABLE) <= set(MAIN_TABLE) | set(HABIT_TABLE)
