"""Durable backend state: projects, tasks, annotations, model versions, jobs, features, orders.

SQLAlchemy Core over SQLite by default (one file in ``data_dir``); any SQLAlchemy
URL works, so PostgreSQL takes its place with ``BOXLOOP_DATABASE_URL``. Every
write is committed before the call returns: a webhook handler that called
:meth:`Store.upsert_annotation` may answer Label Studio knowing the annotation
survives a crash.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import (
    Engine,
    Text,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

from backend import jsonsafe, migrations
from backend.boxes import Boxes
from backend.tables import (
    annotations_table,
    box_episodes,
    bulk_predictions,
    bulk_runs,
    features,
    model_versions,
    orders,
    projects,
    tasks,
    training_jobs,
    utcnow,
)

JOB_ACTIVE = ("queued", "running")

#: PostgreSQL advisory lock key that orders the writers of annotation revisions.
_REVISION_LOCK = 0x626F786C6F6F71
#: PostgreSQL advisory lock class (with a project id) that orders the queueing and claims of
#: training jobs of a project.
_CLAIM_LOCK = 0x626F786A  # 'boxj'


@dataclass(frozen=True)
class Project:
    id: int
    label_config: str
    from_name: str
    to_name: str
    image_key: str
    labels: list[str]
    hostname: str | None
    trained_revision: int


@dataclass(frozen=True)
class Annotation:
    project_id: int
    annotation_id: int
    task_id: int
    result: list[dict[str, Any]]
    boxes: Boxes | None
    parse_error: str | None
    was_cancelled: bool
    deleted: bool
    revision: int


class StoredReading(NamedTuple):
    """One annotation as a re-read under another label config needs it (:class:`StoredReadings`):
    its raw result, and the boxes and parse error read from it before."""

    annotation_id: int
    revision: int
    result: list[dict[str, Any]]
    boxes: dict[str, Any] | None  #: as :meth:`Boxes.to_dict` wrote them; None: none stored
    parse_error: str | None


class StoredReadings:
    """A project's annotations as fetched for a re-read (:meth:`Store.stored_readings`): rows of
    plain values with the JSON still text, decoded one :class:`StoredReading` at a time as they
    are iterated.

    Why not :meth:`Store.list_annotations`: a project's annotations decoded at once (results
    and :class:`Boxes`) took longer to load than to parse, mostly in Python's garbage
    collector, which walked them again and again (benchmark/results/label_config_edit.md).
    Plain tuples of numbers and strings leave its walks altogether.
    """

    def __init__(self, rows: list[tuple[int, int, str, str | None, str | None]]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[StoredReading]:
        for annotation_id, revision, result, boxes, parse_error in self._rows:
            yield StoredReading(
                annotation_id,
                revision,
                list(json.loads(result)),
                None if boxes is None else json.loads(boxes),
                parse_error,
            )


def latest_per_task(annotations: list[Annotation]) -> list[Annotation]:
    """One annotation per task: the newest non-cancelled one (several annotators may overlap)."""
    chosen: dict[int, Annotation] = {}
    for annotation in annotations:
        if annotation.was_cancelled or annotation.deleted:
            continue
        current = chosen.get(annotation.task_id)
        if current is None or annotation.revision > current.revision:
            chosen[annotation.task_id] = annotation
    return [chosen[t] for t in sorted(chosen)]


@dataclass(frozen=True)
class ModelVersion:
    project_id: int
    version: str
    path: str
    labels: list[str]
    n_annotations: int
    n_images: int
    annotations_revision: int
    metrics: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class TrainingJob:
    id: int
    project_id: int
    status: str
    reason: str
    progress: float
    message: str | None
    error: str | None
    model_version: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    owner: str | None = None
    heartbeat_at: datetime | None = None


@dataclass(frozen=True)
class BulkRun:
    id: int
    project_id: int
    model_version: str
    engine: str
    status: str
    total: int
    done: int
    failed: int
    skipped: int
    message: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class TaskOrder:
    project_id: int
    strategy: str
    params: dict[str, Any]
    task_ids: list[int]
    view_id: int | None
    updated_at: datetime


class Store:
    """All persistent state. Thread-safe: one engine, short transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        # standard JSON on every database: PostgreSQL's json type refuses NaN / Infinity, and
        # with them the annotation they came in (backend.jsonsafe)
        kwargs: dict[str, Any] = {"future": True, "json_serializer": jsonsafe.dumps}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrations.upgrade(self.engine)  # an older boxloop's database: to this code's schema
        self._revision_lock = threading.Lock()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ projects
    def upsert_project(
        self,
        project_id: int,
        *,
        label_config: str,
        from_name: str,
        to_name: str,
        image_key: str,
        labels: Sequence[str],
        hostname: str | None = None,
    ) -> Project:
        """Store a new project, or update one's label config (its ``trained_revision`` and
        ``created_at`` stay, and its hostname unless another is given).

        One ``INSERT ... ON CONFLICT DO UPDATE``: a look for the project, then an insert, failed
        with a duplicate key when two writers stored the same new project at once (``/setup``
        and a webhook carrying the label config, or two servers), on SQLite and PostgreSQL.
        """
        values = {
            "label_config": label_config,
            "from_name": from_name,
            "to_name": to_name,
            "image_key": image_key,
            "labels": list(labels),
            "updated_at": utcnow(),
        }
        insert = _dialect_insert(self.engine.dialect.name)(projects).values(
            id=project_id, trained_revision=0, hostname=hostname, **values
        )
        if hostname:  # an update without one keeps the stored hostname
            values["hostname"] = hostname
        with self._tx() as conn:
            conn.execute(insert.on_conflict_do_update(index_elements=[projects.c.id], set_=values))
        project = self.get_project(project_id)
        assert project is not None
        return project

    def get_project(self, project_id: int) -> Project | None:
        with self._tx() as conn:
            row = (
                conn.execute(select(projects).where(projects.c.id == project_id)).mappings().first()
            )
        if row is None:
            return None
        return Project(
            id=row["id"],
            label_config=row["label_config"],
            from_name=row["from_name"],
            to_name=row["to_name"],
            image_key=row["image_key"],
            labels=list(row["labels"]),
            hostname=row["hostname"],
            trained_revision=row["trained_revision"],
        )

    def list_projects(self) -> list[Project]:
        with self._tx() as conn:
            ids = [r[0] for r in conn.execute(select(projects.c.id).order_by(projects.c.id))]
        return [p for p in (self.get_project(i) for i in ids) if p is not None]

    def set_trained_revision(self, project_id: int, revision: int) -> None:
        with self._tx() as conn:
            conn.execute(
                update(projects)
                .where(projects.c.id == project_id)
                .values(trained_revision=revision, updated_at=utcnow())
            )

    # ------------------------------------------------------------------ tasks
    def upsert_tasks(
        self, project_id: int, items: Iterable[tuple[int, dict[str, Any] | None]]
    ) -> int:
        """Insert or refresh tasks ``(task_id, data)``; returns how many were new. A task sent
        without its data (None) is recorded with ``{}`` when new and keeps its data otherwise.

        The webhook handler, the queue worker and reconciliation (in the training process) may
        all write the same task at once. Each row is an ``INSERT ... ON CONFLICT DO NOTHING``
        (SQLite and PostgreSQL) ``RETURNING`` a row only if this call created it, then an
        update if it did not. Counting the table before and after instead counted other
        writers' rows too: four threads writing the same ten tasks reported 40 new (the
        store tests' concurrent upserts, on PostgreSQL and SQLite alike).

        A task whose image reference changes loses its stored feature vectors: kept, the
        orders and the search went on placing it by the picture it showed before.
        """
        rows = [(int(t), d) for t, d in items]
        if not rows:
            return 0
        new = 0
        insert = (
            _dialect_insert(self.engine.dialect.name)(tasks)
            .on_conflict_do_nothing(index_elements=[tasks.c.project_id, tasks.c.task_id])
            .returning(tasks.c.task_id)  # a row back: this call inserted it
        )
        with self._tx() as conn:
            image_key, images = self._featured_images(conn, project_id, [t for t, _ in rows])
            for task_id, data in rows:
                created = conn.execute(
                    insert.values(
                        project_id=project_id, task_id=task_id, data=data or {}, created_at=utcnow()
                    )
                ).first()
                if created is not None:
                    new += 1
                elif data is not None:
                    conn.execute(
                        update(tasks)
                        .where((tasks.c.project_id == project_id) & (tasks.c.task_id == task_id))
                        .values(data=data)
                    )
                    if task_id in images and images[task_id] != data.get(image_key):
                        conn.execute(
                            features.delete().where(
                                (features.c.project_id == project_id)
                                & (features.c.task_id == task_id)
                            )
                        )
        return new

    @staticmethod
    def _featured_images(
        conn: Connection, project_id: int, task_ids: Sequence[int]
    ) -> tuple[str, dict[int, Any]]:
        """The project's image key, and the image reference of each of ``task_ids`` that has a
        stored vector (nothing read when no task of the project has one)."""
        key = conn.execute(select(projects.c.image_key).where(projects.c.id == project_id)).scalar()
        featured = select(features.c.task_id).where(features.c.project_id == project_id)
        if key is None or conn.execute(featured.limit(1)).first() is None:
            return "", {}
        images: dict[int, Any] = {}
        for start in range(0, len(task_ids), 10_000):  # under SQLite's bound-parameter limit
            chunk = list(task_ids[start : start + 10_000])
            rows = conn.execute(
                select(tasks.c.task_id, tasks.c.data).where(
                    (tasks.c.project_id == project_id)
                    & tasks.c.task_id.in_(chunk)
                    & tasks.c.task_id.in_(featured)
                )
            ).all()
            images.update((int(t), d.get(key) if isinstance(d, dict) else None) for t, d in rows)
        return key, images

    def remove_tasks(self, project_id: int, task_ids: Iterable[int]) -> int:
        """Forget tasks deleted in Label Studio, and their feature vectors; returns how many.

        Kept, they stayed in orders and in search results (the index rebuilt without them once
        their vectors are gone). Their annotations are Label Studio's to delete: a reconcile
        tombstones the ones it no longer lists, and training skips a task without data."""
        ids = sorted({int(t) for t in task_ids})
        removed = 0
        with self._tx() as conn:
            for start in range(0, len(ids), 10_000):  # under SQLite's bound-parameter limit
                chunk = ids[start : start + 10_000]
                conn.execute(
                    features.delete().where(
                        (features.c.project_id == project_id) & features.c.task_id.in_(chunk)
                    )
                )
                removed += conn.execute(
                    tasks.delete().where(
                        (tasks.c.project_id == project_id) & tasks.c.task_id.in_(chunk)
                    )
                ).rowcount
        return removed

    def get_task_data(self, project_id: int, task_id: int) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(
                select(tasks.c.data).where(
                    (tasks.c.project_id == project_id) & (tasks.c.task_id == task_id)
                )
            ).first()
        return None if row is None else dict(row[0])

    def list_tasks(self, project_id: int) -> list[tuple[int, dict[str, Any]]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(tasks.c.task_id, tasks.c.data)
                .where(tasks.c.project_id == project_id)
                .order_by(tasks.c.task_id)
            ).all()
        return [(int(r[0]), dict(r[1])) for r in rows]

    # ------------------------------------------------------------------ annotations
    @contextmanager
    def _revision_tx(self) -> Iterator[Connection]:
        """A transaction that may hand out annotation revisions (``_next_revision``).

        Revisions are ``max + 1``, so writers must not overlap between reading the maximum and
        committing, in this process or any other (the training child's reconcile writes while
        the server takes webhooks; PostgreSQL may have several servers). The thread lock keeps
        this process's threads off the database lock; across processes the database orders
        them: a transaction-scoped advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` (the write
        lock up front) on SQLite. Without it both databases handed two annotations the same
        revision (tests/integration/test_store_backends.py, two processes). Held to commit, so
        revisions also become visible in order: a trainer that read revision N has every
        annotation up to N.
        """
        with self._revision_lock, self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _REVISION_LOCK})
            elif conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    def _next_revision(self, conn: Connection) -> int:
        """Only inside :meth:`_revision_tx`."""
        current = conn.execute(select(func.max(annotations_table.c.revision))).scalar()
        return int(current or 0) + 1

    def upsert_annotation(
        self,
        project_id: int,
        annotation_id: int,
        task_id: int,
        result: list[dict[str, Any]],
        boxes: Boxes | None,
        *,
        parse_error: str | None = None,
        was_cancelled: bool = False,
        source: str = "webhook",
        keep_newer_than: int | None = None,
    ) -> tuple[int, bool]:
        """Store (or replace) one annotation; returns ``(revision, changed)``.

        A re-delivery of identical content (e.g. the same annotation pulled by a
        reconcile after its webhook arrived) keeps its revision, so it does not
        count as new work for the training trigger. A stored row whose revision is above
        ``keep_newer_than`` is kept as it is: it was written after the caller's content was
        read (a webhook landing while a reconcile lists Label Studio's annotations).
        """
        boxes_json = None if boxes is None else boxes.to_dict()
        with self._revision_tx() as conn:
            key = (annotations_table.c.project_id == project_id) & (
                annotations_table.c.annotation_id == annotation_id
            )
            row = conn.execute(
                select(
                    annotations_table.c.result,
                    annotations_table.c.deleted,
                    annotations_table.c.revision,
                    annotations_table.c.task_id,
                    annotations_table.c.was_cancelled,
                ).where(key)
            ).first()
            if row is not None and keep_newer_than is not None and row.revision > keep_newer_than:
                return int(row.revision), False
            if (
                row is not None
                and not row.deleted
                and row.task_id == task_id
                and bool(row.was_cancelled) == was_cancelled
                and _canonical(row.result) == _canonical(result)
            ):
                return int(row.revision), False
            revision = self._next_revision(conn)
            values = {
                "task_id": task_id,
                "result": result,
                "boxes": boxes_json,
                "parse_error": _text(parse_error),
                "was_cancelled": was_cancelled,
                "deleted": False,
                "revision": revision,
                "source": source,
                "updated_at": utcnow(),
            }
            if row is None:
                conn.execute(
                    annotations_table.insert().values(
                        project_id=project_id, annotation_id=annotation_id, **values
                    )
                )
            else:
                conn.execute(update(annotations_table).where(key).values(**values))
        return revision, True

    def replace_parsed_boxes(
        self,
        project_id: int,
        parsed: Mapping[int, tuple[int, Boxes | None, str | None]],
        *,
        renew: Collection[int] = (),
    ) -> int:
        """Store annotations' boxes and parse errors read anew (``{annotation id: (revision it
        was read at, boxes, parse error)}``) in one transaction; returns how many were written.

        The revision stays: the annotation is the same, only how it reads under the project's
        label config changed, so it is no new work for the training trigger -- except for the
        ids in ``renew``, which get a new one: annotations no model could train on before (a
        label the config lacked) that now read, so they count as new work. A row whose revision
        moved meanwhile (a webhook replaced it) is left as that write stored it.
        """
        table = annotations_table
        statement = (
            update(table)
            .where(
                (table.c.project_id == bindparam("b_project"))
                & (table.c.annotation_id == bindparam("b_annotation"))
                & (table.c.revision == bindparam("b_revision"))
            )
            .values(
                boxes=self._json_text("b_boxes"),
                parse_error=bindparam("b_error"),
                revision=bindparam("b_new_revision"),
            )
        )
        rows = [
            {
                "b_project": project_id,
                "b_annotation": annotation_id,
                "b_revision": revision,
                "b_new_revision": revision,
                "b_boxes": jsonsafe.dumps(None if boxes is None else boxes.to_dict()),
                "b_error": _text(parse_error),
            }
            for annotation_id, (revision, boxes, parse_error) in parsed.items()
        ]
        if not rows:
            return 0
        with self._revision_tx() as conn:  # one statement, executed for every row (executemany)
            if renew:
                first, wanted = self._next_revision(conn), set(renew)
                renewed = [row for row in rows if row["b_annotation"] in wanted]
                for offset, row in enumerate(renewed):
                    row["b_new_revision"] = first + offset
            result = conn.execute(statement, rows)
        return result.rowcount if result.rowcount >= 0 else len(rows)

    def _json_text(self, name: str) -> Any:
        """A bound parameter that writes JSON text, serialized by the caller (with
        :func:`jsonsafe.dumps`, as the store's JSON columns do), into a JSON column as it is.

        Why: :meth:`replace_parsed_boxes` serializes each row's boxes while it builds the rows.
        Handed to SQLAlchemy's JSON type instead, a project's boxes were all alive at once as
        nested lists until the statement ran, and Python's garbage collector walked them (a
        full collection, 0.2 s of 20,000 annotations' re-read). The text stored is the same.
        """
        text_param = bindparam(name, type_=Text)
        if self.engine.dialect.name == "sqlite":  # JSON is text there (a cast would be NUMERIC)
            return text_param
        return cast(text_param, annotations_table.c.boxes.type)

    def delete_annotations(
        self,
        project_id: int,
        annotation_ids: Iterable[int],
        *,
        keep_newer_than: int | None = None,
    ) -> int:
        """Mark annotations deleted (kept as tombstones); returns how many changed. Rows whose
        revision is above ``keep_newer_than`` stay (see :meth:`upsert_annotation`)."""
        changed = 0
        with self._revision_tx() as conn:
            for annotation_id in annotation_ids:
                key = (
                    (annotations_table.c.project_id == project_id)
                    & (annotations_table.c.annotation_id == annotation_id)
                    & (annotations_table.c.deleted.is_(False))
                )
                if keep_newer_than is not None:
                    key = key & (annotations_table.c.revision <= keep_newer_than)
                revision = self._next_revision(conn)
                res = conn.execute(
                    update(annotations_table)
                    .where(key)
                    .values(deleted=True, revision=revision, updated_at=utcnow())
                )
                changed += res.rowcount or 0
        return changed

    def list_annotations(
        self, project_id: int, include_deleted: bool = False, *, task_id: int | None = None
    ) -> list[Annotation]:
        """The project's annotations (of one task only, with ``task_id``), by annotation id."""
        query = select(annotations_table).where(annotations_table.c.project_id == project_id)
        if task_id is not None:
            query = query.where(annotations_table.c.task_id == task_id)
        if not include_deleted:
            query = query.where(annotations_table.c.deleted.is_(False))
        with self._tx() as conn:
            rows = conn.execute(query.order_by(annotations_table.c.annotation_id)).mappings().all()
        return [
            Annotation(
                project_id=r["project_id"],
                annotation_id=r["annotation_id"],
                task_id=r["task_id"],
                result=list(r["result"]),
                boxes=None if r["boxes"] is None else Boxes.from_dict(r["boxes"]),
                parse_error=r["parse_error"],
                was_cancelled=bool(r["was_cancelled"]),
                deleted=bool(r["deleted"]),
                revision=r["revision"],
            )
            for r in rows
        ]

    def stored_readings(self, project_id: int) -> StoredReadings:
        """The project's annotations (deleted ones left out), by annotation id, as a re-read
        under another label config needs them: what :meth:`list_annotations` gives of them, less
        the task and flags, and the boxes as their JSON, not as :class:`Boxes`."""
        table = annotations_table
        query = (
            select(
                table.c.annotation_id,
                table.c.revision,
                cast(table.c.result, Text),  # the JSON as stored, decoded when iterated
                cast(table.c.boxes, Text),
                table.c.parse_error,
            )
            .where((table.c.project_id == project_id) & table.c.deleted.is_(False))
            .order_by(table.c.annotation_id)
        )
        with self._tx() as conn:
            return StoredReadings([tuple(row) for row in conn.execute(query)])

    def annotation_revision(self, project_id: int) -> int:
        with self._tx() as conn:
            value = conn.execute(
                select(func.max(annotations_table.c.revision)).where(
                    annotations_table.c.project_id == project_id
                )
            ).scalar()
        return int(value or 0)

    def count_annotations_since(self, project_id: int, revision: int) -> int:
        with self._tx() as conn:
            value = conn.execute(
                select(func.count()).where(
                    (annotations_table.c.project_id == project_id)
                    & (annotations_table.c.revision > revision)
                )
            ).scalar()
        return int(value or 0)

    def annotation_counts(self, project_id: int) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(
                select(
                    annotations_table.c.deleted,
                    annotations_table.c.parse_error.is_(None),
                    func.count(),
                )
                .where(annotations_table.c.project_id == project_id)
                .group_by(annotations_table.c.deleted, annotations_table.c.parse_error.is_(None))
            ).all()
        counts = {"stored": 0, "deleted": 0, "unparsable": 0}
        for deleted, parsed_ok, n in rows:
            if deleted:
                counts["deleted"] += n
            else:
                counts["stored"] += n
                if not parsed_ok:
                    counts["unparsable"] += n
        return counts

    # ------------------------------------------------------------------ model versions
    def add_model_version(
        self,
        project_id: int,
        version: str,
        path: str,
        labels: Sequence[str],
        *,
        n_annotations: int,
        n_images: int,
        annotations_revision: int,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                model_versions.insert().values(
                    project_id=project_id,
                    version=version,
                    path=path,
                    labels=list(labels),
                    n_annotations=n_annotations,
                    n_images=n_images,
                    annotations_revision=annotations_revision,
                    metrics=metrics,
                    created_at=utcnow(),
                )
            )

    def list_model_versions(self, project_id: int) -> list[ModelVersion]:
        with self._tx() as conn:
            rows = (
                conn.execute(
                    select(model_versions)
                    .where(model_versions.c.project_id == project_id)
                    .order_by(model_versions.c.created_at, model_versions.c.version)
                )
                .mappings()
                .all()
            )
        return [
            ModelVersion(
                project_id=r["project_id"],
                version=r["version"],
                path=r["path"],
                labels=list(r["labels"]),
                n_annotations=r["n_annotations"],
                n_images=r["n_images"],
                annotations_revision=r["annotations_revision"],
                metrics=r["metrics"],
                created_at=r["created_at"],
            )
            for r in rows
        ]

    def update_model_version_metrics(
        self, project_id: int, version: str, metrics: dict[str, Any]
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                model_versions.update()
                .where(
                    (model_versions.c.project_id == project_id)
                    & (model_versions.c.version == version)
                )
                .values(metrics=metrics)
            )

    def latest_model_version(self, project_id: int) -> ModelVersion | None:
        versions = self.list_model_versions(project_id)
        return versions[-1] if versions else None

    # ------------------------------------------------------------------ training jobs
    def create_job(self, project_id: int, reason: str) -> int:
        """A new queued job, even beside a queued one (the scheduler uses :meth:`queue_job`)."""
        with self._tx() as conn:
            return self._insert_job(conn, project_id, reason)

    @staticmethod
    def _insert_job(conn: Connection, project_id: int, reason: str) -> int:
        res = conn.execute(
            training_jobs.insert().values(
                project_id=project_id,
                status="queued",
                reason=_text(reason),
                progress=0.0,
                created_at=utcnow(),
            )
        )
        key = res.inserted_primary_key
        assert key is not None
        return int(key[0])

    def queue_job(self, project_id: int, reason: str) -> tuple[int, bool]:
        """The project's queued job, or a new one queued for ``reason``: its id, and whether
        this call queued it.

        Servers sharing a database ask at once (a webhook on each, two restarts): a look for a
        queued job, then an insert, queued a job on each, and the project trained twice in a
        row. One transaction, ordered with the others of the project by a lock of it on
        PostgreSQL (the one claims take), by the write lock up front on SQLite.
        """
        with self._tx() as conn:
            if conn.dialect.name == "postgresql":
                self._lock_project_jobs(conn, project_id)
            elif conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            queued = conn.execute(
                select(training_jobs.c.id)
                .where(training_jobs.c.project_id == project_id)
                .where(training_jobs.c.status == "queued")
                .order_by(training_jobs.c.id.desc())
                .limit(1)
            ).scalar()
            if queued is not None:
                return int(queued), False
            return self._insert_job(conn, project_id, reason), True

    def withdraw_queued_job(self, job_id: int, message: str) -> bool:
        """Mark job ``job_id`` ``interrupted`` if no one started it yet; True when it did."""
        query = (
            update(training_jobs)
            .where(training_jobs.c.id == job_id, training_jobs.c.status == "queued")
            .values(status="interrupted", finished_at=utcnow(), message=_text(message))
        )
        with self._tx() as conn:
            return conn.execute(query).rowcount == 1

    @staticmethod
    def _lock_project_jobs(conn: Connection, project_id: int) -> None:
        """PostgreSQL: a lock of one project's training jobs, held to the commit."""
        lock = "SELECT pg_advisory_xact_lock(CAST(:key AS int), CAST(:project AS int))"
        conn.execute(text(lock), {"key": _CLAIM_LOCK, "project": int(project_id)})

    def update_job(self, job_id: int, **values: Any) -> None:
        values = {k: _text(v) for k, v in values.items()}  # messages and errors quote input
        with self._tx() as conn:
            conn.execute(update(training_jobs).where(training_jobs.c.id == job_id).values(**values))

    def claim_job(self, job_id: int, owner: str) -> bool:
        """Start queued job ``job_id`` for ``owner``; False when it is not queued any more, or
        another job of its project runs.

        One conditional UPDATE, so two servers sharing a database never both start one job (on
        PostgreSQL the second waits for the first's row lock, then finds it no longer queued).
        Two claims of two queued jobs of one project lock different rows, and under READ
        COMMITTED neither one's NOT EXISTS sees the other's uncommitted ``running`` row: on
        PostgreSQL a claim first takes a lock of the project (released at commit), so the second
        claim's UPDATE reads after the first one committed.
        """
        other = training_jobs.alias("other")
        busy = (
            select(other.c.id)
            .where(other.c.project_id == training_jobs.c.project_id)
            .where(other.c.status == "running")
            .exists()
        )
        with self._tx() as conn:
            if conn.dialect.name == "postgresql":
                project_id = conn.execute(
                    select(training_jobs.c.project_id).where(training_jobs.c.id == job_id)
                ).scalar()
                if project_id is None:
                    return False
                self._lock_project_jobs(conn, int(project_id))
            now = self._database_now(conn)
            query = (
                update(training_jobs)
                .where(training_jobs.c.id == job_id, training_jobs.c.status == "queued", ~busy)
                .values(status="running", owner=owner, started_at=now, heartbeat_at=now)
            )
            return conn.execute(query).rowcount == 1

    def database_now(self) -> datetime:
        """The database's clock (UTC, naive). Heartbeats are written and judged with it: servers
        sharing a PostgreSQL run on hosts whose clocks differ, and a heartbeat written with one
        host's clock and judged with another's looked stale (or fresh) by the difference."""
        with self._tx() as conn:
            return self._database_now(conn)

    @staticmethod
    def _database_now(conn: Connection) -> datetime:
        if conn.dialect.name == "postgresql":
            value = conn.execute(text("SELECT timezone('UTC', clock_timestamp())")).scalar()
            assert isinstance(value, datetime)
            return value
        return utcnow()  # SQLite: a file on this host, read with this host's clock

    def update_active_job(self, job_id: int, **values: Any) -> bool:
        """Update job ``job_id`` only while it is queued or running (whoever runs it); True when
        it did. For a training child's outcome: a job another server took over
        (``interrupted``, its project queued again) keeps that status."""
        values = {k: _text(v) for k, v in values.items()}
        query = (
            update(training_jobs)
            .where(training_jobs.c.id == job_id, training_jobs.c.status.in_(JOB_ACTIVE))
            .values(**values)
        )
        with self._tx() as conn:
            return conn.execute(query).rowcount == 1

    def update_owned_job(self, job_id: int, owner: str | None, **values: Any) -> bool:
        """Update job ``job_id`` only while it runs under ``owner`` (None: a job no server
        claimed, one a version before 0004 started); True when it did."""
        values = {k: _text(v) for k, v in values.items()}
        held = training_jobs.c.owner.is_(None) if owner is None else training_jobs.c.owner == owner
        query = (
            update(training_jobs)
            .where(training_jobs.c.id == job_id, training_jobs.c.status == "running", held)
            .values(**values)
        )
        with self._tx() as conn:
            return conn.execute(query).rowcount == 1

    def get_job(self, job_id: int) -> TrainingJob | None:
        with self._tx() as conn:
            row = (
                conn.execute(select(training_jobs).where(training_jobs.c.id == job_id))
                .mappings()
                .first()
            )
        return None if row is None else TrainingJob(**dict(row))

    def list_jobs(
        self, project_id: int | None = None, statuses: Sequence[str] | None = None, limit: int = 50
    ) -> list[TrainingJob]:
        query = select(training_jobs).order_by(training_jobs.c.id.desc()).limit(limit)
        if project_id is not None:
            query = query.where(training_jobs.c.project_id == project_id)
        if statuses:
            query = query.where(training_jobs.c.status.in_(list(statuses)))
        with self._tx() as conn:
            rows = conn.execute(query).mappings().all()
        return [TrainingJob(**dict(r)) for r in rows]

    # ------------------------------------------------------------------ features
    def put_features(
        self, project_id: int, extractor: str, items: Iterable[tuple[int, np.ndarray]]
    ) -> None:
        """Store (or replace) the vectors of tasks; a task given twice keeps the last one.

        One ``INSERT ... ON CONFLICT DO UPDATE`` per task: a delete then an insert failed with a
        duplicate key on PostgreSQL when two processes stored the same task's vector at once
        (``boxloop order`` while the server places new tasks, two servers).
        """
        vectors: dict[int, np.ndarray] = {}
        for task_id, vector in items:
            vectors[int(task_id)] = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if not vectors:
            return
        rows = [
            {
                "project_id": project_id,
                "task_id": task_id,
                "extractor": extractor,
                "dim": len(vec),
                "vector": vec.tobytes(),
                "created_at": utcnow(),
            }
            for task_id, vec in vectors.items()
        ]
        insert = _dialect_insert(self.engine.dialect.name)(features)
        statement = insert.on_conflict_do_update(
            index_elements=["project_id", "task_id", "extractor"],
            set_={
                "dim": insert.excluded.dim,
                "vector": insert.excluded.vector,
                "created_at": insert.excluded.created_at,
            },
        )
        with self._tx() as conn:
            conn.execute(statement, rows)

    def get_features(
        self, project_id: int, extractor: str, task_ids: Sequence[int] | None = None
    ) -> tuple[list[int], np.ndarray]:
        """Stored vectors as ``(task_ids, (N, d) float32 array)``, ordered by task id.

        Asked for ``task_ids``, they are read 10,000 at a time, in order: psycopg takes at most
        65,535 parameters in a statement, and ordering or indexing a project bigger than that
        asked for all its tasks in one ``IN (...)`` and failed on PostgreSQL.
        """
        query = (
            select(features.c.task_id, features.c.dim, features.c.vector)
            .where((features.c.project_id == project_id) & (features.c.extractor == extractor))
            .order_by(features.c.task_id)
        )
        with self._tx() as conn:
            if task_ids is None:
                rows = list(conn.execute(query).all())
            else:
                ids, rows = sorted({int(t) for t in task_ids}), []
                for start in range(0, len(ids), 10_000):  # under the drivers' parameter limits
                    chunk = ids[start : start + 10_000]
                    rows += conn.execute(query.where(features.c.task_id.in_(chunk))).all()
        if not rows:
            return [], np.zeros((0, 0), np.float32)
        ids = [int(r[0]) for r in rows]
        matrix = np.stack([np.frombuffer(r[2], dtype=np.float32, count=r[1]) for r in rows])
        return ids, matrix

    # ------------------------------------------------------------------ orders
    def set_order(
        self,
        project_id: int,
        strategy: str,
        params: dict[str, Any],
        task_ids: Sequence[int],
        view_id: int | None = None,
    ) -> None:
        """Replace the project's order (every field, ``view_id`` too).

        One ``INSERT ... ON CONFLICT DO UPDATE``: a delete then an insert failed with a
        duplicate key on PostgreSQL when two processes stored an order of a project at once.
        """
        insert = _dialect_insert(self.engine.dialect.name)(orders).values(
            project_id=project_id,
            strategy=strategy,
            params=params,
            task_ids=[int(t) for t in task_ids],
            view_id=view_id,
            updated_at=utcnow(),
        )
        replaced = ("strategy", "params", "task_ids", "view_id", "updated_at")
        statement = insert.on_conflict_do_update(
            index_elements=[orders.c.project_id],
            set_={name: insert.excluded[name] for name in replaced},
        )
        with self._tx() as conn:
            conn.execute(statement)

    def get_order(self, project_id: int) -> TaskOrder | None:
        with self._tx() as conn:
            row = (
                conn.execute(select(orders).where(orders.c.project_id == project_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return TaskOrder(
            project_id=row["project_id"],
            strategy=row["strategy"],
            params=dict(row["params"]),
            task_ids=list(row["task_ids"]),
            view_id=row["view_id"],
            updated_at=row["updated_at"],
        )

    # ------------------------------------------------------------------ box episodes
    def add_box_episode(
        self, project_id: int, params: dict[str, Any], queries: list[dict[str, Any]]
    ) -> int:
        """Store a new episode (numbered from 1); returns its number."""
        with self._tx() as conn:
            last = conn.execute(
                select(func.max(box_episodes.c.episode)).where(
                    box_episodes.c.project_id == project_id
                )
            ).scalar()
            number = int(last or 0) + 1
            conn.execute(
                box_episodes.insert().values(
                    project_id=project_id, episode=number, params=params, queries=queries
                )
            )
        return number

    def list_box_episodes(self, project_id: int) -> list[tuple[int, dict[str, Any], list[Any]]]:
        """``(episode, params, queries)`` in episode order."""
        with self._tx() as conn:
            rows = conn.execute(
                select(box_episodes.c.episode, box_episodes.c.params, box_episodes.c.queries)
                .where(box_episodes.c.project_id == project_id)
                .order_by(box_episodes.c.episode)
            ).all()
        return [(int(r[0]), dict(r[1]), list(r[2])) for r in rows]

    def set_box_queries(self, project_id: int, episode: int, queries: list[dict[str, Any]]) -> None:
        with self._tx() as conn:
            conn.execute(
                update(box_episodes)
                .where(box_episodes.c.project_id == project_id)
                .where(box_episodes.c.episode == episode)
                .values(queries=queries, updated_at=utcnow())
            )

    # ------------------------------------------------------------------ bulk pre-annotation
    def create_bulk_run(self, project_id: int, model_version: str, engine: str) -> int:
        with self._tx() as conn:
            res = conn.execute(
                bulk_runs.insert().values(
                    project_id=project_id,
                    model_version=model_version,
                    engine=engine,
                    status="running",
                    created_at=utcnow(),
                )
            )
            key = res.inserted_primary_key
            assert key is not None
            return int(key[0])

    def update_bulk_run(self, run_id: int, **values: Any) -> None:
        values = {k: _text(v) for k, v in values.items()}
        with self._tx() as conn:
            conn.execute(update(bulk_runs).where(bulk_runs.c.id == run_id).values(**values))

    def list_bulk_runs(self, project_id: int, limit: int = 5) -> list[BulkRun]:
        query = (
            select(bulk_runs)
            .where(bulk_runs.c.project_id == project_id)
            .order_by(bulk_runs.c.id.desc())
            .limit(limit)
        )
        with self._tx() as conn:
            rows = conn.execute(query).mappings().all()
        return [BulkRun(**dict(r)) for r in rows]

    def bulk_states(self, project_id: int, model_version: str) -> dict[int, str]:
        """``{task_id: state}`` of the ledger for one model version."""
        with self._tx() as conn:
            rows = conn.execute(
                select(bulk_predictions.c.task_id, bulk_predictions.c.state)
                .where(bulk_predictions.c.project_id == project_id)
                .where(bulk_predictions.c.model_version == model_version)
            ).all()
        return {int(r[0]): str(r[1]) for r in rows}

    def mark_bulk(
        self,
        project_id: int,
        model_version: str,
        states: Mapping[int, str],
        run_id: int | None,
        errors: Mapping[int, str] | None = None,
        run_counts: Mapping[str, int] | None = None,
    ) -> None:
        """Set the ledger state of some tasks and, with ``run_counts``, the run's progress, in
        one transaction: a bulk run writes once per imported batch, so it holds the database's
        write lock as little as possible while webhooks are being stored."""
        if not states and not run_counts:
            return
        errors = errors or {}
        insert = _dialect_insert(self.engine.dialect.name)(bulk_predictions)
        rows = [
            {
                "project_id": project_id,
                "task_id": int(task_id),
                "model_version": model_version,
                "state": state,
                "run_id": run_id,
                "error": _text(errors.get(task_id)),
                "updated_at": utcnow(),
            }
            for task_id, state in states.items()
        ]
        statement = insert.on_conflict_do_update(
            index_elements=["project_id", "task_id", "model_version"],
            set_={
                "state": insert.excluded.state,
                "run_id": insert.excluded.run_id,
                "error": insert.excluded.error,
                "updated_at": insert.excluded.updated_at,
            },
        )
        with self._tx() as conn:
            if rows:
                conn.execute(statement, rows)
            if run_counts and run_id is not None:
                conn.execute(
                    update(bulk_runs).where(bulk_runs.c.id == run_id).values(**dict(run_counts))
                )


def _dialect_insert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def _text(value: Any) -> Any:
    """A string for a text column, NUL characters replaced (U+FFFD); other values as they are.

    PostgreSQL text cannot hold NUL (psycopg raises ``DataError``), SQLite can: a webhook whose
    label held ``\u0000`` failed with a 500 and lost the annotation on PostgreSQL only, because
    the parse error quoting the label went into ``parse_error``. Replaced on every database so
    both store the same thing. (JSON columns are unaffected: the serializer writes ``\u0000``.)
    """
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _canonical(value: Any) -> str:
    """``value`` as the text two annotation results are compared by: as stored, so with its
    non-finite numbers as null (:func:`jsonsafe.finite`). The raw value held NaN where the stored
    one held null, and every re-delivery of such an annotation was new work for the trainer."""
    return json.dumps(jsonsafe.finite(value), sort_keys=True, default=str)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
