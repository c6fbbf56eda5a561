"""Bulk pre-annotation: the ``bulk_runs`` table and the ``bulk_predictions`` ledger.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulk_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.Integer, nullable=False),
        sa.Column("model_version", sa.String(255), nullable=False),
        sa.Column("engine", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("message", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
    )
    op.create_index("ix_bulk_runs_project_id", "bulk_runs", ["project_id"])
    op.create_table(
        "bulk_predictions",
        sa.Column("project_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("task_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("model_version", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("run_id", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("bulk_predictions")
    op.drop_index("ix_bulk_runs_project_id", table_name="bulk_runs")
    op.drop_table("bulk_runs")
