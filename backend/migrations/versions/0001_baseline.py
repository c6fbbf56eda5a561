"""Baseline: the schema boxloop created with ``metadata.create_all`` up to commit 8c04528.

A database made by such a boxloop has these tables and no ``alembic_version``; the store stamps
it at this revision (see :func:`backend.migrations.upgrade`) instead of creating them again.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("label_config", sa.Text, nullable=False),
        sa.Column("from_name", sa.String(255), nullable=False),
        sa.Column("to_name", sa.String(255), nullable=False),
        sa.Column("image_key", sa.String(255), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("hostname", sa.String(1024)),
        sa.Column("trained_revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "tasks",
        sa.Column("project_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "annotations",
        sa.Column("project_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("annotation_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.Integer, nullable=False),
        sa.Column("result", sa.JSON, nullable=False),
        sa.Column("boxes", sa.JSON),
        sa.Column("parse_error", sa.Text),
        sa.Column("was_cancelled", sa.Boolean, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_annotations_task_id", "annotations", ["task_id"])
    op.create_index("ix_annotations_revision", "annotations", ["revision"])
    op.create_table(
        "model_versions",
        sa.Column("project_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.String(255), primary_key=True),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("n_annotations", sa.Integer, nullable=False),
        sa.Column("n_images", sa.Integer, nullable=False),
        sa.Column("annotations_revision", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("message", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("model_version", sa.String(255)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
    )
    op.create_index("ix_training_jobs_project_id", "training_jobs", ["project_id"])
    op.create_table(
        "features",
        sa.Column("project_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("extractor", sa.String(255), primary_key=True),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "orders",
        sa.Column("project_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("strategy", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("task_ids", sa.JSON, nullable=False),
        sa.Column("view_id", sa.Integer),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "box_episodes",
        sa.Column("project_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("episode", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("queries", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    for index, table in (
        ("ix_training_jobs_project_id", "training_jobs"),
        ("ix_annotations_revision", "annotations"),
        ("ix_annotations_task_id", "annotations"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "box_episodes",
        "orders",
        "features",
        "training_jobs",
        "model_versions",
        "annotations",
        "tasks",
        "projects",
    ):
        op.drop_table(table)
