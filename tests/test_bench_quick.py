"""``python -m bench --quick`` runs every benchmark to completion and the counts hold.

No timing is asserted here (the machines CI runs on are shared and noisy): only that each
benchmark completes, that every due connection is refreshed exactly once, and that a burst
of 1,000 callers for one expired connection makes exactly one token request, and that
pruning keeps the events table at what retention should leave (and that each sweep round
beside it refreshes exactly the connections due), and that the proxy route
answers what the API answers and moves large bodies in full.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {
    "hotpath", "http", "refresh", "scale", "burst", "retention", "proxy", "workers", "startup",
}


def result(out: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return data


def test_quick_benchmarks_complete_and_their_counts_hold(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]

    summary = result(tmp_path, "summary")
    assert set(summary["benchmarks"]) == BENCHMARKS
    assert all(b["completed"] for b in summary["benchmarks"].values()), summary
    assert summary["machine"]["nproc"] >= 1

    # 1. Every call of the measured loops answered from the cache after the warm-up pass
    # would be a timing claim; what holds everywhere is that the run produced its rows.
    hot = result(tmp_path, "hotpath")
    assert {r["integration"] for r in hot["rows"]} == {"openweathermap", "acme"}
    assert all(r["cache_after_warm_up"]["entries"] >= r["connections"] for r in hot["rows"])

    # 2. Both stacks' servers answered the same body, were the stack they say (httptools
    # on uvloop, h11 on asyncio), and no request failed.
    http = result(tmp_path, "http")
    checks = list(http["response_check"].values())
    assert len(checks) == 4 and all(c == checks[0] for c in checks)
    assert checks[0]["status"] == 200
    assert http["stacks"]["fast"]["served"] == {
        "http": "HttpToolsProtocol", "loop": "uvloop",
        "bare_http": "HttpToolsProtocol", "bare_loop": "uvloop"}
    assert http["stacks"]["h11"]["served"] == {
        "http": "H11Protocol", "loop": "asyncio",
        "bare_http": "H11Protocol", "bare_loop": "asyncio"}
    assert http["errors"] == 0

    # 8. Both servers answered every request, and two workers were both reached.
    workers = result(tmp_path, "workers")
    assert workers["errors"] == 0 and workers["workers_reached"] == {"1": 1, "2": 2}

    # 3. Every due connection refreshed once: one token request and one new version each.
    for store in result(tmp_path, "refresh")["results"]:
        slow = store["slow"]
        assert slow["refreshed"] == slow["connections"] == slow["token_requests"]
        assert slow["rows_refreshed"] == slow["connections"]
        for run_ in store["fast"]["runs"]:
            swept = run_["broker"]
            assert swept["refreshed"] == store["fast"]["connections"] == swept["token_requests"]
            assert swept["rows_refreshed"] == store["fast"]["connections"]
            assert run_["bare"]["ok"] == run_["bare"]["posts"]

    # 4. The due-query uses the index; the sweep refreshed exactly the 100 due at each size.
    for store, found in result(tmp_path, "scale")["summary"].items():
        assert found["uses_index"], store
        assert found["refreshed"] == found["claimed"] == [100, 100], store
        assert found["failed"] == [0, 0], store
        assert found["token_requests"] == [100, 100], store

    # 5. A burst of 1,000 callers for one expired connection: exactly one token request.
    for burst in result(tmp_path, "burst")["results"]:
        assert burst["token_requests"] == 1, burst["mode"]
        assert burst["errors"] == 0, burst["mode"]

    # 6. The hot queries read their indexes with a year of events; under a simulated steady
    # state the events table holds what retention leaves, within the per-sweep budget.
    for store, found in result(tmp_path, "retention")["summary"].items():
        assert found["plans_ok"], store
        assert found["claimed"] == 40, store
        assert found["events"][1] > 30 * found["events"][0], store
        steady = found["steady"]
        assert found["bounded"] and steady["final_rows"] >= steady["bound"] * 0.95, steady
        assert steady["final_rows"] < steady["unpruned"] / 5, steady
        assert steady["budget_hit"] == 0 and steady["max_batches"] <= steady["budget"], steady
        # What a year leaves against an empty events table: every sweep round refreshed
        # exactly the connections due, once each; the retained store's sweeps pruned what
        # was aged for them, the empty store's nothing.
        against = found["against_empty"]
        due = against["due"]
        assert against["events"][0] > 50 * due and against["events"][1] == 0, against["events"]
        assert against["claimed"] == [40], store
        for side, counts in against["rounds"].items():
            rounds = len(counts["refreshed"])
            assert rounds >= 1, (store, side)
            for key in ("claimed", "refreshed", "token_requests", "rows_refreshed"):
                assert counts[key] == [due] * rounds, (store, side, key, counts[key])
            assert counts["failed"] == [0] * rounds, (store, side, counts["failed"])
        assert against["rounds"]["retained"]["pruned"] == against["rounds"]["retained"]["aged"]
        assert set(against["rounds"]["empty"]["pruned"]) == {0}, store

    # 7. Through the proxy: the API's own answer (and not its key), no failed request, and
    # every byte of the large download and upload moved, the upload read in full upstream.
    proxy = result(tmp_path, "proxy")
    check = proxy["response_check"]
    assert check["same_body"] and check["proxy"] == check["direct"], check
    assert not check["key_echoed"]
    assert proxy["errors"] == 0
    size = proxy["transfers"]["bytes"]
    for row in proxy["transfers"]["runs"]:
        for way in ("direct", "proxy"):
            assert row["download"][way]["bytes"] == size
            assert row["upload"][way]["upstream_read"] == size

    # 9. Start-up: every catalog provider enabled in the served broker, and every generated
    # file enabled and loaded (the 200 of --quick, plus benchmark 1's own provider).
    startup = result(tmp_path, "startup")
    assert startup["start_up"]["providers_enabled"] >= 150
    assert startup["start_up"]["phases"]["providers"] == startup["start_up"]["providers_enabled"]
    catalog = startup["catalog"]
    assert catalog["files"] == 200 and catalog["enabled"] == catalog["files"] + 1, catalog
