"""Run IJR's benchmarks and print one table: each figure against a baseline from the same run.

    .venv/bin/python bench/run.py            # the issue's sizes (a few minutes)
    .venv/bin/python bench/run.py --quick    # tiny sizes: a smoke run
    .venv/bin/python bench/run.py --only spawn --only cli

Needs root (ijrd does). Makes its own PKI in a temporary directory and a fresh ijrd on a free
loopback port for each benchmark, and tears all of it down, jobs included, on success, error,
Ctrl-C or SIGTERM. A missed goal is reported, not failed: the exit status says only whether
every benchmark ran (0), one failed (1) or the run was interrupted (130).
"""
import argparse
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = REPO  # `bench` and `ijr` as packages, not this directory's modules as top-level ones

from bench import cli, density, fanout, spawn, stream  # noqa: E402
from bench.harness import FULL, QUICK, Row, Sizes, Workspace  # noqa: E402
from ijr import cgroup  # noqa: E402

BENCHMARKS = {module.NAME: module for module in (spawn, stream, fanout, density, cli)}
COLUMNS = ("benchmark", "IJR", "baseline", "ratio", "goal", "met?")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmarks run, measures little")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    return p.parse_args(argv)


def _terminate(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so every daemon and job is stopped on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("bench: must run as root (ijrd creates namespaces and cgroups)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    sizes = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    failed: list[str] = []
    directory = tempfile.mkdtemp(prefix="ijr-bench-")
    try:
        workspace = Workspace(directory, sizes)
        for name in [name for name in BENCHMARKS if not args.only or name in args.only]:
            rows += _run_one(name, workspace, failed)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(render(rows, sizes, args.quick, load_before))
    if failed:
        print(f"bench: failed: {', '.join(failed)} (see the traceback above)", file=sys.stderr)
    return 1 if failed else 0


def _run_one(name: str, workspace: Workspace, failed: list[str]) -> list[Row]:
    """One benchmark; an error is reported and the others still run (its daemon is stopped)."""
    print(f"bench: {name} ... (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        rows = BENCHMARKS[name].run(workspace)
    except Exception:  # noqa: BLE001 - reported, counted in the exit status
        traceback.print_exc()
        failed.append(name)
        return []
    print(f"bench: {name} done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return rows


# ---- the report ----------------------------------------------------------------------------

def machine() -> str:
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return (f"nproc {os.cpu_count()}, MemTotal {mem_kib / 1024 / 1024:.1f} GiB, {platform.machine()}, "
            f"kernel {platform.release()}, Python {platform.python_version()}, cgroup v{cgroup.detect().version}")


def render(rows: list[Row], sizes: Sizes, quick: bool, load_before: float) -> str:
    """A Markdown table (pastes into a report as is), then each benchmark's notes.

    The load average before the run tells whether something else shared the machine: on two
    cores, any other busy process skews latencies and throughputs (the ratios less so). Each
    benchmark's own load is on stderr (density's teardown of its jobs spikes it).
    """
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"IJR benchmarks, {now}, {'QUICK sizes (smoke run, figures mean little)' if quick else 'full sizes'}",
             f"machine: {machine()}",
             f"load average (1 min) before the run: {load_before:.2f}",
             f"sizes: {sizes}", ""]
    cells = [COLUMNS] + [(r.benchmark, r.ijr, r.baseline, "-" if r.ratio is None else f"{r.ratio:.2f}",
                          str(r.goal) if r.goal else "-", r.met) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    for i, row in enumerate(cells):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"- {r.benchmark}: {note}" for r in rows for note in r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
