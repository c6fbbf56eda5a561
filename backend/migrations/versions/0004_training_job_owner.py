"""Training jobs name the server that runs them, and that server's last heartbeat.

Several servers may share one PostgreSQL database. Before 0004 nothing said which server ran a
job: each server's start marked every ``running`` job ``interrupted`` (its neighbour's
included), and two servers could both start the same queued job. Now a server claims a queued
job in one conditional UPDATE, writes a heartbeat while the job runs, and treats a running job as
abandoned only when its owner is a dead process on this host or its heartbeat has gone stale.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(255), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner")
