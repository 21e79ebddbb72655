"""`make bench`: every benchmark, one after the other, then the table in docs/benchmarks.md.

    python -m bench.run_all [--quick] [--only trl,weights] [--in-process]

Each benchmark runs in its own process by default (`python -m bench.<module>`): a crash or a leak in
one cannot disturb the next, and every one starts with the same thread settings and a clean heap. A
failing benchmark is reported and the others still run; the exit status is non-zero if any failed.
bench.bench_training (the training engine's own benchmark) runs too when it is importable.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from typing import Any

from bench import common, update_readme

# (result name, module): fastest and most decision-relevant first.
BENCHMARKS: tuple[tuple[str, str], ...] = (
    ("trl", "bench.bench_trl"),
    ("weights", "bench.bench_weights"),
    ("training", "bench.bench_training"),
    ("scaling", "bench.bench_scaling"),
    ("importance", "bench.bench_importance"),
    ("quality", "bench.bench_quality"),
    ("hh", "bench.bench_hh"),
    ("grpo", "bench.bench_grpo"),
    ("contention", "bench.bench_contention"),
    # The paper's comparison on SmolLM2: hours of CPU, resumable from its data dir (.tidpo/bench-real).
    ("real", "bench.bench_real"),
)


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _run_subprocess(module: str, quick: bool) -> tuple[bool, str]:
    command = [sys.executable, "-m", module] + (["--quick"] if quick else [])
    env = {**os.environ, "PYTHONPATH": str(common.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(command, cwd=common.ROOT, env=env, check=False)
    return proc.returncode == 0, f"exit status {proc.returncode}"


def _run_in_process(module: str, quick: bool) -> tuple[bool, str]:
    try:
        importlib.import_module(module).run(quick=quick)
    except Exception as exc:  # report and go on with the next benchmark
        import traceback

        traceback.print_exc()
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def run(quick: bool = False, only: set[str] | None = None, in_process: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    status: dict[str, Any] = {}
    for name, module in BENCHMARKS:
        if only and name not in only:
            continue
        if not available(module):
            common.log("run_all", f"{name}: {module} not importable, skipped")
            status[name] = {"ok": None, "detail": "not available"}
            continue
        common.log("run_all", f"{name}: starting ({module})")
        begin = time.perf_counter()
        ok, detail = (_run_in_process if in_process else _run_subprocess)(module, quick)
        status[name] = {"ok": ok, "detail": detail, "seconds": round(time.perf_counter() - begin, 1)}
        common.log(
            "run_all", f"{name}: {'done' if ok else 'FAILED'} in {status[name]['seconds']:.0f}s ({detail})"
        )
    if not quick:
        update_readme.update()
    total = time.perf_counter() - started
    common.log("run_all", f"all benchmarks finished in {total / 60:.1f} min")
    for name, entry in status.items():
        common.log(
            "run_all",
            f"  {name:<9} {'ok' if entry['ok'] else 'skipped' if entry['ok'] is None else 'FAILED'}  {entry.get('seconds', '')}",
        )
    return {"status": status, "seconds": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run every tidpo benchmark and refresh the table in docs/benchmarks.md."
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (smoke run); docs/benchmarks.md is left alone"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated subset of: " + ", ".join(n for n, _ in BENCHMARKS)
    )
    parser.add_argument("--in-process", action="store_true", help="run the benchmarks in this process")
    args = parser.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    result = run(quick=args.quick, only=only, in_process=args.in_process)
    return 0 if all(e["ok"] is not False for e in result["status"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
