"""A settings file given to the server reaches the training child process: the child trains
with the server's own Settings object, so training and serving agree on sizes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from backend.jobs import TrainingScheduler
from backend.settings import Settings, load_settings, settings_from_json, settings_to_json
from backend.store import Store


def test_settings_survive_the_json_hand_over_secrets_included(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BOXLOOP_TRAIN_EPOCHS", "7")
    settings = Settings(
        data_dir=tmp_path,
        auth_token="s3cret",
        label_studio_token="tok",
        allowed_local_roots=[tmp_path / "a"],
        allowed_image_hosts=["ls:8080"],
        detector_min_size=320,
    )
    text = settings_to_json(settings, label_studio_url="http://ls:8080")
    monkeypatch.setenv("BOXLOOP_DETECTOR_MIN_SIZE", "999")  # the child's environment is ignored
    back = settings_from_json(text)
    assert back.detector_min_size == 320 and back.train_epochs == 7
    assert back.auth_token is not None and back.auth_token.get_secret_value() == "s3cret"
    assert back.label_studio_token is not None
    assert back.label_studio_token.get_secret_value() == "tok"
    assert back.label_studio_url == "http://ls:8080"
    assert back.allowed_local_roots == [tmp_path / "a"]
    assert back.allowed_image_hosts == ["ls:8080"]
    assert {k: v for k, v in back if k != "label_studio_url"} == {
        k: v for k, v in settings if k != "label_studio_url"
    }


def test_a_settings_file_value_reaches_the_training_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in list(os.environ):
        if key.startswith("BOXLOOP_"):
            monkeypatch.delenv(key)
    settings_file = tmp_path / "boxloop.yaml"
    settings_file.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        "detector_min_size: 320\ndetector_max_size: 480\ntrain_epochs: 3\nnum_threads: 1\n"
    )
    settings = load_settings(settings_file)  # what `boxloop --settings FILE serve` builds
    settings.data_dir.mkdir(parents=True)
    store = Store(settings.resolved_database_url)
    job_id = store.create_job(424242, "test")  # no such project: the child fails right after

    def extra_env(_project: int) -> dict[str, str]:
        return {"BOXLOOP_LABEL_STUDIO_TOKEN": "from-setup"}

    scheduler = TrainingScheduler(settings, store, on_success=lambda *_: None, extra_env=extra_env)
    assert store.claim_job(job_id, scheduler.owner)  # as the server's loop does
    scheduler._run(job_id)

    log_text = (settings.data_dir / "logs" / f"job-{job_id}.log").read_text()
    settings_line = next(line for line in log_text.splitlines() if "settings:" in line)
    assert "detector_min_size=320" in settings_line, log_text[-2000:]
    assert "detector_max_size=480" in settings_line
    assert "train_epochs=3" in settings_line
    job = store.get_job(job_id)
    assert job is not None and job.status == "failed"
    assert "424242" in (job.error or "")
    # the hand-over file held secrets: it is gone once the child ends
    assert not list((settings.data_dir / "logs").glob("*.settings.json"))


def test_the_hand_over_file_is_private(tmp_path: Path) -> None:
    from backend.jobs import write_private

    path = tmp_path / "x.json"
    write_private(path, json.dumps({"a": 1}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
