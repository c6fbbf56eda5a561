"""`boxloop predict` and `boxloop box-queries` flags: bad values exit 2 with the field named,
refusals exit 1 with the reason, both before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.cli import main


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("BOXLOOP_LABEL_STUDIO_URL", "BOXLOOP_LABEL_STUDIO_TOKEN", "BOXLOOP_RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BOXLOOP_RECONCILE_ON_STARTUP", "false")


def test_bad_flags_name_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--project", "3", "--push-batch", "0"]) == 2
    assert "push_batch" in capsys.readouterr().err
    assert main(["predict", "--project", "3", "--limit", str(2**63)]) == 2  # the run failed
    assert "limit" in capsys.readouterr().err
    assert main(["box-queries", "--project", "3", "--k", "0"]) == 2
    assert "k:" in capsys.readouterr().err


def test_refusals_say_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--project", "3"]) == 1
    assert "project 3 is unknown to boxloop" in capsys.readouterr().err
