"""The benchmarks still run: `bench/run.py --quick` exits 0 and reports every benchmark.

Nothing here judges speed: a missed goal is the benchmark's finding, not a test failure.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ("spawn", "stream", "fanout", "density", "cli")
TIMEOUT = 240


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of each Markdown table row, without the header and the rule under it."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("|")]
    return [row for row in rows[1:] if not set(row[0]) <= {"-"}]


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="ijrd needs root: namespaces and cgroups")
def test_quick_run_reports_every_benchmark():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run.py"), "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    for name in BENCHMARKS:
        ratios = [row[3] for row in rows if row[0].split()[0] == name]
        assert any(is_number(ratio) for ratio in ratios), f"no {name} row with a numeric ratio in:\n{result.stdout}"
