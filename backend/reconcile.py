"""Reconciliation: pull a project's annotations from Label Studio into the store.

Label Studio sends webhooks once, with a 1 s timeout, and never retries; a
backend that was down or slow misses them. Before each training run and on
start-up boxloop asks Label Studio for every annotation of the project and
stores what it lacks, and tombstones what Label Studio no longer has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from backend.ingest import AnnotationPayloadError, ingest_annotation, stored_label_config
from backend.labelstudio.client import StudioClient
from backend.labelstudio.convert import LabelConfig
from backend.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    project_id: int
    pulled: int
    changed: int
    tombstoned: int
    new_tasks: tuple[int, ...]
    """Tasks the store did not hold: created while no webhook reached boxloop."""
    malformed: int
    removed_tasks: int = 0
    """Tasks the store held that Label Studio no longer lists (deleted there)."""


def reconcile_project(
    store: Store, client: StudioClient, project_id: int, config: LabelConfig
) -> ReconcileReport:
    known = {task_id for task_id, _ in store.list_tasks(project_id)}  # before the listing: a
    # task a webhook records meanwhile is not in it, and not taken for one deleted
    rows = [(int(t["id"]), dict(t.get("data") or {})) for t in client.list_tasks(project_id)]
    store.upsert_tasks(project_id, rows)
    new_tasks = tuple(task_id for task_id, _ in rows if task_id not in known)
    removed = store.remove_tasks(project_id, known - {task_id for task_id, _ in rows})
    # What a webhook stores after this point may be newer than Label Studio's answer: such rows
    # are neither replaced by the answer's older content nor tombstoned for missing from it.
    before = store.annotation_revision(project_id)
    remote = client.list_annotations(project_id)
    changed = malformed = 0
    remote_ids: set[int] = set()
    for annotation in remote:
        try:
            result = ingest_annotation(
                store, project_id, config, annotation, source="reconcile", keep_newer_than=before
            )
        except AnnotationPayloadError as exc:
            malformed += 1
            log.warning(
                "project %s: skipped a malformed annotation from the API: %s", project_id, exc
            )
            continue
        remote_ids.add(result.annotation_id)
        changed += int(result.changed)
    local = store.list_annotations(project_id)
    gone = [a.annotation_id for a in local if a.annotation_id not in remote_ids]
    tombstoned = store.delete_annotations(project_id, gone, keep_newer_than=before) if gone else 0
    report = ReconcileReport(
        project_id, len(remote), changed, tombstoned, new_tasks, malformed, removed
    )
    log.info("reconciled %s", report)
    return report


def reconcile_all(
    store: Store,
    client_for: Callable[[int], StudioClient | None],
    after_each: Callable[[int], object],
    tasks_created: Callable[[int, list[int]], None] | None = None,
) -> None:
    """Reconcile every stored project Label Studio can be reached for (at server start). Tasks
    new to the store go to ``tasks_created(project_id, ids)``, as TASKS_CREATED would have sent
    them (queue placement, search vectors); then ``after_each(project_id)`` (training, when
    enough new annotations were pulled). One project's failure is logged, the others go on."""
    for project in store.list_projects():
        client = client_for(project.id)
        if client is None:
            continue
        try:
            config = stored_label_config(project)
            report = reconcile_project(store, client, project.id, config)
            if report.new_tasks and tasks_created is not None:
                tasks_created(project.id, list(report.new_tasks))
            after_each(project.id)
        except Exception as exc:
            log.warning("start-up reconcile of project %s failed: %s", project.id, exc)
