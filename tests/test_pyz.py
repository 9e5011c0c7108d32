"""The shipped file: dist/ijr.pyz alone in another directory, called through its symlinks.

build.sh builds it before the suite runs (`./build.sh test`).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, needs_root

PYZ = os.path.join(REPO, "dist", "ijr.pyz")
DEBIAN_PYTHON = "/usr/bin/python3"  # not the interpreter that built it: the pyz must carry its deps

pytestmark = pytest.mark.skipif(not os.path.exists(PYZ), reason=f"{PYZ} is missing: run ./build.sh first")


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """ijr.pyz copied alone to a fresh directory, with the three symlinks; its own SHIV_ROOT."""
    where = tmp_path_factory.mktemp("pyz")
    shutil.copy(PYZ, where / "ijr.pyz")
    for name in ("ijrd", "ijrctl", "ijrtoken"):
        os.symlink("ijr.pyz", where / name)
    return where


def run(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHIV_ROOT=str(kw.pop("shiv_root")))
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/", **kw)


@pytest.mark.parametrize("name", ["ijrd", "ijrctl", "ijrtoken"])
def test_symlinks_answer_help_and_version(alone, name):
    for flag, expected in (("--help", "usage: " + name), ("--version", f"{name} ")):
        result = run(str(alone / name), flag, shiv_root=alone / ".shiv")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(expected), result.stdout


def test_personalities_by_subcommand(alone):
    result = run(str(alone / "ijr.pyz"), "--help", shiv_root=alone / ".shiv")
    assert result.returncode == 0
    for name in ("daemon", "ctl", "token", "init"):
        assert name in result.stdout
    bad = run(str(alone / "ijr.pyz"), "nosuch", shiv_root=alone / ".shiv")
    assert bad.returncode == 2 and "unknown personality 'nosuch'" in bad.stderr


@pytest.mark.skipif(not os.path.exists(DEBIAN_PYTHON), reason=f"no {DEBIAN_PYTHON} on this machine")
def test_runs_under_another_python(alone):
    result = run(DEBIAN_PYTHON, str(alone / "ijrctl"), "--version", shiv_root=alone / ".shiv-debian")
    assert result.returncode == 0, result.stderr
    # importing the client's gRPC stack proves the bundled dependencies are complete
    result = run(DEBIAN_PYTHON, str(alone / "ijr.pyz"), "ctl", "--config", "/nonexistent", "list",
                 shiv_root=alone / ".shiv-debian")
    assert result.returncode == 1 and result.stderr.startswith("ijrctl: cannot read config /nonexistent")


@needs_root
def test_demo_path_end_to_end(alone, tmp_path):
    """What `./build.sh demo` does, with the copied file: init, ijrd, one isolated job."""
    shiv = alone / ".shiv"
    port = free_port()
    config = tmp_path / "ijrctl-config"
    init = run(str(alone / "ijr.pyz"), "init", "--dir", str(tmp_path / "etc"), "--config", str(config),
               "--port", str(port), shiv_root=shiv)
    assert init.returncode == 0, init.stderr
    ijrd_argv = init.stdout.split()
    assert ijrd_argv[0] == "ijrd"
    log = open(tmp_path / "ijrd.log", "w")
    daemon = subprocess.Popen([str(alone / "ijrd"), *ijrd_argv[1:], "--listen", "127.0.0.1",
                               "--state-dir", str(tmp_path / "state")], stderr=log,
                              env=dict(os.environ, SHIV_ROOT=str(shiv)))
    try:
        deadline = time.monotonic() + 60
        while "serving on" not in (tmp_path / "ijrd.log").read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "ijrd.log").read_text()
            time.sleep(0.1)
        result = run(str(alone / "ijrctl"), "--config", str(config), "start", "--command", "ps", "--arg", "-ef",
                     "--output", shiv_root=shiv)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split()[:2] == ["UID", "PID"] and len(lines) == 3, result.stdout
        assert lines[1].split()[1] == "1" and lines[1].endswith("ijr-init")
        assert lines[2].split()[1] == "2" and lines[2].endswith("ps -ef")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        log.close()
