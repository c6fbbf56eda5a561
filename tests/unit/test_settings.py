"""Settings that cannot be used say which file, key or variable is wrong; the CLI shows that
in one line and exits 2, never with a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backend.cli import main
from backend.settings import SettingsError, load_settings
from backend.training.gate import GateConfig
from backend.training.yolox_train import YoloxTrainConfig, input_shape_for
from tests.conftest import REPO, serve_app


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


# --- empty variables, log level, database URL ------------------------------------------------


def test_an_empty_variable_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``VAR=`` in an env file or ``${VAR:-}`` in compose: a path was ".", which hid the fetched
    model (onnx_model_path) or turned utility on (utility_model); an int or bool failed."""
    for name in (
        "ONNX_MODEL_PATH", "UTILITY_MODEL", "PORT", "RECONCILE_ON_STARTUP",
        "ALLOWED_LOCAL_ROOTS", "LOG_LEVEL", "DATABASE_URL", "MODEL_URL", "MODEL_SHA256",
    ):  # fmt: skip
        monkeypatch.setenv(f"BOXLOOP_{name}", "")
    settings = load_settings(data_dir=tmp_path)
    assert settings.onnx_model_path is None and settings.utility_model is None
    assert settings.port == 9090 and settings.reconcile_on_startup is True
    assert settings.allowed_local_roots == [] and settings.log_level == "INFO"
    assert settings.database_url is None and settings.model_sha256 is None
    fetched = settings.fetched_onnx_model_path
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(b"onnx")
    assert settings.resolved_onnx_model_path == fetched


def test_an_empty_variable_leaves_the_settings_file_its_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "boxloop.yaml"
    path.write_text("port: 8001\nscore_threshold: 0.4\n")
    monkeypatch.setenv("BOXLOOP_PORT", "")
    monkeypatch.setenv("BOXLOOP_SCORE_THRESHOLD", "0.5")
    settings = load_settings(path)
    assert settings.port == 8001 and settings.score_threshold == 0.5


@pytest.mark.parametrize(("value", "level"), [("debug", "DEBUG"), (" Warning ", "WARNING")])
def test_log_levels_are_read_in_any_case(
    monkeypatch: pytest.MonkeyPatch, value: str, level: str
) -> None:
    monkeypatch.setenv("BOXLOOP_LOG_LEVEL", value)
    assert load_settings().log_level == level


@pytest.mark.parametrize("value", ["verbose", "warn", "trace", "fatal", "notset"])
def test_a_log_level_only_one_of_logging_and_uvicorn_knows_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("BOXLOOP_LOG_LEVEL", value)
    with pytest.raises(SettingsError, match=r"log_level \(BOXLOOP_LOG_LEVEL\).*no log level"):
        load_settings()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////srv/boxloop.db",
        "postgresql://boxloop:pw@db/boxloop",
        "postgresql+psycopg://boxloop@/boxloop?host=/run/postgresql",
    ],
)
def test_database_urls_of_sqlite_and_postgresql_are_taken(url: str) -> None:
    assert load_settings(database_url=url).resolved_database_url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("garbage", "not an SQLAlchemy URL"),
        ("postgres://u@h/x", "write postgresql://"),
        ("mysql://u@h/x", "'mysql' is not supported"),
        ("postgresql+nodriver://u@h/x", "unknown driver"),
        ("postgresql+psycopg2://u@h/x", "is not installed (psycopg2)"),
    ],
)
def test_a_database_url_boxloop_cannot_use_is_refused(url: str, message: str) -> None:
    with pytest.raises(SettingsError, match=r"database_url \(BOXLOOP_DATABASE_URL\)") as refused:
        load_settings(database_url=url)
    assert message in str(refused.value)


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(SettingsError, match=r"BOXLOOP_DATA_DIR.*is a file, not a directory"):
        load_settings(data_dir=tmp_path / "afile")


# --- scripts/serve.sh and the Docker image read the settings as boxloop does ------------------

_RESOLVED = """\
import argparse, json, sys
if sys.argv[1] == "models":
    sys.exit(0)
from backend.settings import load_settings
parser = argparse.ArgumentParser()  # `boxloop serve`'s options
parser.add_argument("command")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args = parser.parse_args(sys.argv[1:])
given = {k: getattr(args, k) for k in ("host", "port") if getattr(args, k)}
s = load_settings(**given)
print(json.dumps({"argv": sys.argv[1:], "host": s.host, "port": s.port,
                  "data_dir": str(s.data_dir), "onnx": str(s.onnx_model_path)}))
"""


def _serve_sh(tmp_path: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run the real scripts/serve.sh in a copy of the repo whose setup.sh does nothing and whose
    ``boxloop`` prints the settings ``boxloop serve`` would start with."""
    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "scripts").mkdir(parents=True)
        shutil.copy(REPO / "scripts" / "serve.sh", repo / "scripts" / "serve.sh")
        (repo / "scripts" / "setup.sh").write_text("#!/bin/sh\nexit 0\n")
        (repo / "scripts" / "setup.sh").chmod(0o755)
        (repo / ".venv" / "bin").mkdir(parents=True)
        (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
        boxloop = repo / ".venv" / "bin" / "boxloop"
        boxloop.write_text(f"#!{sys.executable}\n{_RESOLVED}")
        boxloop.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BOXLOOP_")}
    clean.update(PYTHONPATH=str(REPO), BOXLOOP_SHARED_DATA=str(tmp_path / "no-shared"), **env)
    proc = subprocess.run(
        ["bash", str(repo / "scripts" / "serve.sh"), *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_serve_sh_takes_host_port_and_data_dir_from_the_config_file(tmp_path: Path) -> None:
    """serve.sh passed ``--host 0.0.0.0 --port 9090`` and exported a data dir whatever the
    BOXLOOP_CONFIG file said."""
    config = tmp_path / "boxloop.yaml"
    config.write_text(
        "host: 127.0.0.1\nport: 8001\ndata_dir: /srv/boxloop-data\nonnx_model_path: /m/y.onnx\n"
    )
    (tmp_path / "no-shared" / "models" / "yolox_nano_coco").mkdir(parents=True)
    (tmp_path / "no-shared" / "models" / "yolox_nano_coco" / "yolox_nano.onnx").write_bytes(b"")
    assert _serve_sh(tmp_path, {"BOXLOOP_CONFIG": str(config)}) == {
        "argv": ["serve"],
        "host": "127.0.0.1",
        "port": 8001,
        "data_dir": "/srv/boxloop-data",
        "onnx": "/m/y.onnx",
    }
    # variables win over the file, an empty one counts as unset, and arguments win over both
    env = {"BOXLOOP_CONFIG": str(config), "BOXLOOP_PORT": "7000", "BOXLOOP_HOST": ""}
    resolved = _serve_sh(tmp_path, env, "--host", "::1")
    assert (resolved["host"], resolved["port"]) == ("::1", 7000)
    assert resolved["data_dir"] == "/srv/boxloop-data"


def test_serve_sh_keeps_its_defaults_when_nothing_sets_them(tmp_path: Path) -> None:
    resolved = _serve_sh(tmp_path, {"BOXLOOP_PORT": ""})
    assert (resolved["host"], resolved["port"]) == ("0.0.0.0", 9090)
    assert resolved["data_dir"] == str(tmp_path / "repo" / "var" / "boxloop")


def _dockerfile_script(name: str) -> str:
    """The file docker/Dockerfile writes to /usr/local/bin/<name> (a ``COPY <<"EOF"`` heredoc)."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    match = re.search(rf'^COPY [^\n]*<<"EOF" /usr/local/bin/{name}\n(.*?)^EOF$', text, re.S | re.M)
    assert match is not None, f"docker/Dockerfile writes no /usr/local/bin/{name}"
    assert f'"{name}"' in text  # and uses it
    return match.group(1)


def test_the_docker_health_probe_sends_the_configured_credentials(tmp_path: Path) -> None:
    """With auth on, /health needs credentials like every route: the image's probe sent none, so
    the container was never healthy."""
    probe = tmp_path / "boxloop-healthcheck"
    probe.write_text(_dockerfile_script("boxloop-healthcheck"))
    settings = load_settings(
        data_dir=tmp_path / "data",
        reconcile_on_startup=False,
        auth_token="t0ken",
        basic_auth_user="ls",
        basic_auth_password="pässword",
    )
    with serve_app(settings) as port:
        base = {k: v for k, v in os.environ.items() if not k.startswith("BOXLOOP_")}
        base.update(PYTHONPATH=str(REPO), BOXLOOP_PORT=str(port))

        def probe_with(**env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, str(probe)],
                env={**base, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )

        assert probe_with(BOXLOOP_AUTH_TOKEN="t0ken").returncode == 0
        basic = probe_with(BOXLOOP_BASIC_AUTH_USER="ls", BOXLOOP_BASIC_AUTH_PASSWORD="pässword")
        assert basic.returncode == 0, basic.stderr
        refused = probe_with()  # the server keeps its auth: no credentials, no health
        assert refused.returncode == 1 and "401" in refused.stderr
        assert probe_with(BOXLOOP_AUTH_TOKEN="wrong").returncode == 1
