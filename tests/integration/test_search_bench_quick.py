"""``boxloop bench search --quick`` on the shared subsets: tables, D's definition, plots."""

from __future__ import annotations

import json
from pathlib import Path

from backend.cli import main


def test_quick_search_bench_writes_tables_and_plots(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    code = main(["bench", "search", "--quick", "--threads", "1", "--out", str(out)])
    assert code == 0
    report = (out / "README.md").read_text()
    for title in ("mAP@200", "NDCG@200", "P@20"):
        assert title in report
    assert report.count("D = min(K, number of relevant images") == 3  # under every table
    result = json.loads((out / "results.json").read_text())
    table = result["summary"]["table"]
    assert set(table) >= {"boxloop", "single object", "class names + layout", "random"}
    one = table["boxloop"]["ap"]["1"]["mean"]
    assert one is not None and 0.0 <= one <= 1.0
    # a trained model ranks relevant images above random on 1-object queries
    assert table["boxloop"]["ndcg"]["1"]["mean"] > table["random"]["ndcg"]["1"]["mean"]
    assert (out / "search_metrics.png").stat().st_size > 10_000
