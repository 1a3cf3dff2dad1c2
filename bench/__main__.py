"""``python -m bench [--quick] [--only NAME ...] [--out DIR]``

Runs the benchmarks of issue #7 in order, prints a table for each and writes
``<out>/<name>.json`` (default ``bench/results/``) plus ``<out>/summary.json``.
``--quick`` takes seconds (CI); the full run takes minutes. Every figure is a ratio
against a baseline measured in the same run. With ``BROKER_TEST_DATABASE_URL`` set
(a ``postgresql+asyncpg://`` URL), the store-bound benchmarks also run on PostgreSQL in a
scratch database that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from .common import PG_ENV, RESULTS, Options, machine, save

BENCHMARKS = {
    "hotpath": "bench.hotpath",
    "http": "bench.http_route",
    "refresh": "bench.refresh",
    "scale": "bench.scale",
    "burst": "bench.burst",
    "retention": "bench.retention",
    "proxy": "bench.proxy",
    "workers": "bench.workers",
    "startup": "bench.startup",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds, for CI")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--seed", type=int, default=7)
    pg = parser.add_mutually_exclusive_group()
    pg.add_argument(
        "--postgres", action="store_true",
        help=f"also run on PostgreSQL in --quick mode (needs {PG_ENV})",
    )
    pg.add_argument("--no-postgres", action="store_true", help=f"ignore {PG_ENV}")
    args = parser.parse_args(argv)
    if args.postgres and not os.environ.get(PG_ENV):
        parser.error(f"--postgres needs {PG_ENV} (a postgresql+asyncpg:// URL)")
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    opts = Options(
        quick=args.quick,
        out=args.out,
        # PostgreSQL when BROKER_TEST_DATABASE_URL is set: always in a full run, on request
        # in a quick one (it adds scratch databases and migrations: seconds CI need not spend).
        pg_url=(os.environ.get(PG_ENV) or None)
        if not args.no_postgres and (args.postgres or not args.quick) else None,
        seed=args.seed,
    )
    info = machine()
    mode = "quick" if opts.quick else "full"
    print(
        f"# broker benchmarks ({mode}): {info['nproc']} CPUs ({info['cpu_model']}), "
        f"Python {info['python']}, SQLite {info['sqlite']}"
        + (", PostgreSQL on" if opts.pg_url else ", PostgreSQL off")
        + "\n",
        flush=True,
    )
    summary: dict[str, Any] = {"machine": info, "benchmarks": {}}
    failed = False
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(BENCHMARKS[name])
        started = time.monotonic()
        try:
            data = module.run(opts)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            summary["benchmarks"][name] = {"completed": False, "error": repr(exc)}
            print(f"BENCH {name} FAILED: {exc!r}\n", flush=True)
            continue
        seconds = time.monotonic() - started
        print(data["table"], flush=True)
        print(f"\n({name}: {seconds:.1f} s)\n", flush=True)
        summary["benchmarks"][name] = {
            "completed": True,
            "seconds": round(seconds, 1),
            **data.get("summary", {}),
        }
    save(opts, "summary", summary)
    completed = {k: v["completed"] for k, v in summary["benchmarks"].items()}
    print(json.dumps({"completed": completed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
