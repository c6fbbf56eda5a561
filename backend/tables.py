"""The database schema: every table boxloop keeps, as SQLAlchemy Core ``Table`` objects.

Its own module so that the two parts that need it do not import each other:
:class:`backend.store.Store` reads and writes these tables, and :mod:`backend.migrations`
compares the Alembic revisions against ``metadata`` (a unit test checks that the migrations at
head produce exactly it). Neither imports the other for it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "annotations_table",
    "box_episodes",
    "bulk_predictions",
    "bulk_runs",
    "features",
    "metadata",
    "model_versions",
    "orders",
    "projects",
    "tasks",
    "training_jobs",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("label_config", Text, nullable=False),
    # names from the label config, and the hostname: TEXT, any length Label Studio takes (0003)
    Column("from_name", Text, nullable=False),
    Column("to_name", Text, nullable=False),
    Column("image_key", Text, nullable=False),
    Column("labels", JSON, nullable=False),
    Column("hostname", Text),
    Column("trained_revision", Integer, nullable=False, default=0),
    Column("created_at", DateTime, nullable=False, default=utcnow),
    Column("updated_at", DateTime, nullable=False, default=utcnow, onupdate=utcnow),
)

tasks = Table(
    "tasks",
    metadata,
    Column("project_id", Integer, primary_key=True, autoincrement=False),
    Column("task_id", Integer, primary_key=True, autoincrement=False),
    Column("data", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False, default=utcnow),
)

annotations_table = Table(
    "annotations",
    metadata,
    Column("project_id", Integer, primary_key=True, autoincrement=False),
    Column("annotation_id", Integer, primary_key=True, autoincrement=False),
    Column("task_id", Integer, nullable=False, index=True),
    Column("result", JSON, nullable=False),
    Column("boxes", JSON),
    Column("parse_error", Text),
    Column("was_cancelled", Boolean, nullable=False, default=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("revision", Integer, nullable=False, index=True),
    Column("source", String(32), nullable=False, default="webhook"),
    Column("updated_at", DateTime, nullable=False, default=utcnow),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("project_id", Integer, primary_key=True, autoincrement=False),
    Column("version", String(255), primary_key=True),
    Column("path", String(2048), nullable=False),
    Column("labels", JSON, nullable=False),
    Column("n_annotations", Integer, nullable=False, default=0),
    Column("n_images", Integer, nullable=False, default=0),
    Column("annotations_revision", Integer, nullable=False, default=0),
    Column("metrics", JSON),
    Column("created_at", DateTime, nullable=False, default=utcnow),
)

training_jobs = Table(
    "training_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", Integer, nullable=False, index=True),
    Column("status", String(32), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("message", Text),
    Column("error", Text),
    Column("model_version", String(255)),
    Column("created_at", DateTime, nullable=False, default=utcnow),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    # the server running the job ("host:pid:token") and its last heartbeat (0004)
    Column("owner", String(255)),
    Column("heartbeat_at", DateTime),
)

features = Table(
    "features",
    metadata,
    Column("project_id", Integer, primary_key=True, autoincrement=False),
    Column("task_id", Integer, primary_key=True, autoincrement=False),
    Column("extractor", String(255), primary_key=True),
    Column("dim", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Column("created_at", DateTime, nullable=False, default=utcnow),
)

orders = Table(
    "orders",
    metadata,
    Column("project_id", Integer, primary_key=True, autoincrement=False),
    Column("strategy", String(64), nullable=False),
    Column("params", JSON, nullable=False),
    Column("task_ids", JSON, nullable=False),
    Column("view_id", Integer),
    Column("updated_at", DateTime, nullable=False, default=utcnow),
)

#: Box-level active learning: one row per episode; ``queries`` holds the queried boxes (pixel
#: corners, label, informativeness, task) and, once answered, each one's ``kind``.
box_episodes = Table(
    "box_episodes",
    metadata,
    Column("project_id", Integer, primary_key=True, autoincrement=False),
    Column("episode", Integer, primary_key=True, autoincrement=False),
    Column("params", JSON, nullable=False),
    Column("queries", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False, default=utcnow),
    Column("updated_at", DateTime, nullable=False, default=utcnow, onupdate=utcnow),
)

#: Bulk pre-annotation runs (``boxloop predict``): one row per run, its progress for ``/status``.
bulk_runs = Table(
    "bulk_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", Integer, nullable=False, index=True),
    Column("model_version", String(255), nullable=False),
    Column("engine", String(32), nullable=False),
    Column("status", String(32), nullable=False),
    Column("total", Integer, nullable=False, default=0),
    Column("done", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0),
    Column("message", Text),
    Column("created_at", DateTime, nullable=False, default=utcnow),
    Column("finished_at", DateTime),
)

#: The bulk ledger: what each run did with each task for a model version (done, failed with
#: the reason, skipped when deleted in Label Studio). Whether a task *has* a prediction is Label
#: Studio's record, which a resumed run reads; the ledger reports.
bulk_predictions = Table(
    "bulk_predictions",
    metadata,
    Column("project_id", Integer, primary_key=True, autoincrement=False),
    Column("task_id", Integer, primary_key=True, autoincrement=False),
    Column("model_version", String(255), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("run_id", Integer),
    Column("error", Text),
    Column("updated_at", DateTime, nullable=False, default=utcnow),
)
