"""A project's label-config names and hostname as TEXT: no length Label Studio does not impose.

Label Studio sets no limit on a control's ``name``, an ``<Image>``'s ``value`` key or its own
URL, and SQLite never enforced the old ``VARCHAR(255)`` / ``VARCHAR(1024)``; PostgreSQL did, and
answered a longer one with a 500 from ``/setup`` or the first webhook. SQLite rebuilds the
table (batch mode); PostgreSQL alters the columns in place.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: (column, its old type)
COLUMNS = (
    ("from_name", sa.String(255)),
    ("to_name", sa.String(255)),
    ("image_key", sa.String(255)),
    ("hostname", sa.String(1024)),
)


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        for name, old in COLUMNS:
            batch.alter_column(name, type_=sa.Text, existing_type=old)


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        for name, old in COLUMNS:
            batch.alter_column(name, type_=old, existing_type=sa.Text)
