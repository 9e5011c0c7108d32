"""ijrctl without a server: flags, config errors, an unreachable server, what importing costs.

Every failure must be exactly one line on stderr, nothing on stdout, and never a traceback.
Bad flags must fail (exit 2) before the config is read: the tests leave HOME without a
config, so reading it first would fail differently (exit 1).

Most cases run in-process through the `ijrctl` argv[0] dispatch, which is fast; a few run
as real processes to check exit codes and stderr end to end. Every test that reaches for the
network runs as a process, so grpc is imported the way ijrctl imports it, not in pytest.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ijr.__main__
from ijr import __version__, ctl, limits

ROOT = Path(__file__).resolve().parent.parent
CONFIG_KEYS = ("address", "port", "server_name", "ca", "cert", "key", "token")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME, so ~/.ijrctl-config does not exist, and no token or timeout from the caller."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("IJR_TOKEN", raising=False)
    monkeypatch.delenv("IJRCTL_TIMEOUT", raising=False)
    return home


def run_ctl(*args, timeout=15, **env):
    """ijrctl as a real process, the way a user runs it; `env` adds environment variables."""
    return subprocess.run(
        [sys.executable, "-m", "ijr", "ctl", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )


def call_ctl(capsys, *args):
    """ijrctl in this process, dispatched on argv[0] as through the `ijrctl` symlink."""
    status = ijr.__main__.main(["/some/dir/ijrctl", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


def assert_one_line_error(result, status, *needles):
    """Exit `status`, nothing on stdout, one `ijrctl: ...` line on stderr containing every needle."""
    assert "Traceback" not in result.stderr
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ijrctl: ")
    for needle in needles:
        assert needle in lines[0]


def write_config(path, **values):
    path.write_text(json.dumps(values))
    return path


@pytest.fixture
def certs(tmp_path):
    """A throwaway key and self-signed certificate, good enough to build TLS credentials."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=x", "-keyout", "k.pem", "-out", "c.pem", "-days", "1"],
        cwd=tmp_path, check=True, capture_output=True,
    )
    return tmp_path


@pytest.fixture
def unreachable_config(certs):
    """A complete config for 127.0.0.1 on a port nobody listens on; certificate paths relative."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return write_config(certs / "config", address="127.0.0.1", port=port, server_name="x",
                        ca="c.pem", cert="c.pem", key="k.pem", token="t")


# --- help, version, imports -----------------------------------------------------------


def test_version_through_the_ijrctl_symlink_name(capsys):
    assert ijr.__main__.main(["/some/dir/ijrctl", "--version"]) == 0
    assert capsys.readouterr().out == f"ijrctl {__version__}\n"


def test_help_lists_every_command(capsys):
    assert ijr.__main__.main(["/some/dir/ijrctl", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ijrctl")
    for command in ("start", "stop", "list", "output", "status", "IJR_TOKEN", "IJRCTL_TIMEOUT"):
        assert command in out


def test_subcommand_help(capsys):
    assert ijr.__main__.main(["/some/dir/ijrctl", "start", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--command", "--arg", "--cpu", "--memory", "--disk-read-iops", "--disk-write-iops", "--output"):
        assert flag in out


def test_version_and_help_as_a_process():
    result = run_ctl("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"ijrctl {__version__}\n", "")
    result = run_ctl("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: ijrctl") and result.stderr == ""


def test_importing_ctl_imports_neither_cryptography_nor_grpc():
    code = "import ijr.ctl, sys; print('cryptography' in sys.modules, 'grpc' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout == "False False\n"


# --- bad input: exit 2 before the config is read ----------------------------------------

START = ["start", "--command", "ls"]
BAD_INPUT = [
    *[(START + ["--memory", text], ["--memory", repr(text)]) for text in ("12x", "-5", "1.5g", "", "m")],
    (START + ["--memory", "512"], ["--memory", "too small"]),
    *[(START + ["--disk-read-iops", text], ["--disk-read-iops", repr(text)])
      for text in ("sda", "/dev/sda:", "/dev/sda:0", "/dev/sda:abc", ":5")],
    (START + ["--disk-write-iops", "/dev/sda"], ["--disk-write-iops", "'/dev/sda'"]),
    *[(START + ["--cpu", text], ["--cpu", text]) for text in ("0", "1", "262145", "-5", "abc")],
    (["start"], ["--command", "required"]),
    (START + ["--arg"], ["--arg"]),
    *[([command], [command, "ID", "--job"]) for command in ("stop", "output", "status")],
    *[([command, "a", "--job", "b"], [command, "not both"]) for command in ("stop", "output", "status")],
    ([], ["COMMAND"]),
    (["restart"], ["'restart'"]),
    (["list", "extra"], ["extra"]),
]


@pytest.mark.parametrize("args,needles", BAD_INPUT, ids=[" ".join(a) or "(none)" for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(home, capsys, args, needles):
    assert_one_line_error(call_ctl(capsys, *args), 2, *needles)


def test_bad_input_as_a_process(home):
    assert_one_line_error(run_ctl(*START, "--memory", "12x"), 2, "--memory", "'12x'")


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf", "nan", ""])
def test_bad_timeout_from_environment(home, capsys, monkeypatch, value):
    monkeypatch.setenv("IJRCTL_TIMEOUT", value)
    assert_one_line_error(call_ctl(capsys, "list"), 2, "IJRCTL_TIMEOUT", repr(value))


@pytest.mark.parametrize("text,size", [
    ("100", 100), ("5b", 5), ("1024k", 1 << 20), ("1024K", 1 << 20), ("2M", 2 << 20), ("2m", 2 << 20),
    ("1g", 1 << 30), ("1G", 1 << 30),
])
def test_memory_units(text, size):
    assert limits.parse_memory(text) == size


@pytest.mark.parametrize("memory", ["2M", "1024k", "1g", "1G", "1048576"])
def test_good_memory_gets_past_the_flags(home, capsys, memory):
    """Accepted flags lead to the next step, reading the (missing) config: exit 1, not 2."""
    assert_one_line_error(call_ctl(capsys, *START, "--memory", memory), 1, "cannot read config")


def test_flags_become_the_request_fields():
    args = ctl._parse_args(["start", "--command", "sh", "--arg", "-c", "--arg=-x", "--arg", "--arg", "--memory", "2m",
                            "--disk-read-iops", "/dev/sda: 5", "--disk-write-iops", "8:0:100"])
    assert (args.command, args.arg, args.cpu, args.memory) == ("sh", ["-c", "-x", "--arg"], 1024, 2 << 20)
    assert (args.disk_read_iops, args.disk_write_iops) == ("/dev/sda:5", "8:0:100")
    assert ctl._parse_args(["status", "--job", "j1"]).job == "j1"
    assert ctl._parse_args(["stop", "j1"]).job == "j1"


# --- config errors: exit 1, naming the file ---------------------------------------------


def test_missing_default_config(home):
    assert_one_line_error(run_ctl("list"), 1, str(home / ".ijrctl-config"), "No such file")


def test_missing_config(home, capsys, tmp_path):
    path = tmp_path / "nope"
    assert_one_line_error(call_ctl(capsys, "--config", str(path), "list"), 1, str(path), "No such file")


def test_config_is_a_directory(home, capsys, tmp_path):
    assert_one_line_error(call_ctl(capsys, "--config", str(tmp_path), "list"), 1, str(tmp_path), "directory")


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not valid JSON"), ("", "not valid JSON"), ("\xff", "not valid JSON"), ("[]", "JSON object"),
])
def test_config_is_not_a_json_object(home, capsys, tmp_path, text, needle):
    path = tmp_path / "config"
    path.write_bytes(text.encode("latin-1"))
    assert_one_line_error(call_ctl(capsys, "--config", str(path), "list"), 1, str(path), needle)


@pytest.mark.parametrize("missing", CONFIG_KEYS)
def test_config_missing_a_key(home, capsys, tmp_path, missing):
    config = {key: "x" for key in CONFIG_KEYS if key != missing}
    path = write_config(tmp_path / "config", **config)
    assert_one_line_error(call_ctl(capsys, "--config", str(path), "list"), 1, str(path), repr(missing))


@pytest.mark.parametrize("key,value", [
    ("port", "http"), ("port", None), ("port", True), ("address", 5), ("ca", ""), ("token", ""), ("token", "a\nb"),
])
def test_config_with_a_bad_value(home, capsys, tmp_path, key, value):
    config = {**{k: "x" for k in CONFIG_KEYS}, "port": 1, key: value}
    path = write_config(tmp_path / "config", **config)
    assert_one_line_error(call_ctl(capsys, "--config", str(path), "list"), 1, str(path), repr(key))


def test_config_naming_a_missing_certificate(home, capsys, unreachable_config):
    (unreachable_config.parent / "c.pem").unlink()
    result = call_ctl(capsys, "--config", str(unreachable_config), "list")
    assert_one_line_error(result, 1, str(unreachable_config), "CA certificate", "c.pem")


# --- unreachable server: exit 1, quickly --------------------------------------------------


@pytest.mark.parametrize("args", [["list"], START, ["status", "j"], ["stop", "j"], ["output", "j"]],
                         ids=["list", "start", "status", "stop", "output"])
def test_unreachable_server(unreachable_config, args):
    """A refused connection fails at once; IJRCTL_TIMEOUT bounds the wait in any case."""
    port = json.loads(unreachable_config.read_text())["port"]
    result = run_ctl("--config", str(unreachable_config), *args, timeout=35, IJRCTL_TIMEOUT="3")
    assert_one_line_error(result, 1, f"cannot reach ijrd at 127.0.0.1:{port}")


def test_token_from_environment_replaces_the_configs(unreachable_config):
    config = json.loads(unreachable_config.read_text())
    del config["token"]
    write_config(unreachable_config, **config)
    result = run_ctl("--config", str(unreachable_config), "list", timeout=35, IJRCTL_TIMEOUT="3", IJR_TOKEN="t")
    assert_one_line_error(result, 1, "cannot reach ijrd")
