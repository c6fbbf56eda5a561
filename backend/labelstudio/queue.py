"""Make Label Studio (Community Edition) show tasks in boxloop's order.

Two mechanisms, as observed with Label Studio 1.23.2 (``/work/shared/docs/label-studio.md``):

* **A Data Manager view sorted by a rank field.** Each task's rank is written into its data
  (``data[field]``) as a zero-padded string — data fields sort as strings unless the view
  declares the column numeric, so both are done — and a view (tab) ordered by
  ``tasks:data.<field>`` is created or updated. "Label All Tasks" from that tab follows it.
* **Uncertainty sampling** (the only project-wide queue setting): Label Studio serves the task
  whose current-version prediction has the *lowest* score first. So each task gets a prediction
  with ``model_version`` equal to the project's and ``score`` from its rank (:func:`rank_score`). A task that already has
  a prediction of that version keeps its result (boxes) and only gets its score changed; others
  get an empty-result prediction. Note: Label Studio then considers those tasks predicted for
  that version and will not ask the backend's ``/predict`` for them; the backend should answer
  ``/predict`` with the same score (:func:`rank_score`) so the order survives new predictions.

Ranks are spaced integers (:mod:`backend.ordering.ranks`) so new tasks fit in between and only
they need writing. Every function takes a ``label_studio_sdk.LabelStudio`` client (or boxloop's
``StudioClient``, whose ``.sdk`` is used). Predictions are imported through
:meth:`StudioClient.import_predictions <backend.labelstudio.client.StudioClient.import_predictions>`
(over the bare SDK where that is what was given), never twice: not retried blindly after a 5xx
that may have come after Label Studio stored them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.labelstudio.client import StudioClient

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RANK_FIELD",
    "DEFAULT_VIEW_TITLE",
    "RANK_WIDTH",
    "UNCERTAINTY",
    "PushResult",
    "enable_uncertainty_sampling",
    "ensure_order_view",
    "format_rank",
    "list_predictions",
    "order_view_data",
    "plan_score_updates",
    "push_order",
    "push_order_result",
    "push_version_predictions",
    "rank_score",
    "rank_updates",
    "set_rank_scores",
    "uses_uncertainty_sampling",
    "write_ranks",
    "write_task_fields",
]

DEFAULT_RANK_FIELD = "boxloop_rank"
DEFAULT_VIEW_TITLE = "boxloop order"
#: Digits of the zero-padded rank (12: ranks up to 10^12, far beyond spaced ranks of any pool).
RANK_WIDTH = 12
UNCERTAINTY = "Uncertainty sampling"
_IMPORT_CHUNK = 500


def format_rank(rank: int, width: int = RANK_WIDTH) -> str:
    """``1024`` → ``"000000001024"``: sorts right as a string too."""
    if rank < 0:
        raise ValueError("ranks are non-negative")
    text = str(int(rank))
    if len(text) > width:
        raise ValueError(f"rank {rank} does not fit in {width} digits")
    return text.zfill(width)


def rank_score(rank: int, width: int = RANK_WIDTH) -> float:
    """Prediction score for Uncertainty sampling: ``rank / (rank + 10**6)``, lowest served first.

    Monotone in the rank, independent of the pool size (new tasks change no other score), and
    within [0, 1): Label Studio's prediction import rejects scores outside it. Scores are kept
    well above 1e-6: with ``rank / 10**width`` (≈1e-9) Label Studio 1.23.2 served the queue in
    an order that did not follow them (seen in tests/e2e/test_ordering_e2e.py).
    """
    del width
    return float(rank) / (float(rank) + 1e6)


def order_view_data(
    field: str = DEFAULT_RANK_FIELD, title: str = DEFAULT_VIEW_TITLE
) -> dict[str, Any]:
    """The Data Manager tab payload: ordered by the rank field, the column declared numeric."""
    column = f"tasks:data.{field}"
    return {
        "title": title,
        "ordering": [column],
        "type": "list",
        "target": "tasks",
        "filters": {"conjunction": "and", "items": []},
        "columnsDisplayType": {column: "Number"},
    }


def rank_updates(
    current: Mapping[int, Mapping[str, Any]],
    ranks: Mapping[int, int],
    field: str = DEFAULT_RANK_FIELD,
) -> list[tuple[int, dict[str, Any]]]:
    """``(task_id, new data)`` for tasks whose stored rank differs (data merged, not replaced).

    Tasks in ``ranks`` but missing from ``current`` are skipped (deleted in Label Studio).
    """
    out = []
    for task_id, rank in ranks.items():
        data = current.get(int(task_id))
        if data is None:
            continue
        value = format_rank(rank)
        if data.get(field) != value:
            out.append((int(task_id), {**data, field: value}))
    return out


def plan_score_updates(
    predictions: Iterable[Mapping[str, Any]], ranks: Mapping[int, int], model_version: str
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(updates, creations)``: ``(prediction_id, score)`` for existing predictions of this
    version whose score differs, and ``(task_id, score)`` for tasks without one."""
    by_task: dict[int, list[Mapping[str, Any]]] = {}
    for p in predictions:
        if p.get("model_version") == model_version and p.get("task") is not None:
            by_task.setdefault(int(p["task"]), []).append(p)
    updates: list[tuple[int, float]] = []
    creations: list[tuple[int, float]] = []
    for task_id, rank in ranks.items():
        score = rank_score(rank)
        existing = by_task.get(int(task_id))
        if not existing:
            creations.append((int(task_id), score))
            continue
        for p in existing:
            if p.get("score") is None or float(p["score"]) != score:
                updates.append((int(p["id"]), score))
    return updates, creations


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    result = value.model_dump(mode="json", by_alias=True)
    return dict(result)


def _task_data(
    client: LabelStudio, project_id: int, task_ids: set[int] | None
) -> dict[int, dict[str, Any]]:
    """Current data of the project's tasks (all pages), optionally only some ids."""
    out: dict[int, dict[str, Any]] = {}
    pager: Iterable[Any] = client.tasks.list(project=project_id, fields="task_only", page_size=500)
    for task in pager:
        item = _as_dict(task)
        tid = int(item["id"])
        if task_ids is None or tid in task_ids:
            out[tid] = dict(item.get("data") or {})
    return out


def write_ranks(
    client: LabelStudio | Any,
    project_id: int,
    ranks: Mapping[int, int],
    *,
    field: str = DEFAULT_RANK_FIELD,
    current: Mapping[int, Mapping[str, Any]] | None = None,
) -> int:
    """Write each task's rank into ``data[field]`` (zero-padded); returns how many were written.

    One listing of the project's tasks (unless ``current`` data is given), then one PATCH per
    task whose rank differs; the rest of the task data is kept.
    """
    client = _sdk(client)
    data = current if current is not None else _task_data(client, project_id, set(ranks))
    updates = rank_updates(data, ranks, field)
    for task_id, new_data in updates:
        client.tasks.update(str(task_id), data=new_data, project=project_id)
    log.info("project %s: wrote %d task ranks into data.%s", project_id, len(updates), field)
    return len(updates)


#: Above this many tasks, :func:`write_task_fields` reads them in one listing of the project
#: (pages of 500) instead of one GET each: an order scoring a pool of 10,000 new images made
#: 10,000 GETs before its writes.
LIST_TASKS_ABOVE = 50


def write_task_fields(
    client: LabelStudio | Any, project_id: int, fields: Mapping[int, Mapping[str, Any]]
) -> int:
    """Merge ``fields`` into each task's current data (read just before, then one PATCH a task
    whose fields differ); returns how many were written. A task deleted in Label Studio is
    skipped.

    Why read each task just before writing it: a PATCH replaces the whole data, and a caller's
    copy can be older than Label Studio's. A ``/predict`` request's copy, written back with its
    utility score, undid the ranks an order had pushed since. One GET a task for a few tasks
    (``/predict`` writes a few of a project of any size), one listing for many
    (:data:`LIST_TASKS_ABOVE`).
    """
    sdk = _sdk(client)
    listed = (
        _task_data(sdk, project_id, {int(t) for t in fields})
        if len(fields) > LIST_TASKS_ABOVE
        else None
    )
    written = 0
    for task_id, values in fields.items():
        if listed is not None:
            if int(task_id) not in listed:
                continue
            data = listed[int(task_id)]
        else:
            try:
                data = dict(_as_dict(sdk.tasks.get(str(int(task_id)))).get("data") or {})
            except ApiError as exc:
                if exc.status_code == 404:
                    continue
                raise
        if all(data.get(k) == v for k, v in values.items()):
            continue
        sdk.tasks.update(str(int(task_id)), data={**data, **values}, project=project_id)
        written += 1
    return written


def ensure_order_view(
    client: LabelStudio | Any,
    project_id: int,
    *,
    field: str = DEFAULT_RANK_FIELD,
    title: str = DEFAULT_VIEW_TITLE,
    view_id: int | None = None,
) -> int:
    """Create or update the Data Manager tab sorted by the rank field; returns its id.

    Looks for ``view_id`` first, then a tab of the project with the same title; updates it if
    found (its other settings, e.g. hidden columns, are kept), else creates one.
    """
    client = _sdk(client)
    wanted = order_view_data(field, title)
    views = [_as_dict(v) for v in client.views.list(project=project_id)]
    found = next((v for v in views if view_id is not None and v.get("id") == view_id), None)
    if found is None:
        found = next((v for v in views if (v.get("data") or {}).get("title") == title), None)
    if found is None:
        created = _as_dict(client.views.create(project=project_id, data=wanted))  # type: ignore[arg-type]
        return int(created["id"])
    merged = {**(found.get("data") or {}), **wanted}
    merged["columnsDisplayType"] = {
        **((found.get("data") or {}).get("columnsDisplayType") or {}),
        **wanted["columnsDisplayType"],
    }
    client.views.update(str(found["id"]), project=project_id, data=merged)  # type: ignore[arg-type]
    return int(found["id"])


def uses_uncertainty_sampling(client: LabelStudio | Any, project_id: int) -> bool:
    project = _as_dict(_sdk(client).projects.get(project_id))
    return project.get("sampling") == UNCERTAINTY


def enable_uncertainty_sampling(
    client: LabelStudio | Any, project_id: int, model_version: str
) -> None:
    """Switch the project queue to Uncertainty sampling for ``model_version`` (the UI shows it
    as an Enterprise feature; the API sets it in the Community Edition and the queue honours it)."""
    _sdk(client).projects.update(id=project_id, sampling=UNCERTAINTY, model_version=model_version)


def list_predictions(client: LabelStudio | Any, project_id: int) -> list[dict[str, Any]]:
    """Every prediction of the project (``task``, ``model_version``, ``score``, ``result``)."""
    return [_as_dict(p) for p in _sdk(client).predictions.list(project=project_id)]


def set_rank_scores(
    client: LabelStudio | Any,
    project_id: int,
    ranks: Mapping[int, int],
    *,
    model_version: str | None = None,
    predictions: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[int, int]:
    """Give every ranked task a prediction of the project's model version scored by its rank.

    Returns ``(updated, created)``. Existing predictions of that version keep their result and
    get the score; tasks without one get an empty-result prediction (bulk import, never twice:
    see :func:`_import_once`; a task deleted meanwhile is left out and not counted).
    ``predictions``: the project's predictions if the caller has listed them already.
    """
    studio = _studio(client)
    client = studio.sdk
    version = model_version or _as_dict(client.projects.get(project_id)).get("model_version")
    if not version:
        raise ValueError(
            f"project {project_id} has no model_version: Uncertainty sampling only sees "
            "predictions of the project's model version (connect the backend first)"
        )
    existing = list_predictions(client, project_id) if predictions is None else predictions
    updates, creations = plan_score_updates(existing, ranks, str(version))
    for prediction_id, score in updates:
        client.predictions.update(prediction_id, score=score)
    created = _import_once(
        studio, project_id, str(version), [(t, [], score) for t, score in creations]
    )
    log.info(
        "project %s: %d prediction scores updated, %d created (version %s)",
        project_id,
        len(updates),
        created,
        version,
    )
    return len(updates), created


def push_version_predictions(
    client: LabelStudio | Any,
    project_id: int,
    results: Mapping[int, Sequence[Mapping[str, Any]]],
    ranks: Mapping[int, int],
    model_version: str,
    *,
    predictions: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[int, int]:
    """Store a model version's boxes for some tasks, scored by rank (Uncertainty sampling).

    Why: once a task has a prediction of the project's model version, Label Studio never asks
    the backend for another, so after a retrain the next tasks in the queue must receive the new
    model's boxes *with* their rank scores here, or annotators would see empty score-only
    predictions. A task with a prediction of this version gets its result and score replaced;
    others get one imported (never twice: see :func:`_import_once`; a task deleted meanwhile is
    left out and not counted). Returns ``(updated, created)``. ``predictions``: the project's
    predictions if the caller has listed them already.
    """
    studio = _studio(client)
    sdk = studio.sdk
    existing: dict[int, int] = {}
    listed = list_predictions(sdk, project_id) if predictions is None else predictions
    for p in listed:
        if p.get("model_version") == model_version and p.get("task") is not None:
            existing.setdefault(int(p["task"]), int(p["id"]))
    updated = 0
    creations: list[tuple[int, list[dict[str, Any]], float]] = []
    for task_id, result in results.items():
        score = rank_score(int(ranks[int(task_id)]))
        if int(task_id) in existing:
            sdk.predictions.update(
                existing[int(task_id)], result=[dict(r) for r in result], score=score
            )
            updated += 1
        else:
            creations.append((int(task_id), [dict(r) for r in result], score))
    return updated, _import_once(studio, project_id, model_version, creations)


def _import_once(
    studio: StudioClient,
    project_id: int,
    model_version: str,
    predictions: Sequence[tuple[int, list[dict[str, Any]], float]],
) -> int:
    """Import ``(task_id, result, score)`` predictions of ``model_version`` for tasks that have
    none of it, ``_IMPORT_CHUNK`` a request; returns how many were imported.

    Each chunk goes through :meth:`StudioClient.import_predictions`: the SDK's blind retry sent
    a chunk again after a proxy's 502/504 that came after Label Studio had stored it, and each
    task got the version's prediction twice. There, after a failed try, the tasks that now hold
    a prediction of ``model_version`` (only that version: a task keeps its other versions'
    predictions) are left out of the next, and tasks deleted meanwhile are left out."""
    gone = 0
    for s in range(0, len(predictions), _IMPORT_CHUNK):
        chunk = predictions[s : s + _IMPORT_CHUNK]
        gone += len(studio.import_predictions(project_id, model_version, chunk))
    return len(predictions) - gone


@dataclass(frozen=True)
class PushResult:
    """What :func:`push_order_result` changed in Label Studio."""

    view_id: int
    ranks_written: int
    scores_updated: int
    scores_created: int
    uncertainty: bool


def push_order_result(
    client: LabelStudio | Any,
    project_id: int,
    task_ids: Sequence[int],
    ranks: Mapping[int, int],
    data: Mapping[int, Mapping[str, Any]] | None = None,
    *,
    only_task_ids: Iterable[int] | None = None,
    view_id: int | None = None,
    uncertainty: bool | None = None,
    field: str = DEFAULT_RANK_FIELD,
    view_title: str = DEFAULT_VIEW_TITLE,
    model_version: str | None = None,
) -> PushResult:
    """Ranks into task data, the sorted view, and (under Uncertainty sampling) scores.

    ``task_ids``: the order (tasks not in ``ranks`` are ignored); ``data``: current task data by
    id, to merge into (listed from Label Studio when None; tasks it lacks are left out);
    ``only_task_ids`` limits the writes (after an insertion only the new tasks' ranks change);
    ``uncertainty=None`` sets prediction scores only when the project uses Uncertainty sampling,
    True/False forces it; ``model_version``: the scores' version (default: the project's).
    """
    sdk = _sdk(client)
    wanted = {int(t): int(ranks[int(t)]) for t in task_ids if int(t) in ranks}
    if only_task_ids is not None:
        keep = {int(t) for t in only_task_ids}
        wanted = {t: r for t, r in wanted.items() if t in keep}
    current = data if data is not None else _task_data(sdk, project_id, set(wanted))
    # a task deleted in Label Studio since the order was built: its PATCH (404) or score
    # import (400) would stop the push before the view is written
    wanted = {t: r for t, r in wanted.items() if t in current}
    written = write_ranks(sdk, project_id, wanted, field=field, current=current)
    vid = ensure_order_view(sdk, project_id, field=field, title=view_title, view_id=view_id)
    scored = uses_uncertainty_sampling(sdk, project_id) if uncertainty is None else uncertainty
    updated = created = 0
    if scored and wanted:
        updated, created = set_rank_scores(client, project_id, wanted, model_version=model_version)
    return PushResult(vid, written, updated, created, bool(scored))


def push_order(
    client: LabelStudio | Any,
    project_id: int,
    task_ids: Sequence[int],
    ranks: Mapping[int, int],
    data: Mapping[int, Mapping[str, Any]] | None = None,
    *,
    only_task_ids: Iterable[int] | None = None,
    view_id: int | None = None,
    uncertainty: bool | None = None,
    field: str = DEFAULT_RANK_FIELD,
    view_title: str = DEFAULT_VIEW_TITLE,
    model_version: str | None = None,
) -> int:
    """:func:`push_order_result`, returning only the view id (what the caller stores)."""
    return push_order_result(
        client,
        project_id,
        task_ids,
        ranks,
        data,
        only_task_ids=only_task_ids,
        view_id=view_id,
        uncertainty=uncertainty,
        field=field,
        view_title=view_title,
        model_version=model_version,
    ).view_id


def _sdk(client: LabelStudio | Any) -> LabelStudio:
    """Accept the SDK client or boxloop's :class:`~backend.labelstudio.client.StudioClient`."""
    sdk = getattr(client, "sdk", client)
    return sdk  # type: ignore[no-any-return]


def _studio(client: LabelStudio | Any) -> StudioClient:
    """boxloop's :class:`StudioClient` as given, else one over the SDK client."""
    return client if isinstance(client, StudioClient) else StudioClient.of(_sdk(client))
