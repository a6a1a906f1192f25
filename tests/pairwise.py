"""All-pairs covering arrays: a small set of rows in which every value of every factor meets every
value of every other factor at least once. Two-factor interactions are where most bugs of a
configuration table live, and the set is a few dozen rows where the full product is hundreds.

The construction is IPOG (in-parameter-order): start from the full product of the two largest
factors, then add one factor at a time, first giving each existing row the value that covers the
most pairs not yet covered (horizontal growth), then adding rows for the pairs still missing
(vertical growth), filling a row's free places when a later factor needs them. Every choice breaks
ties by the order the values were given in, so the rows are the same on every run."""

import itertools

_FREE = object()  # a place in a row that no pair needs yet


def all_pairs(axes: dict[str, list]) -> list[dict]:
    """Rows (dicts from factor name to value) covering every pair of values of two factors."""
    names = sorted(axes, key=lambda name: -len(axes[name]))  # stable: equal sizes keep their order
    if len(names) < 2:
        return [{name: value for name, value in zip(names, values)} for values in itertools.product(*axes.values())]
    values = [list(axes[name]) for name in names]
    rows = [list(row) for row in itertools.product(range(len(values[0])), range(len(values[1])))]
    for column in range(2, len(names)):
        uncovered = {
            (earlier, earlier_value, new_value)
            for earlier in range(column)
            for earlier_value in range(len(values[earlier]))
            for new_value in range(len(values[column]))
        }
        _grow_horizontally(rows, column, len(values[column]), uncovered)
        _grow_vertically(rows, column, uncovered)
    return [
        {name: values[index][0 if row[index] is _FREE else row[index]] for index, name in enumerate(names)}
        for row in rows
    ]


def _pairs_of(row: list, column: int, new_value: int) -> set:
    return {(earlier, row[earlier], new_value) for earlier in range(column) if row[earlier] is not _FREE}


def _grow_horizontally(rows: list[list], column: int, num_values: int, uncovered: set) -> None:
    for row in rows:
        best = max(range(num_values), key=lambda value: (len(_pairs_of(row, column, value) & uncovered), -value))
        row.append(best)
        uncovered -= _pairs_of(row, column, best)


def _grow_vertically(rows: list[list], column: int, uncovered: set) -> None:
    added: list[list] = []
    for earlier, earlier_value, new_value in sorted(uncovered, key=lambda pair: (pair[2], pair[0], pair[1])):
        if (earlier, earlier_value, new_value) not in uncovered:
            continue
        for row in added:
            if row[column] == new_value and row[earlier] is _FREE:
                row[earlier] = earlier_value
                break
        else:
            row = [_FREE] * column + [new_value]
            row[earlier] = earlier_value
            added.append(row)
        uncovered.discard((earlier, earlier_value, new_value))
    rows.extend(added)
