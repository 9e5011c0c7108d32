"""ijrd's command line: every missing or bad flag is one line on stderr and a non-zero exit."""
import subprocess
import sys

import pytest

from conftest import REPO, Pki, free_port, needs_root


def ijrd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ijr", "daemon", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def full_flags(pki: Pki, tmp_path, **override: str) -> list[str]:
    flags = {"--server": "localhost", "--port": str(free_port()), "--listen": "127.0.0.1",
             "--cert": pki.server_cert, "--key": pki.server_key, "--ca": pki.ca,
             "--secret-file": pki.secret_file, "--tokens": pki.tokens, "--state-dir": str(tmp_path / "state")}
    flags.update(override)
    return [word for flag, value in flags.items() if value is not None for word in (flag, value)]


def assert_one_line(result: subprocess.CompletedProcess, status: int, *words: str) -> None:
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ijrd: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("flag", ["--server", "--cert", "--key", "--ca", "--tokens"])
def test_missing_required_flag(pki, tmp_path, flag):
    assert_one_line(ijrd(*full_flags(pki, tmp_path, **{flag: None})), 2, flag)


def test_a_secret_is_required_once(pki, tmp_path):
    assert_one_line(ijrd(*full_flags(pki, tmp_path, **{"--secret-file": None})), 2, "--secret")
    both = full_flags(pki, tmp_path) + ["--secret", "x"]
    assert_one_line(ijrd(*both), 2, "--secret")


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_port(pki, tmp_path, port):
    assert_one_line(ijrd(*full_flags(pki, tmp_path, **{"--port": port})), 2, "--port")


def test_help_and_version():
    assert ijrd("--help").stdout.startswith("usage: ijrd")
    assert ijrd("--version").stdout.startswith("ijrd ")


@needs_root  # the checks after start-up need root
@pytest.mark.parametrize("flag, value, words", [
    ("--cert", "/nonexistent/server.pem", ("--cert", "/nonexistent/server.pem")),
    ("--key", "/nonexistent/server.key", ("--key",)),
    ("--ca", "/nonexistent/ca.pem", ("--ca",)),
    ("--secret-file", "/nonexistent/secret", ("/nonexistent/secret",)),
    ("--tokens", "/nonexistent/tokens", ("--tokens", "not a directory")),
])
def test_unreadable_files(pki, tmp_path, flag, value, words):
    assert_one_line(ijrd(*full_flags(pki, tmp_path, **{flag: value})), 1, *words)


@needs_root  # the checks after start-up need root
def test_unusable_pem_files_are_named(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert_one_line(ijrd(*full_flags(pki, tmp_path, **{"--cert": str(garbage)})), 1, "--cert", str(garbage))
    mismatch = full_flags(pki, tmp_path, **{"--key": pki.client_key})
    assert_one_line(ijrd(*mismatch), 1, "--key", "KEY_VALUES_MISMATCH")
    assert_one_line(ijrd(*full_flags(pki, tmp_path, **{"--ca": str(garbage)})), 1, "--ca", str(garbage))
