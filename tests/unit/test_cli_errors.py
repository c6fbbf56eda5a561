"""What the environment can get wrong ends ``boxloop`` with one line and an exit code, never a
traceback: a database URL, log level, data dir or utility model it cannot use, a database it
cannot reach, an output path or model directory it cannot write, and a sketch folder that lacks
files its category map names."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.cli import main
from backend.errors import ServiceError
from backend.search_service import sketch_files
from backend.store import Store
from tests.conftest import free_port


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    for key in ("BOXLOOP_CONFIG", "BOXLOOP_DATABASE_URL", "BOXLOOP_UTILITY_MODEL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(data))
    monkeypatch.setenv("BOXLOOP_RECONCILE_ON_STARTUP", "false")
    return data


def _one_line(err: str, command: str) -> str:
    """The error line, after checking it is the only output and names the command."""
    assert err.startswith(f"boxloop {command}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("garbage", "not an SQLAlchemy URL"),
        ("postgres://u:p@127.0.0.1:1/x", "write postgresql://"),
        ("mysql://u@127.0.0.1/x", "SQLite or PostgreSQL"),
        ("sqlite+nodriver:///x.db", "unknown driver"),
    ],
)
def test_a_database_url_boxloop_cannot_use_is_named(
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    message: str,
) -> None:
    """It was an ArgumentError or NoSuchModuleError traceback when the store opened."""
    monkeypatch.setenv("BOXLOOP_DATABASE_URL", url)
    assert main(["status"]) == 2
    err = _one_line(capsys.readouterr().err, "status")
    assert "BOXLOOP_DATABASE_URL" in err and message in err


def test_an_unreachable_database_is_one_line(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "BOXLOOP_DATABASE_URL", f"postgresql+psycopg://u:secret@127.0.0.1:{free_port()}/x"
    )
    assert main(["status"]) == 2
    err = _one_line(capsys.readouterr().err, "status")
    assert "cannot use the database" in err and "secret" not in err


def test_a_data_dir_that_is_a_file_or_under_one_is_one_line(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = data_dir.parent / "afile"
    a_file.write_text("")
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(a_file))
    assert main(["status"]) == 2
    err = _one_line(capsys.readouterr().err, "status")
    assert "BOXLOOP_DATA_DIR" in err and "is a file, not a directory" in err
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(a_file / "below"))
    assert main(["status"]) == 2
    err = _one_line(capsys.readouterr().err, "status")
    assert "Not a directory" in err and str(a_file) in err


@pytest.mark.parametrize("level", ["verbose", "warn", "trace"])
def test_a_log_level_logging_or_uvicorn_lacks_stops_serve_in_one_line(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], level: str
) -> None:
    """``verbose`` crashed logging, ``warn`` uvicorn and ``trace`` logging, with a traceback."""
    monkeypatch.setenv("BOXLOOP_LOG_LEVEL", level)
    assert main(["serve", "--port", str(free_port())]) == 2
    err = _one_line(capsys.readouterr().err, "serve")
    assert "BOXLOOP_LOG_LEVEL" in err and repr(level) in err


def test_a_utility_model_that_is_missing_or_no_onnx_is_named(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/utility.md: a missing file stops the server at start with its path (it was a
    FileNotFoundError traceback; a file that is no ONNX model, an InvalidProtobuf one)."""
    missing = data_dir.parent / "models" / "utility.onnx"
    monkeypatch.setenv("BOXLOOP_UTILITY_MODEL", str(missing))
    assert main(["status"]) == 2
    err = _one_line(capsys.readouterr().err, "status")
    assert "BOXLOOP_UTILITY_MODEL" in err and str(missing) in err and "no file" in err

    not_onnx = data_dir.parent / "utility.onnx"
    not_onnx.write_text("not a model\n")
    monkeypatch.setenv("BOXLOOP_UTILITY_MODEL", str(not_onnx))
    assert main(["status"]) == 2
    err = _one_line(capsys.readouterr().err, "status")
    assert "BOXLOOP_UTILITY_MODEL" in err and "does not load as a utility predictor" in err


def test_an_empty_utility_model_variable_leaves_utility_off(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``BOXLOOP_UTILITY_MODEL=`` was the path "." and failed every command."""
    monkeypatch.setenv("BOXLOOP_UTILITY_MODEL", "")
    assert main(["status"]) == 0
    assert capsys.readouterr().err == ""


def test_an_openapi_output_that_cannot_be_written_is_one_line(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = data_dir.parent / "no" / "such" / "dir" / "spec.json"
    assert main(["openapi", "-o", str(target)]) == 2
    err = _one_line(capsys.readouterr().err, "openapi")
    assert "No such file or directory" in err and str(target) in err


def test_a_model_fetch_into_a_data_dir_under_a_file_is_a_fetch_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a NotADirectoryError traceback: only ModelFetchError was caught."""
    a_file = data_dir.parent / "afile"
    a_file.write_text("")
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(a_file / "data"))
    assert main(["models", "fetch", "--quiet", "--url", str(data_dir.parent / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("boxloop models fetch: error: cannot install the model into "), err
    assert "Not a directory" in err and "nothing was installed" in err
    assert a_file.read_text() == ""


def _partial_sketch_folder(root: Path) -> Path:
    """A category map naming three files of which only ``dog``'s is there."""
    (root / "quickdraw").mkdir(parents=True)
    (root / "quickdraw" / "dog.ndjson").write_text(
        '{"word": "dog", "drawing": [[[0, 10, 20], [0, 10, 0]]]}\n'
    )
    (root / "category_map.tsv").write_text(
        "source\tsketch_category\tfile\tvoc_class\tcoco_class\n"
        "quickdraw\tdog\tquickdraw/dog.ndjson\tdog\tdog\n"
        "quickdraw\tcat\tquickdraw/cat.ndjson\tcat\tcat\n"
        "quickdraw\tcow\tquickdraw/cow.ndjson\tcow\tcow\n"
        "quickdraw\tbus\tquickdraw/bus.ndjson\tbus\tbus\n"
    )
    return root


def test_sketch_files_lists_every_missing_file_of_the_project_labels(tmp_path: Path) -> None:
    folder = _partial_sketch_folder(tmp_path / "sketches")
    with pytest.raises(ServiceError) as refused:
        sketch_files(folder, ["dog", "cat", "cow"], column="coco_class")
    assert refused.value.status_code == 422
    message = refused.value.message
    assert "quickdraw/cat.ndjson (cat)" in message and "quickdraw/cow.ndjson (cow)" in message
    assert "bus.ndjson" not in message  # not a label of the project
    found = sketch_files(folder, ["dog", "bus"], column=None)  # no map: by file name only
    assert {p.name: label for p, label in found.items()} == {"dog.ndjson": "dog"}


def test_search_train_names_missing_sketch_files_before_reading_images(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a FileNotFoundError traceback, after the pass over every annotated image. Here the
    project has no annotation at all: the sketch files are checked first."""
    data_dir.mkdir()
    store = Store(f"sqlite:///{data_dir / 'boxloop.db'}")
    config = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" '
        'toName="image"><Label value="dog"/><Label value="cat"/></RectangleLabels></View>'
    )
    store.upsert_project(
        1, label_config=config, from_name="label", to_name="image", image_key="image",
        labels=["dog", "cat"],
    )  # fmt: skip
    store.close()
    folder = _partial_sketch_folder(data_dir.parent / "sketches")
    argv = ["search-train", "--project", "1", "--sketches", str(folder)]
    assert main([*argv, "--map-column", "coco_class"]) == 1
    err = _one_line(capsys.readouterr().err, "search-train")
    assert "quickdraw/cat.ndjson (cat)" in err
