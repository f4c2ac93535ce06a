"""Run every benchmark, one after the other, each in its own process:

    .venv/bin/python bench/run_all.py            # full sizes, median of 3 runs (~30 min)
    .venv/bin/python bench/run_all.py --quick    # small sizes, one run: a smoke test for CI
    .venv/bin/python bench/run_all.py --failover # also kill -9 failover times (bench_failover)

Each benchmark prints its own table(s) to stdout (progress goes to stderr). The exit status is
0 when every benchmark ran to the end, whatever its figures (there are no assertions on
performance: a missed target shows as MISS in its table), and 1 when one of them failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = (
    "bench_unary.py",
    "bench_stream.py",
    "bench_e2e.py",
    "bench_dbsize.py",
    "bench_log.py",
    "bench_web.py",
    "bench_remote.py",
)
# Run only when named in --only (or with --failover): it kills orchestrators on purpose.
OPTIONAL = ("bench_failover.py",)
# Upper bounds per benchmark; each also bounds itself (its --timeout) a little below these.
QUICK_LIMIT_S = 900
FULL_LIMIT_S = 4200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (smoke)")
    parser.add_argument("--db", default=None, help="sqlite, postgres or both (default: both)")
    parser.add_argument("--postgres-url", default=None, help="PostgreSQL admin URL")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure")
    parser.add_argument("--profile", metavar="DIR", default=None, help="py-spy every server")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--sqlite-synchronous", choices=("full", "normal"), default=None, help="as in each bench"
    )
    parser.add_argument(
        "--failover", action="store_true", help="also run bench_failover.py (kill -9 failover)"
    )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help="comma-separated subset of " + ", ".join(BENCHMARKS + OPTIONAL),
    )
    args = parser.parse_args()
    if args.failover:
        args.only += "," + ",".join(OPTIONAL)

    passthrough: list[str] = []
    if args.quick:
        passthrough.append("--quick")
    for flag in ("db", "postgres_url", "runs", "sqlite_synchronous"):
        value = getattr(args, flag)
        if value is not None:
            passthrough += [f"--{flag.replace('_', '-')}", str(value)]
    if args.keep_logs:
        passthrough.append("--keep-logs")
    limit = QUICK_LIMIT_S if args.quick else FULL_LIMIT_S

    summary: list[tuple[str, str, float]] = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in BENCHMARKS + OPTIONAL:
            parser.error(f"--only: unknown benchmark {name!r}")
        argv = [sys.executable, str(BENCH_DIR / name), *passthrough]
        argv += ["--timeout", str(limit - 60)]
        if args.profile:
            argv += ["--profile", str(Path(args.profile) / name.removesuffix(".py"))]
        print(f"\n=== {name} {' '.join(passthrough)}", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(argv, timeout=limit, check=False).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"killed after {limit} s"
        summary.append((name, status, time.monotonic() - started))

    print("\n=== summary")
    for name, status, elapsed in summary:
        print(f"  {name:<16} {status:<20} {elapsed:7.1f} s")
    return 0 if all(status == "ok" for _, status, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
