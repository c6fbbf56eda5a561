from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("BOXLOOP_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_app(settings: Settings) -> Iterator[int]:
    """boxloop's app on a free port of 127.0.0.1, in a thread of this process; yields the port
    once uvicorn has started, and stops it after."""
    import uvicorn

    from backend.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set BOXLOOP_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def onnx_path(shared_data: Path) -> Path:
    """The shared COCO YOLOX-Nano ONNX file (skips when absent)."""
    path = shared_data / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not path.is_file():
        pytest.skip(f"YOLOX ONNX model not found at {path} (set BOXLOOP_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One real PostgreSQL server (``pgserver``) for the test session, started by the first test
    that asks for it; its SQLAlchemy admin URL.

    The docs promise PostgreSQL works, so a server that cannot start is a failure, not a skip
    (the README's test command installs pgserver), unless ``BOXLOOP_SKIP_POSTGRES=1``. The data
    directory is short and outside ``tmp_path``: the server's Unix socket lives in it and socket
    paths are limited to about 100 characters.
    """
    if os.environ.get("BOXLOOP_SKIP_POSTGRES") == "1":
        pytest.skip("BOXLOOP_SKIP_POSTGRES=1: PostgreSQL tests skipped")
    directory = Path(tempfile.mkdtemp(prefix="boxloop-pg-"))
    try:
        with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset in containers
            warnings.simplefilter("ignore")
            import pgserver

            server = pgserver.get_server(directory, cleanup_mode="stop")
    except Exception as exc:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(
            f"could not start PostgreSQL for the tests ({type(exc).__name__}: {exc}); install "
            "the dev extra (pip install -e '.[dev]', which brings pgserver and psycopg) or set "
            "BOXLOOP_SKIP_POSTGRES=1 to skip the PostgreSQL variants",
            pytrace=False,
        )
    try:
        yield _sqlalchemy_url(server.get_uri(), database="postgres")
    finally:
        server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


def _sqlalchemy_url(uri: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(uri).set(drivername="postgresql+psycopg", database=database)
    return url.render_as_string(hide_password=False)


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A fresh, empty database on the server at ``server_url``, dropped afterwards (with any
    connections left open); its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    name = f"boxloop_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield _sqlalchemy_url(server_url, database=name)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    with fresh_postgres_database(postgres_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for a store test, once on SQLite (a file in ``tmp_path``) and once on a
    fresh PostgreSQL database; the server only starts when a PostgreSQL variant runs."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))
