"""CLI: wall time of `ijrctl list`, against the bare cost of `import grpc`.

IJR: the real client, as a fresh process each time, against an idle ijrd: from the module
(`python -m ijr ctl --config ... list`) and, when built, the shipped file (dist/ijrctl, the
shiv zipapp, after one warm-up run that extracts it). Baseline: `python -c 'import grpc'` with
the venv's interpreter: any CLI that speaks gRPC pays at least that. Runs alternate with the
baseline; each figure is the median. The notes time bare interpreter start-up too, since the
zipapp runs under whatever `python3` PATH finds.
"""
import os
import shutil
import subprocess
import sys

from bench.harness import REPO, Goal, Row, Workspace, median, timed

NAME = "cli"
BASELINE = [sys.executable, "-c", "import grpc"]
PYZ = os.path.join(REPO, "dist", "ijrctl")


def run_ok(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.decode()[-2000:]}")


def commands(config: str) -> dict[str, list[str]]:
    """The row label and command line of each way to run `ijrctl list`."""
    found = {"python -m ijr ctl list": [sys.executable, "-m", "ijr", "ctl", "--config", config, "list"]}
    if os.access(PYZ, os.X_OK):
        found["dist/ijrctl list"] = [PYZ, "--config", config, "list"]
    return found


def launcher_probes() -> dict[str, list[str]]:
    """Bare interpreter start-up, to tell the zipapp's launcher cost (its shebang is
    `/usr/bin/env python3`, whatever python3 PATH finds) from ijrctl's own."""
    if not os.access(PYZ, os.X_OK):
        return {}
    return {"env-python3": ["/usr/bin/env", "python3", "-c", "pass"], "venv-python": [sys.executable, "-c", "pass"]}


def medians(candidates: dict[str, list[str]], runs: int) -> dict[str, float]:
    """Median wall seconds of each command: one warm-up each (page cache, the zipapp's
    extraction), then rounds that run every command once, so drift hits all alike."""
    times: dict[str, list[float]] = {label: [] for label in candidates}
    for command in candidates.values():
        run_ok(command)
    for _ in range(runs):
        for label, command in candidates.items():
            times[label].append(timed(lambda: run_ok(command)))
    return {label: median(values) for label, values in times.items()}


def run(ws: Workspace) -> list[Row]:
    with ws.daemon(NAME) as daemon:
        config = ws.pki.ctl_config(daemon.port, os.path.join(ws.subdir("cli-config"), "ctl.json"))
        clients = commands(config)
        probes = launcher_probes()
        result = medians({"baseline": BASELINE, **clients, **probes}, ws.sizes.cli_runs)
    base = result["baseline"]
    notes = []
    if probes:
        notes.append(f"dist/ijrctl runs under /usr/bin/env python3 = {shutil.which('python3')}: "
                     f"`python3 -c pass` takes {result['env-python3'] * 1000:.0f} ms there, "
                     f"{result['venv-python'] * 1000:.0f} ms with {sys.executable}")
    return [Row(f"{NAME} {label} (median of {ws.sizes.cli_runs})", f"{result[label] * 1000:.0f} ms",
                f"{base * 1000:.0f} ms import grpc", result[label] / base, Goal("<=", 2),
                notes=notes if clients[label][0] == PYZ else [])
            for label in clients]
