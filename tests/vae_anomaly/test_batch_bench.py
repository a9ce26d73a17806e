"""The batch benchmark's report: the per-row breakdown and the printed table (no timing here)."""

from __future__ import annotations

import pytest

from vae_anomaly.bench.batch import breakdown, format_table


def _result() -> dict:  # type: ignore[type-arg]
    npy = {
        "rows": 1_000_000,
        "rows_per_second": 40_000.0,
        "parse_rows_per_second": 800_000.0,
        "peak_rss_mb": 633.0,
        "rows_per_second_all_runs": [38_000.0, 40_000.0, 39_000.0],
    }
    csv = {
        "rows": 200_000,
        "rows_per_second": 20_000.0,
        "parse_rows_per_second": 40_000.0,
        "peak_rss_mb": 640.0,
        "rows_per_second_all_runs": [20_000.0],
    }
    mem = {"forward_rows_per_second": 62_500.0, "score_rows_per_second": 50_000.0,
           "complexity_rows_per_second": 150_000.0}  # fmt: skip
    return {
        "npy": npy,
        "csv": csv,
        "in_memory": mem,
        "pyod_vae": {"rows_per_second": 25_000.0},
        "repeats": 3,
        "npy_vs_forward": 40_000 / 62_500,
        "npy_vs_score": 40_000 / 50_000,
        "breakdown_us_per_row": breakdown(npy, csv, mem),
    }


def test_breakdown_splits_the_time_per_row() -> None:
    us = _result()["breakdown_us_per_row"]
    assert us["forward"] == pytest.approx(16.0) and us["score"] == pytest.approx(20.0)
    assert us["complexity_term"] == pytest.approx(4.0)  # score - forward
    assert us["npy_pipeline"] == pytest.approx(5.0)  # 25 µs per file row - 20 of scoring
    assert us["csv_rest"] == pytest.approx(50.0 - 25.0 - 20.0)


def test_table_shows_best_run_spread_and_breakdown() -> None:
    lines = format_table(_result())
    text = "\n".join(lines)
    assert lines[0] == "best of 3 runs each"
    assert "| NPY file, 1,000,000 rows | 40,000 | 38,000-40,000 | 633 MB |" in lines
    assert "| CSV file (MNIST layout), 200,000 rows | 20,000 |  | 640 MB |" in lines
    assert "| in memory: complexity term only | 150,000 |  |  |" in lines
    assert "| PyOD VAE decision_function, in memory | 25,000 |  |  |" in lines
    assert "= in-memory score 20.0 (forward 16.0 + complexity term 4.0) + file pipeline 5.0" in text
    assert "= 80% of the in-memory score (the pipeline adds 25%), 64% of the bare forward" in text
    assert "parsing 25.0 + in-memory score 20.0 + the rest 5.0 (10% of the run)" in text
