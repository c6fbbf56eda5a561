"""A project's queue order: built from stored tasks and features, stored, extended for new tasks.

This is the piece the CLI (``boxloop order``), the HTTP endpoint (``POST /projects/{id}/order``)
and the ``TASKS_CREATED`` webhook job call. It works on task ids; features must already be in the
store (:func:`backend.features.compute_features`). Label Studio is updated separately with
:mod:`backend.labelstudio.queue` from the plan's ranks.

Tasks without a feature vector (their image failed to load) cannot be placed by distance; they
go after all others, in task-id order, and are listed in ``OrderPlan.missing_features``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from backend.ordering.extend import extend_order
from backend.ordering.ranks import ranks_for, rerank
from backend.ordering.strategies import (
    FEATURE_STRATEGIES,
    check_strategy,
    order_pool_result,
    reduce_dim,
)
from backend.store import Store

StartMode = Literal["labeled", "random"]


@dataclass(frozen=True)
class OrderPlan:
    """The stored order of a project, with each task's rank (see :mod:`backend.ordering.ranks`)."""

    project_id: int
    strategy: str
    task_ids: list[int]
    ranks: dict[int, int]
    distance: list[float | None]
    params: dict[str, Any]
    view_id: int | None = None
    missing_features: list[int] = field(default_factory=list)

    def batches(self, batch_size: int | None = None) -> list[list[int]]:
        """The order cut into annotation batches (``params['batch_size']`` by default)."""
        size = int(batch_size or self.params.get("batch_size") or 10)
        return [self.task_ids[s : s + size] for s in range(0, len(self.task_ids), size)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for ``/status`` and the HTTP answer (no per-task arrays)."""
        return {
            "project_id": self.project_id,
            "strategy": self.strategy,
            "n_tasks": len(self.task_ids),
            "first_batch": self.batches()[0] if self.task_ids else [],
            "view_id": self.view_id,
            "missing_features": self.missing_features,
            "params": {k: v for k, v in self.params.items() if k not in ("ranks", "distance")},
        }


def file_name_key(data: Mapping[str, Any], image_key: str) -> str:
    """The image's file path for file-name order (``/data/local-files/?d=a/b.jpg`` → ``a/b.jpg``)."""
    value = str(data.get(image_key, ""))
    parsed = urlparse(value)
    if "d" in (query := parse_qs(parsed.query)):
        return unquote(query["d"][0])
    return unquote(parsed.path or value)


def temporal_keys(
    tasks: Sequence[tuple[int, Mapping[str, Any]]], field_name: str | None, image_key: str
) -> list[Any]:
    """Per-task sort keys: the data field ``field_name`` if given, else the image file name."""
    if field_name:
        return [data.get(field_name) for _, data in tasks]
    return [file_name_key(data, image_key) for _, data in tasks]


def _load(
    store: Store,
    project_id: int,
    strategy: str,
    extractor: str | None,
    pca_dim: int | None,
    task_ids: Sequence[int],
) -> tuple[list[int], np.ndarray | None, list[int]]:
    """(task ids with features, their matrix or None, task ids without features)."""
    if strategy not in FEATURE_STRATEGIES:
        return list(task_ids), None, []
    if not extractor:
        raise ValueError(f"strategy {strategy!r} needs a feature extractor name")
    ids, matrix = store.get_features(project_id, extractor, list(task_ids))
    have = set(ids)
    missing = [t for t in task_ids if t not in have]
    if not ids:
        raise ValueError(
            f"no stored {extractor!r} features for project {project_id}; compute them first"
        )
    return ids, reduce_dim(matrix, pca_dim), missing


def build_order(
    store: Store,
    project_id: int,
    strategy: str,
    *,
    extractor: str | None = None,
    labeled_task_ids: Iterable[int] = (),
    start: StartMode = "labeled",
    seed: int = 0,
    n_seed: int = 1,
    pca_dim: int | None = None,
    temporal_field: str | None = None,
    image_key: str = "image",
    batch_size: int = 10,
    progress: bool = False,
) -> OrderPlan:
    """Order all stored tasks of a project and store the order (``Store.set_order``).

    ``start="labeled"``: the list starts with the labelled tasks (falls back to ``n_seed``
    random seeds when none are labelled); ``"random"``: with ``n_seed`` random seeds, labelled
    tasks being ordered like the rest (Label Studio skips them anyway).
    """
    strat = check_strategy(strategy)
    tasks = store.list_tasks(project_id)
    if not tasks:
        raise ValueError(f"project {project_id} has no stored tasks")
    all_ids = [t for t, _ in tasks]
    ids, feats, missing = _load(store, project_id, strat, extractor, pca_dim, all_ids)
    index = {t: i for i, t in enumerate(ids)}
    labeled = [t for t in sorted(set(int(t) for t in labeled_task_ids)) if t in index]
    start_idx = [index[t] for t in labeled] if start == "labeled" else []
    keys = None
    if strat == "temporal":
        data = dict(tasks)
        keys = temporal_keys([(t, data[t]) for t in ids], temporal_field, image_key)
    result = order_pool_result(
        feats,
        strat,
        seed=seed,
        n_seed=n_seed,
        start_indices=start_idx,
        keys=keys,
        n=len(ids),
        progress=progress,
    )
    order = [ids[int(i)] for i in result.order] + missing
    distance = [None if np.isnan(v) else float(v) for v in result.distance] + [None] * len(missing)
    ranks = ranks_for(order)
    params: dict[str, Any] = {
        "extractor": extractor if strat in FEATURE_STRATEGIES else None,
        "start": start,
        "seed": seed,
        "n_seed": n_seed,
        "pca_dim": pca_dim,
        "temporal_field": temporal_field,
        "image_key": image_key,
        "batch_size": batch_size,
        "n_start": len(start_idx) if start_idx or strat == "temporal" else min(n_seed, len(ids)),
        "missing_features": missing,
        "ranks": [ranks[t] for t in order],
        "distance": distance,
    }
    previous = store.get_order(project_id)
    view_id = previous.view_id if previous else None
    store.set_order(project_id, strat, params, order, view_id=view_id)
    return OrderPlan(project_id, strat, order, ranks, distance, params, view_id, missing)


def load_plan(store: Store, project_id: int) -> OrderPlan | None:
    """The stored order of a project, or None."""
    stored = store.get_order(project_id)
    if stored is None:
        return None
    params = dict(stored.params)
    order = [int(t) for t in stored.task_ids]
    ranks = params.get("ranks") or [r for r in ranks_for(order).values()]
    distance = list(params.get("distance") or [None] * len(order))
    return OrderPlan(
        project_id,
        stored.strategy,
        order,
        dict(zip(order, (int(r) for r in ranks), strict=True)),
        distance,
        params,
        stored.view_id,
        list(params.get("missing_features") or []),
    )


def set_view_id(store: Store, plan: OrderPlan, view_id: int | None) -> OrderPlan:
    """Remember the Label Studio view that shows this order."""
    store.set_order(plan.project_id, plan.strategy, plan.params, plan.task_ids, view_id=view_id)
    return OrderPlan(
        plan.project_id,
        plan.strategy,
        plan.task_ids,
        plan.ranks,
        plan.distance,
        plan.params,
        view_id,
        plan.missing_features,
    )


def _without_removed_tasks(store: Store, plan: OrderPlan) -> OrderPlan:
    """``plan`` without the tasks the store no longer holds (deleted in Label Studio, forgotten
    at a reconcile): their vectors are gone, and placing new tasks failed on them for good. The
    others keep their order and pick distances (an approximation after the first removed one,
    as for an insertion)."""
    held = {t for t, _ in store.list_tasks(plan.project_id)}
    keep = [i for i, t in enumerate(plan.task_ids) if t in held]
    if len(keep) == len(plan.task_ids):
        return plan
    order = [plan.task_ids[i] for i in keep]
    distance = [plan.distance[i] for i in keep]
    missing = [t for t in plan.missing_features if t in held]
    params = {
        **plan.params,
        "ranks": [plan.ranks[t] for t in order],
        "distance": distance,
        "missing_features": missing,
    }
    ranks = {t: plan.ranks[t] for t in order}
    return OrderPlan(
        plan.project_id, plan.strategy, order, ranks, distance, params, plan.view_id, missing
    )


def place_new_tasks(
    store: Store,
    project_id: int,
    new_task_ids: Iterable[int],
    *,
    labeled_task_ids: Iterable[int] = (),
) -> tuple[OrderPlan, list[int]]:
    """Insert new tasks into the stored order (see :mod:`backend.ordering.extend`).

    New tasks go only after the last labelled task of the order (the open tail). Their features
    must be stored already; ones without features go to the end. Returns the new plan and the
    task ids whose rank changed (write only those to Label Studio).
    """
    plan = load_plan(store, project_id)
    if plan is None:
        raise ValueError(f"project {project_id} has no stored order; build one first")
    plan = _without_removed_tasks(store, plan)
    p = plan.params
    in_order = set(plan.task_ids)
    new = sorted({int(t) for t in new_task_ids} - in_order)
    if not new:
        return plan, []
    missing_before = set(plan.missing_features)
    known_missing = [t for t in plan.task_ids if t in missing_before]
    placed = [t for t in plan.task_ids if t not in missing_before]
    placed_dist = [plan.distance[i] for i, t in enumerate(plan.task_ids) if t not in missing_before]
    # the labelled prefix, in ``placed``: counted in the whole order, a labelled task without
    # features (at the end) froze every position and new tasks went last
    labeled = {int(t) for t in labeled_task_ids}
    positions = [i for i, t in enumerate(placed) if t in labeled]
    frozen = max(int(p.get("n_start") or 0), positions[-1] + 1 if positions else 0)
    universe = placed + new
    ids, feats, _missing_new = _load(
        store, project_id, plan.strategy, p.get("extractor"), p.get("pca_dim"), universe
    )
    if feats is not None:
        have = set(ids)
        lost = [t for t in placed if t not in have]
        if lost:
            raise ValueError(
                f"stored features vanished for ordered tasks {lost[:5]}; rebuild the order"
            )
        index = {t: i for i, t in enumerate(ids)}
        new_ok = [t for t in new if t in have]
    else:
        index = {t: i for i, t in enumerate(universe)}
        new_ok = new
    keys = None
    if plan.strategy == "temporal":
        data = dict(store.list_tasks(project_id))
        ordered_universe = sorted(index, key=lambda t: index[t])
        keys = temporal_keys(
            [(t, data.get(t, {})) for t in ordered_universe],
            p.get("temporal_field"),
            p.get("image_key") or "image",
        )
    result = extend_order(
        [index[t] for t in placed],
        [np.nan if v is None else float(v) for v in placed_dist],
        [index[t] for t in new_ok],
        plan.strategy,
        features=feats,
        keys=keys,
        frozen=min(frozen, len(placed)),
        seed=int(p.get("seed") or 0) + len(universe),
    )
    back = {i: t for t, i in index.items()}
    missing = known_missing + [t for t in new if t not in set(new_ok)]
    order = [back[int(i)] for i in result.order] + missing
    distance = [None if np.isnan(v) else float(v) for v in result.distance] + [None] * len(missing)
    ranks, changed = rerank(order, plan.ranks)
    params = {
        **p,
        "ranks": [ranks[t] for t in order],
        "distance": distance,
        "missing_features": missing,
    }
    store.set_order(project_id, plan.strategy, params, order, view_id=plan.view_id)
    new_plan = OrderPlan(
        project_id, plan.strategy, order, ranks, distance, params, plan.view_id, missing
    )
    return new_plan, changed
