"""``boxloop bench`` and its ``box`` / ``utility`` modes refuse a wrong grid with exit code 2 and
one line naming the problem, before running anything: never a traceback, never a flag that is
accepted and then has no effect."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.config import ConfigError
from benchmark.utility_config import load_utility_config

SPEC = "kitti:/nonexistent/kitti"  # valid syntax; every case fails before a dataset is read


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str], prefix: str) -> str:
    """Run the CLI, check exit code 2 and one stderr line starting with ``prefix``; the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{prefix}: error: "), err
    return err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------ bench: --train and --yolox
def test_train_flag_is_refused_on_a_grid_without_a_faster_rcnn_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--train`` sets the Faster R-CNN loop's training; the default (YOLOX) loop never reads
    it, so it would only force a rerun with identical training."""
    out = tmp_path / "out"
    argv = ["bench", "--dataset", SPEC, "--strategy", "dissimilar", "--out", str(out)]
    err = error_line(capsys, [*argv, "--train", "epochs=1"], "boxloop bench")
    assert "--train sets the Faster R-CNN loop's training" in err and "--yolox" in err
    assert not out.exists()


def test_unknown_yolox_flag_key_is_refused_before_the_grid_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--dataset", SPEC, "--strategy", "random", "--out", str(out)]
    err = error_line(capsys, [*argv, "--yolox", "max_epoch=3"], "boxloop bench")
    assert "yolox: unknown keys ['max_epoch']" in err
    err = error_line(capsys, [*argv, "--yolox", "min_epochs=50"], "boxloop bench")
    assert "yolox: need 1 <= min_epochs <= max_epochs" in err
    err = error_line(capsys, [*argv, "--yolox", "epochs"], "boxloop bench")
    assert "--yolox 'epochs': expected KEY=VALUE" in err
    assert not out.exists()


def test_unknown_key_of_a_yaml_yolox_section_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    grid = write(
        tmp_path / "grid.yaml",
        f"datasets: [{SPEC}]\napproaches: [random]\nyolox: {{bogus: 1}}\noutput: {out}\n",
    )
    err = error_line(capsys, ["bench", "--config", str(grid)], "boxloop bench")
    assert "yolox: unknown keys ['bogus']" in err
    assert not out.exists()


# --------------------------------------------------------------------------- bench: --features
def test_features_flag_with_nothing_to_apply_to_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = write(tmp_path / "grid.yaml", f"datasets: [{SPEC}]\napproaches: [temporal]\n")
    err = error_line(
        capsys, ["bench", "--config", str(grid), "--features", "simnet"], "boxloop bench"
    )
    assert "--features needs --strategy similar or dissimilar" in err
    argv = ["bench", "--dataset", SPEC, "--strategy", "random", "--features", "simnet"]
    assert "--features needs" in error_line(capsys, argv, "boxloop bench")


# ------------------------------------------------------------------------------ YAML files
def test_invalid_or_non_mapping_yaml_is_one_line_in_every_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = write(tmp_path / "broken.yaml", "a: [\n")
    listed = write(tmp_path / "listed.yaml", "- a\n- b\n")
    for mode in ([], ["box"], ["utility"]):
        prefix = " ".join(["boxloop bench", *mode])
        err = error_line(capsys, ["bench", *mode, "--config", str(broken)], prefix)
        assert "broken.yaml: not valid YAML at line 2" in err
        err = error_line(capsys, ["bench", *mode, "--config", str(listed)], prefix)
        assert "listed.yaml: config must be a mapping, got list" in err
        missing = tmp_path / "missing.yaml"
        err = error_line(capsys, ["bench", *mode, "--config", str(missing)], prefix)
        assert "missing.yaml" in err


# ------------------------------------------------------------------------- seeds and datasets
def test_box_grid_with_an_unknown_dataset_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = write(tmp_path / "box.yaml", f"datasets: [{{spec: {SPEC!r}, bogus: 1}}]\n")
    err = error_line(capsys, ["bench", "box", "--config", str(grid)], "boxloop bench box")
    assert "unknown keys ['bogus']" in err


@pytest.mark.parametrize("mode", ["box", "utility"])
def test_empty_seeds_are_refused_before_any_stage_runs(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seeds 0`` used to run the utility bench's whole labelling stage, then fail with a
    ``KeyError``: an empty seed list is refused up front, from the flag and from the YAML."""
    out = tmp_path / "out"
    argv = ["bench", mode, "--dataset", SPEC, "--seeds", "0", "--out", str(out), "--no-progress"]
    err = error_line(capsys, argv, f"boxloop bench {mode}")
    assert "seeds must be distinct and non-empty, got []" in err
    grid = write(tmp_path / "grid.yaml", f"datasets: [{SPEC}]\nseeds: []\n")
    err = error_line(capsys, ["bench", mode, "--config", str(grid)], f"boxloop bench {mode}")
    assert "seeds must be distinct and non-empty" in err
    grid = write(tmp_path / "grid.yaml", f"datasets: [{SPEC}]\nseeds: [a]\n")
    err = error_line(capsys, ["bench", mode, "--config", str(grid)], f"boxloop bench {mode}")
    assert "seeds must be integers or a count" in err
    assert not out.exists()


def test_utility_config_reads_a_seed_count_as_the_main_bench_does() -> None:
    """``seeds: 3`` means seeds 0, 1, 2 in every grid (it was a ``TypeError`` here)."""
    assert load_utility_config({"seeds": 3}).seeds == (0, 1, 2)
    assert load_utility_config({"seeds": [4, 2]}).seeds == (4, 2)
    with pytest.raises(ConfigError, match="distinct"):
        load_utility_config({"seeds": [1, 1]})
