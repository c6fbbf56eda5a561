"""Schema migrations: an upgraded boxloop opens the database an older one wrote (SQLite and
PostgreSQL), and the migrations at head build exactly the schema the code describes."""

from __future__ import annotations

import multiprocessing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, create_engine, inspect

from backend import migrations
from backend.store import Store
from backend.tables import annotations_table, metadata, model_versions, projects

BULK_TABLES = {"bulk_runs", "bulk_predictions"}
#: The tables boxloop versions made before migrations lacked, by commit.
OLD_VERSIONS = {
    "as-of-a679896^": frozenset(BULK_TABLES | {"box_episodes"}),
    "as-of-8c04528": frozenset(BULK_TABLES),
    "as-of-bd1b1c1": frozenset(),
}
#: columns later revisions added to tables that existed before migrations (0004: job owners)
ADDED_LATER = {"training_jobs": ("owner", "heartbeat_at")}
OLD_RESULT = [{"type": "rectanglelabels", "value": {"x": 1.5, "rectanglelabels": ["a"]}}]


def _schema_differences(engine: Engine) -> list:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return migrations.current_revision(conn)


def _old_create_all(engine: Engine, *, missing: frozenset[str]) -> None:
    """What boxloop did before migrations: ``create_all`` of its tables, no ``alembic_version``
    (without the ``missing`` ones: see :data:`OLD_VERSIONS`)."""
    old = MetaData()
    for table in metadata.sorted_tables:
        if table.name not in missing:
            copy = table.to_metadata(old)
            for name in ADDED_LATER.get(table.name, ()):
                copy._columns.remove(copy.c[name])  # no public API removes a column
    old.create_all(engine)


def _write_old_rows(engine: Engine) -> None:
    """A project, an annotation and a model version, written the way an older boxloop did."""
    when = datetime(2026, 1, 2, 3, 4, 5)
    with engine.begin() as conn:
        conn.execute(
            projects.insert().values(
                id=7,
                label_config="<View/>",
                from_name="label",
                to_name="image",
                image_key="image",
                labels=["a", "b"],
                hostname="http://ls",
                trained_revision=1,
                created_at=when,
                updated_at=when,
            )
        )
        conn.execute(
            annotations_table.insert().values(
                project_id=7,
                annotation_id=70,
                task_id=700,
                result=OLD_RESULT,
                boxes=None,
                was_cancelled=False,
                deleted=False,
                revision=1,
                source="webhook",
                updated_at=when,
            )
        )
        conn.execute(
            model_versions.insert().values(
                project_id=7,
                version="project-7-v1",
                path="/models/project-7/v1",
                labels=["a", "b"],
                n_annotations=1,
                n_images=1,
                annotations_revision=1,
                metrics={"status": "promoted"},
                created_at=when,
            )
        )


def _open_and_check(url: str) -> None:
    """Open the old database with today's Store: old rows intact, new tables usable."""
    store = Store(url)
    try:
        assert _revision(store.engine) == migrations.head()
        assert _schema_differences(store.engine) == []
        project = store.get_project(7)
        assert project is not None and project.labels == ["a", "b"]
        assert project.hostname == "http://ls" and project.trained_revision == 1
        (annotation,) = store.list_annotations(7)
        assert (annotation.annotation_id, annotation.task_id) == (70, 700)
        assert annotation.result == OLD_RESULT and annotation.revision == 1
        (version,) = store.list_model_versions(7)
        assert version.version == "project-7-v1" and version.metrics == {"status": "promoted"}
        assert version.created_at == datetime(2026, 1, 2, 3, 4, 5)
        # the revision counter continues after the old rows
        revision, changed = store.upsert_annotation(7, 71, 701, [], None)
        assert changed and revision == 2
        # the tables 0002 added work
        run = store.create_bulk_run(7, "project-7-v1", "local")
        store.mark_bulk(7, "project-7-v1", {700: "pushing", 701: "pushing"}, run)
        store.mark_bulk(7, "project-7-v1", {700: "done"}, run)
        assert store.bulk_states(7, "project-7-v1") == {700: "done", 701: "pushing"}
        assert [r.id for r in store.list_bulk_runs(7)] == [run]
        # and so does box_episodes, whichever boxloop made the database
        assert store.add_box_episode(7, {"k": 1}, []) == 1
        assert store.list_box_episodes(7) == [(1, {"k": 1}, [])]
    finally:
        store.close()


def test_a_new_database_is_migrated_to_exactly_the_code_schema(store_url: str) -> None:
    store = Store(store_url)
    try:
        assert _revision(store.engine) == migrations.head() == "0004"
        assert _schema_differences(store.engine) == []
        names = set(inspect(store.engine).get_table_names())
        assert names == set(metadata.tables) | {"alembic_version"}
    finally:
        store.close()
    Store(store_url).close()  # reopening at head changes nothing


def test_a_database_at_the_baseline_revision_is_upgraded_with_its_rows(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        migrations.upgrade(engine, "0001")
        assert _revision(engine) == "0001"
        assert not BULK_TABLES & set(inspect(engine).get_table_names())
        _write_old_rows(engine)
    finally:
        engine.dispose()
    _open_and_check(store_url)


@pytest.mark.parametrize("missing", OLD_VERSIONS.values(), ids=OLD_VERSIONS.keys())
def test_a_database_made_before_migrations_is_stamped_and_upgraded(
    store_url: str, missing: frozenset[str]
) -> None:
    """No ``alembic_version`` table: it is stamped at the revision whose tables it has (creating
    them again would fail), then upgraded. One made before ``box_episodes`` existed gets that
    table first: it was not recognised, and ``Store()`` failed at every start."""
    engine = create_engine(store_url)
    try:
        _old_create_all(engine, missing=missing)
        assert "alembic_version" not in inspect(engine).get_table_names()
        _write_old_rows(engine)
    finally:
        engine.dispose()
    _open_and_check(store_url)


def test_pre_alembic_databases_are_placed_by_their_tables() -> None:
    baseline = {"projects", "tasks", "annotations", "model_versions", "training_jobs"}
    baseline |= {"features", "orders", "box_episodes"}
    assert migrations.pre_alembic_revision(set()) is None  # brand new: straight to head
    assert migrations.pre_alembic_revision(baseline) == "0001"
    assert migrations.pre_alembic_revision(baseline - {"box_episodes"}) == "0001"
    assert migrations.pre_alembic_revision(baseline - {"box_episodes", "orders"}) is None
    assert migrations.pre_alembic_revision(baseline | BULK_TABLES) == "0002"


def test_alembic_commands_run_on_the_packaged_scripts(store_url: str) -> None:
    """The docs send users to ``alembic.command`` with ``alembic_config(connection)``: that goes
    through ``env.py``, so downgrading a database and opening it again must work."""
    from alembic import command

    Store(store_url).close()
    engine = create_engine(store_url)
    try:
        with engine.begin() as conn:
            command.downgrade(migrations.alembic_config(conn), "0001")
        assert _revision(engine) == "0001"
        assert not BULK_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    store = Store(store_url)  # and up again on the next start
    try:
        assert _revision(store.engine) == migrations.head()
        assert store.create_bulk_run(1, "v", "local") == 1
    finally:
        store.close()


def test_label_config_names_of_any_length_are_stored_after_0003(store_url: str) -> None:
    """Label Studio puts no limit on a control's name or an image key. Before 0003 PostgreSQL
    refused one over 255 characters (a 500 from /setup); a database at 0002 with a project
    in it is upgraded in place, and the project survives."""
    from alembic import command

    store = Store(store_url)
    try:
        store.upsert_project(
            7, label_config="<View/>", from_name="label", to_name="image", image_key="image",
            labels=["a"], hostname="http://ls",
        )  # fmt: skip
    finally:
        store.close()
    engine = create_engine(store_url)
    try:
        with engine.begin() as conn:
            command.downgrade(migrations.alembic_config(conn), "0002")
        assert _revision(engine) == "0002"
    finally:
        engine.dispose()
    store = Store(store_url)  # upgrades to head
    try:
        assert _revision(store.engine) == migrations.head()
        kept = store.get_project(7)
        assert kept is not None and (kept.from_name, kept.hostname) == ("label", "http://ls")
        long_name, long_host = "n" * 300, "http://" + "h" * 2000
        store.upsert_project(
            8, label_config="<View/>", from_name=long_name, to_name=long_name + "i",
            image_key="k" * 300, labels=["a"], hostname=long_host,
        )  # fmt: skip
        stored = store.get_project(8)
        assert stored is not None and stored.from_name == long_name
        assert stored.image_key == "k" * 300 and stored.hostname == long_host
    finally:
        store.close()


def _open_each_when_told(urls: list[str], barrier: Any, outcomes: Any) -> None:
    """A process opening the store at each of ``urls`` at the same moment as another one."""
    for url in urls:
        barrier.wait(timeout=120)
        try:
            Store(url).close()
            outcomes.put((url, "ok"))
        except Exception as exc:  # pragma: no cover - the failure is what we look for
            outcomes.put((url, f"{type(exc).__name__}: {exc}"))


def test_processes_opening_a_new_sqlite_file_at_once_migrate_one_after_the_other(
    tmp_path: Path,
) -> None:
    """A server and a ``boxloop`` command (or two workers) opening one new SQLite file at once:
    SQLite ran each DDL statement on its own, so both ran ``0001`` and one failed with "table
    ... already exists". The write lock taken first orders them, as PostgreSQL's advisory lock
    does there. Two processes, started once, open six new files together, one at a time."""
    urls = [f"sqlite:///{tmp_path / f'state-{trial}.db'}" for trial in range(6)]
    # forked: they start with everything imported (a spawned one took seconds to import it)
    context = multiprocessing.get_context("fork")
    barrier, outcomes = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_open_each_when_told, args=(urls, barrier, outcomes))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    try:
        results = [outcomes.get(timeout=180) for _ in range(2 * len(urls))]
    finally:
        for process in processes:
            process.join(timeout=60)
    assert [outcome for _, outcome in results] == ["ok"] * len(results), results
    for url in urls:
        engine = create_engine(url)
        try:
            assert _revision(engine) == migrations.head()
            assert _schema_differences(engine) == []
        finally:
            engine.dispose()
