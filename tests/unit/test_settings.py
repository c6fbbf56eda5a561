"""Settings that cannot be used say which file, key or variable is wrong; the CLI shows that
in one line and exits 2, never with a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.cli import main
from backend.settings import SettingsError, load_settings
from backend.training.gate import GateConfig
from backend.training.yolox_train import YoloxTrainConfig, input_shape_for


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [\n", "not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("num_threds: 4\n", "no such setting: num_threds"),
        ("num_threads: many\n", "num_threads (BOXLOOP_NUM_THREADS)"),
        ("score_threshold: 1.5\n", "score_threshold (BOXLOOP_SCORE_THRESHOLD)"),
        ("order_strategy: fastest\n", "order_strategy (BOXLOOP_ORDER_STRATEGY)"),
    ],
)
def test_a_bad_settings_file_names_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "boxloop.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(path)


def test_a_missing_file_and_a_bad_variable_are_settings_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SettingsError, match="cannot read the settings file"):
        load_settings(tmp_path / "absent.yaml")
    monkeypatch.setenv("BOXLOOP_PORT", "0")
    with pytest.raises(SettingsError, match=r"port \(BOXLOOP_PORT\)"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BOXLOOP_AUTH_TOKEN": ""}, "BOXLOOP_AUTH_TOKEN is set but empty"),
        ({"BOXLOOP_AUTH_TOKEN": "  "}, "BOXLOOP_AUTH_TOKEN is set but empty"),
        ({"BOXLOOP_BASIC_AUTH_USER": "ls"}, "needs both BOXLOOP_BASIC_AUTH_USER and"),
        ({"BOXLOOP_BASIC_AUTH_PASSWORD": "pw"}, "needs both BOXLOOP_BASIC_AUTH_USER and"),
        (
            {"BOXLOOP_BASIC_AUTH_USER": "", "BOXLOOP_BASIC_AUTH_PASSWORD": "pw"},
            "the user not empty",
        ),
        (
            {"BOXLOOP_BASIC_AUTH_USER": "ls", "BOXLOOP_BASIC_AUTH_PASSWORD": ""},
            "BOXLOOP_BASIC_AUTH_PASSWORD is set but empty",
        ),
    ],
)
def test_auth_settings_that_protect_nothing_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    """They were accepted without a word: an empty token let ``Bearer `` with nothing after
    it in, a user without a password let anyone who knew the name in, and a password without
    a user turned no check on."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_complete_auth_settings_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXLOOP_AUTH_TOKEN", "t0ken")
    monkeypatch.setenv("BOXLOOP_BASIC_AUTH_USER", "ls")
    monkeypatch.setenv("BOXLOOP_BASIC_AUTH_PASSWORD", "pw")
    settings = load_settings()
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == "t0ken"
    assert settings.basic_auth_user == "ls"


def test_the_cli_reports_bad_settings_and_refusals_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BOXLOOP_RECONCILE_ON_STARTUP", "false")
    assert main(["--settings", str(tmp_path / "absent.yaml"), "status"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("boxloop status: error: cannot read the settings file") and err[-1] == "\n"
    )
    assert err.count("\n") == 1  # one line, no traceback
    assert main(["train", "--project", "5"]) == 2
    assert capsys.readouterr().err == "boxloop train: error: project 5 is unknown to boxloop\n"
    monkeypatch.setenv("BOXLOOP_FEATURE_EXTRACTOR", "imgnet_vgg99")
    assert main(["openapi"]) == 2
    assert "BOXLOOP_FEATURE_EXTRACTOR" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BOXLOOP_GATE_VALIDATION_FRACTION": "1.5"}, "BOXLOOP_GATE_VALIDATION_FRACTION"),
        ({"BOXLOOP_GATE_VALIDATION_FRACTION": "0"}, "BOXLOOP_GATE_VALIDATION_FRACTION"),
        ({"BOXLOOP_GATE_CV_BELOW": "-3"}, "BOXLOOP_GATE_CV_BELOW"),
        ({"BOXLOOP_YOLOX_IMAGE_VISITS": "0"}, "BOXLOOP_YOLOX_IMAGE_VISITS"),
        ({"BOXLOOP_YOLOX_INPUT_AREA": "0"}, "BOXLOOP_YOLOX_INPUT_AREA"),
        (
            {"BOXLOOP_YOLOX_MIN_EPOCHS": "40"},
            r"MIN_EPOCHS \(40\) is above BOXLOOP_YOLOX_MAX_EPOCHS",
        ),
        (
            {"BOXLOOP_YOLOX_MIN_EPOCHS": "3", "BOXLOOP_YOLOX_MAX_EPOCHS": "2"},
            "is above BOXLOOP_YOLOX_MAX_EPOCHS",
        ),
    ],
)
def test_training_settings_out_of_range_stop_boxloop_at_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    message: str,
) -> None:
    """They were accepted at start, and then every training job failed on them (the gate's
    and the YOLOX trainer's configs refuse them)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(tmp_path / "data"))
    assert main(["openapi"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_training_settings_bounds_are_what_training_accepts(tmp_path: Path) -> None:
    """Every value at a bound is one the round's configs take."""
    settings = load_settings(
        data_dir=tmp_path,
        gate_validation_fraction=0.99,
        gate_cv_below=0,
        yolox_image_visits=1,
        yolox_min_epochs=5,
        yolox_max_epochs=5,
        yolox_input_area=1,
    )
    GateConfig.from_settings(settings)
    assert input_shape_for([(640, 480)], YoloxTrainConfig.from_settings(settings)) == (224, 224)


@pytest.mark.parametrize("value", ["0", "-3", "2147483648", "seven"])
def test_cli_project_ids_are_label_studio_ids(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An id past Label Studio's 32-bit range would reach PostgreSQL as a DataError."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--project", value])
    assert exit_.value.code == 2
    assert "is not a project id (1 to 2147483647)" in capsys.readouterr().err
