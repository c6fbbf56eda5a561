"""``python -m backend.migrations [URL]``: the database's schema revision and the code's head.

Without a URL it reads the one the server would use (``BOXLOOP_DATABASE_URL``,
``BOXLOOP_CONFIG``, or the SQLite file in the data dir). Read-only: the server migrates by itself when it starts.
"""

from __future__ import annotations

import sys

from sqlalchemy import create_engine

from backend.migrations import current_revision, head


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        url = args[0]
    else:
        from backend.settings import load_settings

        url = load_settings().resolved_database_url
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            current = current_revision(conn)
    finally:
        engine.dispose()
    print(f"database: {engine.url.render_as_string(hide_password=True)}")
    print(f"current:  {current or 'none (new, or made before migrations: stamped on next start)'}")
    print(f"head:     {head()}")
    return 0 if current == head() else 1


if __name__ == "__main__":
    raise SystemExit(main())
