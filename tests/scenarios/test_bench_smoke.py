"""The benchmark (bench/run.py) works end to end: a `--quick` run prints its table with numbers.

It checks that the benchmark runs, not how fast anything is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_bench_prints_a_table_with_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--no-readme", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| figure | measured |" in run.stdout
    sections = (
        "| 1. ingest",
        "| 1. poll gap",
        "| 2. poll gap",
        "| 2. Bakong",
        "| 3. detection",
        "| 4. delivery",
        "| 5. recovery",
        "| 6. scale-out ingest",
        "| 6. scale-out delivery",
        "| 7. ingest, rachhen/khqr-webhook's route",
        "| 13. ingest with the API keys of 100 apps",
        "| 8. list endpoint 403",
        "| 9. polling",
        "| 10. growth",
        "| 11. retention",
        "| 12. Redis Cluster: poll gap",
        "| 12. Redis Cluster: delivery",
    )
    for section in sections:
        assert section in run.stdout, section

    res: dict[str, Any] = orjson.loads(out.read_bytes())
    assert not res.get("errors")
    assert res["ingest_idle"]["rps"] > 0 and res["ingest"]["health_rps"] > 0
    assert res["ingest"]["p99_ms"] is not None
    assert res["capacity"]["gap"]["count"] > 0
    assert res["capacity"]["bakong_requests_per_md5_min"] > 0
    assert res["detection"]["arrived"] > 0 and res["detection"]["p50_s"] is not None
    assert res["delivery"]["delivered"] > 0 and res["delivery"]["rate"] > 0
    assert res["recovery"]["ready_s"] > 0
    assert res["scale"]["ingest_2"] > 0 and res["scale"]["delivery_2"] is not None
    assert res["peak_rss_kib"] > 0
    assert res["compat"]["compat_median"] > 0 and res["compat"]["ours_median"] > 0
    assert res["apps"]["apps_median"] > 0 and res["apps"]["open_median"] > 0
    assert res["list_forbidden"]["large"]["requests_per_s"] > 0
    assert res["list_forbidden"]["large"]["young_gap"]["count"] > 0
    assert res["proxy"]["proxied"]["proxied"] > 0, "the simulated Bakong saw the proxy"
    grown = res["growth"]["history_figures"]
    assert grown["transactions"] >= 5_000 and grown["list_rps"] > 0
    assert grown["stats_ms"]["p50"] is not None and grown["metrics_ms"]["p50"] is not None
    assert res["retention"]["ingest_pruning_rps"] > 0
    assert res["cluster"]["capacity"]["gap"]["count"] > 0
    assert res["cluster"]["delivery"]["delivered"] > 0
