"""``boxloop bench utility``: config checks, splits, bootstrap, and a tiny run on shared VOC."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest

from benchmark.config import ConfigError
from benchmark.utility_bench import cluster_bootstrap, run_utility_bench, split_sources
from benchmark.utility_config import load_utility_config
from benchmark.utility_labels import Item
from benchmark.utility_report import brisque_overlap

SHARED = Path(os.environ.get("BOXLOOP_SHARED_DATA", "../shared/data"))
VOC = SHARED / "voc" / "VOCdevkit" / "VOC2012"
MODEL = SHARED / "models" / "yolox_nano_coco" / "yolox_nano.onnx"


def _item(dataset: str, source: str) -> Item:
    from backend.boxes import Boxes

    return Item(
        dataset, source, "jpeg_q5", "train", {}, {}, {}, {}, {},
        np.zeros(1), None, None, Boxes.empty((4, 4)),
    )  # fmt: skip


def test_config_rejects_overlapping_qualities_and_jpeg_as_unseen() -> None:
    with pytest.raises(ConfigError, match="both trained on and held out"):
        load_utility_config({"qualities": [5, 10], "heldout_qualities": [10]})
    with pytest.raises(ConfigError, match="must not be JPEG"):
        load_utility_config({"unseen": ["jpeg:7"]})
    with pytest.raises(ConfigError, match="also a labeler"):
        load_utility_config({"labelers": [416, 320], "unused_size": 320})
    with pytest.raises(ConfigError, match="bench utility: unknown keys"):
        load_utility_config({"qualitie": [5]})
    with pytest.raises(ConfigError, match="predictor"):
        load_utility_config({"predictor": {"train_from": 9}})


def test_split_never_shares_a_source_between_train_and_test() -> None:
    items = [_item(d, f"s{i}") for d in ("a", "b") for i in range(10) for _ in range(3)]
    for seed in range(3):
        test = split_sources(items, 0.2, seed)
        assert sum(1 for d, _ in test if d == "a") == 2
        assert sum(1 for d, _ in test if d == "b") == 2
    assert split_sources(items, 0.2, 0) != split_sources(items, 0.2, 1)


def test_cluster_bootstrap_interval_covers_a_clear_difference() -> None:
    clusters = np.repeat(np.arange(40), 5)
    a = np.ones(200)
    b = (np.arange(200) % 2).astype(float)
    mean, low, high = cluster_bootstrap(a, b, clusters, 500, 0)
    assert mean == pytest.approx(0.5) and 0.3 < low <= mean <= high < 0.7
    same = cluster_bootstrap(a, a, clusters, 100, 0)
    assert same == (0.0, 0.0, 0.0)


def test_brisque_overlap_is_one_for_equal_and_zero_for_disjoint() -> None:
    bins = np.linspace(0, 10, 11)
    x = np.array([1.5, 2.5, 3.5])
    assert brisque_overlap(x, x, bins) == pytest.approx(1.0)
    assert brisque_overlap(x, x + 5, bins) == pytest.approx(0.0)


@pytest.mark.skipif(not VOC.is_dir() or not MODEL.is_file(), reason=f"shared data absent: {VOC}")
def test_tiny_run_writes_tables_and_plots(tmp_path: Path) -> None:
    config = load_utility_config(
        {
            "datasets": [f"voc:{VOC}"],
            "max_images": 4,
            "qualities": [3, 50],
            "heldout_qualities": [8],
            "unseen": ["blur:4"],
            "seeds": [0],
            "bootstrap": 50,
            "random_repeats": 2,
            "brisque_max_side": 160,
            "threads": 1,
            "predictor": {"epochs": 1},
            "output": str(tmp_path / "out"),
        }
    )
    summary, files = run_utility_bench(config, progress=False)
    assert {f.name for f in files} >= {"results.json", "report.md", "labels.csv"}
    rows = (tmp_path / "out" / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,source,distortion,group,yolox_nano@416_label")
    assert len(rows) == 1 + 4 * 4
    assert summary["facts"]["items"] == 4 * 4
    assert summary["facts"]["onnx416_vs_pytorch416_max_score_diff"] < 1e-3
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["labeling"] for r in stored["runs"]] == ["yolox_nano@416", "yolox_nano@640", "vote"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Table II layout" in report and "| vote |" in report
    # each item got its own trunk maps; the PNG round trip holds the same pixels, so the same maps
    with (tmp_path / "out" / "cache" / "items.pkl").open("rb") as fh:
        items = pickle.load(fh)["items"]
    train = [i for i in items if i.group == "train"]
    assert all(np.array_equal(i.maps, i.png_maps) for i in train)
    assert not np.array_equal(train[0].maps, train[1].maps)  # q3 vs q50 of one photo
    assert {i.scores["jpeg_quality"] for i in train} == {3.0, 50.0}
    assert {i.png_scores["jpeg_quality"] for i in train} == {100.0}
    # the cached labels are reused by a second run
    again, _ = run_utility_bench(config, progress=False)
    assert again["facts"]["items"] == summary["facts"]["items"]
    # 2-fold cross-validation over the same cached labels: every source tested once
    folded, _ = run_utility_bench(dataclasses.replace(config, folds=2), progress=False)
    assert folded["facts"] == {**again["facts"], "stage1_total_seconds": ANY}
    for row in folded["runs"]:
        assert row.get("folds") == 2 or "skipped" in row, row
        if "accuracy" in row:
            defined = [i for i in train if i.labels[row["labeling"]] is not None]
            if row["folds_skipped"] == 0:  # each defined item tested once, by its fold
                assert row["test"] == len(defined)
            else:
                assert row["test"] < len(defined)
    # a stage 1 cache cut short, or pickled by older code, is rebuilt instead of failing the run
    cache = tmp_path / "out" / "cache" / "items.pkl"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    rebuilt, _ = run_utility_bench(config, progress=False)
    assert rebuilt["facts"]["items"] == summary["facts"]["items"]


def test_cli_quick_mode_and_flags_build_the_config() -> None:
    import argparse

    from benchmark.cli import register

    parser = argparse.ArgumentParser(prog="boxloop")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "utility", "--quick", "--epochs", "3", "--seeds", "2"])
    from benchmark.utility_cli import build_utility_config

    config = build_utility_config(args)
    assert config.max_images == 10 and config.seeds == (0, 1)
    assert config.predictor.epochs == 3 and config.output == "benchmark/results/utility-quick"
    full = build_utility_config(parser.parse_args(["bench", "utility"]))
    assert len(full.qualities) == 9 and full.seeds == (0, 1, 2)
    assert len(full.datasets) == 3


def test_folds_test_every_source_once_and_keep_datasets_balanced() -> None:
    from benchmark.utility_bench import source_folds

    items = [_item(d, f"s{i}") for d in ("a", "b") for i in range(10) for _ in range(3)]
    folds = source_folds(items, 5, seed=0)
    assert len(folds) == 5
    every = [source for fold in folds for source in fold]
    assert len(every) == len(set(every)) == 20
    assert all(sum(1 for d, _ in fold if d == "a") == 2 for fold in folds)
    assert source_folds(items, 5, seed=1) != folds
    with pytest.raises(ConfigError, match="folds"):
        load_utility_config({"folds": 1})


def test_pooled_folds_are_summarised_as_one_test_set() -> None:
    """Two folds' correctness arrays pooled: the accuracy is over all items, the interval is
    the cluster bootstrap over every source, and the drop rate is the pooled one."""
    from benchmark.utility_bench import SplitPredictions, summarize_labeling
    from benchmark.utility_config import BASELINES

    def part(pred_ok: list[int], base_ok: list[int], drops: list[int], tag: str):
        n = len(pred_ok)
        tests = ("jpeg", "png", "unseen")
        correct = {"predictor": {k: np.array(pred_ok, float) for k in tests}}
        for b in BASELINES:
            correct[b] = {k: np.array(base_ok, float) for k in tests}
        clusters = {k: np.array([f"{tag}{i // 2}" for i in range(n)]) for k in tests}
        truths = {k: np.ones(n, np.int64) for k in tests}
        return SplitPredictions(truths, correct, clusters, np.array(drops))

    one = part([1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], "x")
    two = part([1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1], "y")
    pooled = SplitPredictions.pooled([one, two])
    config = load_utility_config({"bootstrap": 200})
    row = summarize_labeling({"labeling": "vote", "seed": 0}, pooled, 0, config)
    assert row["accuracy"]["predictor"]["jpeg"] == pytest.approx(7 / 10)
    assert row["accuracy"]["brisque"]["jpeg"] == pytest.approx(4 / 10)
    assert row["predictor_drop_rate"] == pytest.approx(3 / 10)
    diff = row["difference"]["jpeg"]
    assert diff["diff"] == pytest.approx(0.3) and diff["low"] <= 0.3 <= diff["high"]


def _labelled(source: str, group: str, label: int) -> Item:
    """One distorted copy of ``source`` in ``group`` that the vote labels ``label``."""
    item = _item("a", source)
    return dataclasses.replace(
        item,
        group=group,
        labels={"vote": label},
        graded={"vote": 0.0},
        clipped={"vote": 0.0},
    )


def test_the_unseen_test_keeps_its_own_useful_share() -> None:
    """The JPEG test is 1/2 useful, the unseen test of the same sources 1/4: each is stored."""
    from benchmark.utility_bench import fit_labeling

    items = [_labelled("s0", "train", 1), _labelled("s1", "train", 1)]  # training: one class
    items += [_labelled("t0", "train", 1), _labelled("t1", "train", 0)]
    items += [_labelled(f"t{k % 2}", "unseen", int(k == 0)) for k in range(4)]
    config = load_utility_config({})
    facts, net, _ = fit_labeling(items, "vote", {("a", "t0"), ("a", "t1")}, 0, config)
    assert net is None and "skipped" in facts  # the facts are stored even for a skipped fit
    assert facts["test_useful_share"] == pytest.approx(1 / 2)
    assert facts["unseen_useful_share"] == pytest.approx(1 / 4)


def test_pooled_folds_keep_the_unseen_tests_own_useful_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Folds pooled: the unseen share is over every fold's unseen items (3 of 5 useful), not
    the JPEG test's share (1 of 3)."""
    import benchmark.utility_bench as bench
    from benchmark.utility_bench import SplitPredictions, evaluate_labeling_folds
    from benchmark.utility_config import BASELINES

    def part(jpeg: list[int], unseen: list[int]) -> SplitPredictions:
        truths = {"jpeg": np.array(jpeg), "png": np.array(jpeg), "unseen": np.array(unseen)}
        ones = {k: np.ones(len(v)) for k, v in truths.items()}
        clusters = {k: np.array([f"s{i}" for i in range(len(v))]) for k, v in truths.items()}
        correct = {m: ones for m in ("predictor", *BASELINES)}
        return SplitPredictions(truths, correct, clusters, np.array(jpeg))

    parts = iter([part([1, 0], [1, 1, 0, 1]), part([0], [0])])

    def fake_fit(*_: object) -> tuple[dict[str, object], object, SplitPredictions]:
        facts = {"train": 1, "test": 1, "unseen": 1, "train_useful_share": 0.5}
        return {**facts, "graded_mean": 0.0, "clipped_mean": 0.0}, object(), next(parts)

    monkeypatch.setattr(bench, "fit_labeling", fake_fit)
    config = load_utility_config({"bootstrap": 20})
    row, _ = evaluate_labeling_folds([], "vote", [set(), set()], 0, config)
    assert row["test_useful_share"] == pytest.approx(1 / 3)
    assert row["unseen_useful_share"] == pytest.approx(3 / 5)


def _report_summary(runs: list[dict[str, object]]) -> dict[str, object]:
    """The smallest ``results.json`` summary the report reads, around ``runs``."""
    config = {
        "qualities": [5], "heldout_qualities": [8], "unseen": ["blur:4"], "labelers": [416],
        "unused_size": 320, "seeds": [0, 1], "folds": None, "test_fraction": 0.2,
        "predictor": {},
    }  # fmt: skip
    facts = {
        "datasets": {"voc:X": 4}, "sources_with_a_found_box": 4, "sources": 4, "items": 8,
        "onnx416_vs_pytorch416_max_score_diff": 0.0,
    }  # fmt: skip
    labels = {"vote": {"jpeg_q5": {"useful": 1, "useless": 1, "dropped": 0}}}
    return {
        "config": config, "facts": facts, "labels": labels, "runs": runs, "seconds": 1.0,
        "machine": {"load": []},
    }  # fmt: skip


def _report_run(seed: int, test: int, unseen: int, **shares: float) -> dict[str, object]:
    accuracy = {"predictor": {"jpeg": 0.5, "png": 0.5, "unseen": 0.5}}
    difference = {k: {"diff": None} for k in ("jpeg", "png", "unseen")}
    return {
        "labeling": "vote", "seed": seed, "test": test, "unseen": unseen,
        "accuracy": accuracy, "difference": difference, **shares,
    }  # fmt: skip


def _table_row(report: str, title: str) -> str:
    section = report.split(f"### {title}\n")[1].split("\n#")[0]
    return next(line for line in section.splitlines() if line.startswith("| vote |"))


def test_unseen_table_shows_its_own_share_and_every_seeds_item_count(tmp_path: Path) -> None:
    from benchmark.utility_report import write_utility_report

    runs = [
        _report_run(0, 30, 10, test_useful_share=0.5, unseen_useful_share=0.2),
        _report_run(1, 30, 14, test_useful_share=0.5, unseen_useful_share=0.4),
    ]
    write_utility_report(tmp_path, _report_summary(runs), [])
    report = (tmp_path / "report.md").read_text()
    assert _table_row(report, "JPEG test").startswith("| vote | 30 | 50.0 ± 0.0 |")
    # the unseen share is its own (30 ± 14 %), the item count covers both seeds (12 ± 3)
    assert _table_row(report, "unseen distortion").startswith("| vote | 12 ± 3 | 30.0 ± 14.1 |")
    # results stored before the unseen share was kept: unknown, never the JPEG test's share
    old = [_report_run(seed, 30, 10, test_useful_share=0.5) for seed in (0, 1)]
    write_utility_report(tmp_path, _report_summary(old), [])
    report = (tmp_path / "report.md").read_text()
    assert _table_row(report, "unseen distortion").startswith("| vote | 10 | not stored |")
    assert _table_row(report, "same pixels as PNG").startswith("| vote | 30 | 50.0 ± 0.0 |")
