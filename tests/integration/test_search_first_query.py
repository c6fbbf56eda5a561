"""``benchmark.search_first_query`` on a small pool: every phase runs and the job indexes all."""

from __future__ import annotations

from benchmark.search_first_query import markdown, run


def test_first_query_bench_measures_every_phase_on_a_small_pool() -> None:
    result = run(12, threads=1)
    assert result["job_state"]["state"] == "done"
    assert result["job_state"]["indexed"] == 12 and result["job_state"]["failed"] == 0
    phases = (
        "cold_first_search_s",
        "second_search_s",
        "webhook_answer_s",
        "job_s",
        "first_search_after_job_s",
        "search_during_job_from_webhook_s",
    )
    assert all(result[name] > 0 for name in phases)
    assert result["job_s"] >= result["webhook_answer_s"]
    assert "first search after the job" in markdown(result)
