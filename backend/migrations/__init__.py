"""Schema migrations (Alembic), run by :class:`backend.store.Store` when it opens a database.

An upgraded boxloop must open the database an older boxloop wrote: ``Store.__init__`` calls
:func:`upgrade`, which brings any database to the newest revision on the store's own engine (no
``alembic.ini`` at run time). A database made before boxloop used Alembic (tables from
``metadata.create_all``, no ``alembic_version``) is first stamped at the revision whose tables
it has. ``backend.tables.metadata`` stays the code's description of the schema; a unit test
checks that the migrations at head produce exactly it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, Column, DateTime, Engine, Integer, MetaData, Table, inspect, text
from sqlalchemy.engine import Connection

__all__ = ["SCRIPT_LOCATION", "alembic_config", "current_revision", "head", "upgrade"]

SCRIPT_LOCATION = Path(__file__).resolve().parent

#: The tables of the first boxloop (up to a679896^), before ``box_episodes`` existed.
_ORIGINAL_TABLES = frozenset(
    {"projects", "tasks", "annotations", "model_versions", "training_jobs", "features", "orders"}
)

#: The tables each revision added, newest first: where a pre-Alembic database sits.
_PRE_ALEMBIC = (
    ("0002", frozenset({"bulk_runs", "bulk_predictions"})),
    ("0001", _ORIGINAL_TABLES | {"box_episodes"}),
)

#: PostgreSQL advisory lock held while migrating: two processes opening one fresh database at
#: once (server and training child, two replicas) migrate one after the other.
_LOCK_KEY = 0x626F786C6F6F70  # "boxloop"


def alembic_config(connection: Connection | None = None) -> Config:
    """A Config built in code: the packaged scripts, and the connection to run them on."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _script() -> ScriptDirectory:
    """The revision files, read once per process (``alembic.command`` re-reads them per call,
    which made every ``Store()`` on a fresh file some 40 ms slower)."""
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision."""
    revision = _script().get_current_head()
    assert revision is not None
    return revision


def current_revision(connection: Connection) -> str | None:
    """The revision stamped in ``alembic_version`` (``None``: new or pre-Alembic database).

    Read directly rather than through ``MigrationContext``, which logs two INFO lines each time
    it is configured: every ``Store()`` in every process would log them.
    """
    if not inspect(connection).has_table("alembic_version"):
        return None
    versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(versions) > 1:
        raise RuntimeError(f"alembic_version holds several heads {versions}; boxloop has one")
    return versions[0] if versions else None


def pre_alembic_revision(tables: set[str]) -> str | None:
    """The revision a database without ``alembic_version`` is at, judged by its tables.

    One made before ``box_episodes`` existed (the seven original tables only) counts as
    ``0001``: :func:`upgrade` adds that table before it stamps the database there.
    """
    if tables >= _ORIGINAL_TABLES:
        tables = tables | {"box_episodes"}
    for revision, added in _PRE_ALEMBIC:
        if added <= tables:
            return revision
    return None


def _create_box_episodes(conn: Connection) -> None:
    """The ``box_episodes`` table as revision ``0001`` creates it, for a pre-Alembic database
    made before it existed (stamped at ``0001``, it would never be created otherwise)."""
    table = Table(
        "box_episodes",
        MetaData(),
        Column("project_id", Integer, primary_key=True, autoincrement=False),
        Column("episode", Integer, primary_key=True, autoincrement=False),
        Column("params", JSON, nullable=False),
        Column("queries", JSON, nullable=False),
        Column("created_at", DateTime, nullable=False),
        Column("updated_at", DateTime, nullable=False),
    )
    table.create(conn)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database behind ``engine`` to ``revision`` in one transaction.

    Already there (every open but the first) costs one small query. A brand-new database runs
    every revision; a pre-Alembic one is stamped first so its tables are not created again.
    This is what ``alembic upgrade`` does through ``env.py``, run here on the cached scripts.

    Processes opening one database at once migrate one after the other: PostgreSQL under an
    advisory lock, SQLite with its write lock taken up front (``BEGIN IMMEDIATE``). Without it
    SQLite ran each DDL statement in a transaction of its own, and two processes opening a new
    file both ran ``0001``: one failed with "table ... already exists".
    """
    from backend.tables import metadata

    script = _script()
    target = head() if revision == "head" else revision
    with engine.connect() as conn:  # every open but the first: one small query and no lock
        if current_revision(conn) == target:
            return
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        current = current_revision(conn)
        if current == target:  # another process migrated it while this one waited
            return
        if current is None:
            tables = set(inspect(conn).get_table_names())
            stamp = pre_alembic_revision(tables)
            if stamp is not None:
                if "box_episodes" not in tables:
                    _create_box_episodes(conn)
                MigrationContext.configure(conn).stamp(script, stamp)

        def steps(rev: Any, _context: MigrationContext) -> Any:
            return script._upgrade_revs(revision, rev)

        with EnvironmentContext(
            alembic_config(conn), script, fn=steps, destination_rev=revision
        ) as environment:
            environment.configure(
                connection=conn,
                target_metadata=metadata,
                render_as_batch=conn.dialect.name == "sqlite",
            )
            with environment.begin_transaction():
                environment.run_migrations()
