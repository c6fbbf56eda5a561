"""Alembic environment: always run on the connection the caller hands over.

:func:`backend.migrations.upgrade` (called by ``Store.__init__``) puts its open connection in
``config.attributes["connection"]``, so migrations run inside the store's own transaction and
no ``alembic.ini`` or URL is needed at run time.
"""

from __future__ import annotations

from alembic import context

from backend.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only the programmatic entry point is supported
    raise RuntimeError(
        "boxloop migrations run through backend.migrations.upgrade(engine), which passes a "
        "connection; there is no alembic.ini URL to fall back on"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
)
with context.begin_transaction():
    context.run_migrations()
