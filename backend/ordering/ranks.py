"""Integer ranks for an order, spaced so that new tasks fit in between.

Label Studio sorts the Data Manager view by the rank written into each task; rewriting every task
after an insertion would cost one HTTP request per task. Ranks are therefore spaced by
:data:`RANK_GAP`: a task inserted between two others gets a rank in their gap and is the only
task written. Only when a gap is used up are all ranks renumbered (and all tasks rewritten).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

#: Distance between consecutive ranks of a fresh order.
RANK_GAP = 1024


def ranks_for(task_ids: Sequence[int], gap: int = RANK_GAP) -> dict[int, int]:
    """Fresh ranks ``gap, 2·gap, ...`` along the order."""
    return {int(t): (i + 1) * gap for i, t in enumerate(task_ids)}


def rerank(
    task_ids: Sequence[int], old: Mapping[int, int], gap: int = RANK_GAP
) -> tuple[dict[int, int], list[int]]:
    """Ranks for ``task_ids`` (a new order) that keep ``old`` ranks where they still fit.

    Tasks with an old rank keep it when the old ranks increase along the new order (they do
    after insertions only); runs of tasks without one are spread evenly over the gap between
    their neighbours (or after the last one). If a gap is too small, or old ranks are out of
    order, everything is renumbered. Returns ``(ranks, changed)``: ``changed`` lists the tasks
    whose rank is new or different, i.e. the tasks to write.
    """
    ids = [int(t) for t in task_ids]
    kept = [old[t] for t in ids if t in old]
    if any(b <= a for a, b in itertools.pairwise(kept)):
        return _renumbered(ids, old, gap)
    ranks: dict[int, int] = {}
    pending: list[int] = []
    prev = 0
    for t in ids:
        if t not in old:
            pending.append(t)
            continue
        if pending and not _spread(pending, prev, old[t], ranks):
            return _renumbered(ids, old, gap)
        pending = []
        ranks[t] = prev = old[t]
    for k, t in enumerate(pending):  # a tail of new tasks
        ranks[t] = prev + (k + 1) * gap
    changed = [t for t in ids if old.get(t) != ranks[t]]
    return ranks, changed


def _spread(run: list[int], low: int, high: int, out: dict[int, int]) -> bool:
    """Spread ``run`` strictly between ``low`` and ``high``; False if it does not fit."""
    room = high - low - 1
    if room < len(run):
        return False
    step = (high - low) / (len(run) + 1)
    for k, t in enumerate(run):
        out[t] = low + max(1, int(step * (k + 1)))
    values = [out[t] for t in run]
    return all(low < v < high for v in values) and all(b > a for a, b in itertools.pairwise(values))


def _renumbered(
    ids: list[int], old: Mapping[int, int], gap: int
) -> tuple[dict[int, int], list[int]]:
    ranks = ranks_for(ids, gap)
    return ranks, [t for t in ids if old.get(t) != ranks[t]]
