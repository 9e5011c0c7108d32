"""The real ijrctl CLI against a real ijrd: what a user types, what they see, the exit codes.

Every run is a real process (daemon.ctl), so grpc is imported where ijrctl imports it.
Jobs started here are all ended or stopped before each test returns.
"""
import json
import re
import uuid

import pytest

from conftest import job_pb2, needs_root, token

pytestmark = needs_root

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def ok(result) -> str:
    """stdout of a successful run, after checking it said nothing on stderr."""
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stderr == b"", result.stderr
    return result.stdout.decode()


def one_line_error(result) -> str:
    """The single `ijrctl: ...` stderr line of a failed run; stdout must be empty."""
    assert result.returncode != 0, result
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("ijrctl: "), err
    assert result.stdout == b"", result.stdout
    return err


def start_id(daemon, *args, token_value=None) -> str:
    out = ok(daemon.ctl("start", *args, token_value=token_value))
    assert UUID4.fullmatch(out.rstrip("\n")) and out.count("\n") == 1, repr(out)
    return out.strip()


@pytest.fixture(scope="module")
def api(daemon, admin_token):
    return daemon.stub(admin_token)


def stop_quietly(api, job_id: str) -> None:
    try:
        api.StopJob(job_pb2.JobIdentifier(job_id=job_id))
    except Exception:  # noqa: BLE001 - clean-up only
        pass


# --- start --------------------------------------------------------------------------------


def test_start_prints_only_the_id(daemon, api):
    job = start_id(daemon, "--command", "sh", "--arg", "-c", "--arg", "echo hi; exit 3")
    assert api.output(job) == b"hi\n"
    record = api.status(job)
    assert record.exit_code == 3 and record.owner == "admin"
    assert list(record.job_arguments) == ["-c", "echo hi; exit 3"]


def test_start_output_is_binary_exact(daemon):
    result = daemon.ctl("start", "--command", "sh", "--arg", "-c", "--arg", r"printf '\000\001\377'; printf 'a\r\nb'",
                        "--output")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"\x00\x01\xffa\r\nb"
    assert UUID4.fullmatch(result.stderr.decode().strip()) and result.stderr.count(b"\n") == 1, result.stderr


def test_start_output_big_random_bytes_match_the_api(daemon, api):
    result = daemon.ctl("start", "--command", "head", "--arg", "-c", "--arg", "300000", "--arg", "/dev/urandom",
                        "--output")
    assert result.returncode == 0, result.stderr
    job = result.stderr.decode().strip()
    assert len(result.stdout) == 300000
    assert api.output(job) == result.stdout


@pytest.mark.parametrize("script, code", [("exit 7", 7), ("kill -9 $$", 137), ("kill -15 $$", 143), ("true", 0)])
def test_start_output_exit_code_is_the_jobs(daemon, script, code):
    result = daemon.ctl("start", "--command", "sh", "--arg", "-c", "--arg", script, "--output")
    assert result.returncode == code, result.stderr
    assert result.stdout == b""
    assert UUID4.fullmatch(result.stderr.decode().strip()), result.stderr


def test_arg_values_that_look_like_flags(daemon):
    """`--arg -ef` (space-separated, a value starting with '-') must reach the job, as must `--arg=--output`."""
    result = daemon.ctl("start", "--command", "ps", "--arg", "-ef", "--output")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["UID", "PID"], lines  # ps -ef's header
    assert any(line.split()[1] == "1" and "ijr-init" in line for line in lines[1:]), lines

    result = daemon.ctl("start", "--command", "echo", "--arg", "--output", "--arg=-n", "--arg", "-x", "--output")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"--output -n -x\n"


@pytest.mark.parametrize("form", [("--arg", "--"), ("--arg=--",)], ids=["spaced", "equals"])
def test_double_dash_as_a_job_argument(daemon, form):
    """`git log -- FILE`, `rm -- -f`: a job argument '--' must reach the job, not crash ijrctl."""
    result = daemon.ctl("start", "--command", "echo", "--arg", "a", *form, "--arg", "b", "--output")
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()[-600:]
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"a -- b\n"


def test_start_a_command_that_does_not_exist(daemon, api):
    before = {r.job_id for r in api.ListJobs(job_pb2.ListJobsRequest(include_finished=True)).job_records}
    result = daemon.ctl("start", "--command", "/no/such/program", "--output")
    err = one_line_error(result)
    assert result.returncode == 127, err
    assert "/no/such/program" in err
    after = {r.job_id for r in api.ListJobs(job_pb2.ListJobsRequest(include_finished=True)).job_records}
    assert after == before


def test_start_with_limits(daemon, api):
    job = start_id(daemon, "--command", "true", "--cpu", "512", "--memory", "64m",
                   "--disk-read-iops", "/dev/vda:100", "--disk-write-iops", "254:0:50")
    record = api.status(job)
    assert (record.cpu_shares, record.memory_limit_in_bytes) == (512, 64 << 20)
    assert (record.disk_read_iops_limit, record.disk_write_iops_limit) == ("/dev/vda:100", "254:0:50")


def test_start_with_a_device_the_server_refuses(daemon):
    err = one_line_error(daemon.ctl("start", "--command", "true", "--disk-read-iops", "/dev/null:5"))
    assert "invalid argument" in err and "/dev/null" in err


# --- list, status, stop, output -----------------------------------------------------------


def test_list_status_stop_output(daemon, api):
    job = start_id(daemon, "--command", "sh", "--arg", "-c", "--arg", "echo started; exec sleep 100")
    try:
        table = ok(daemon.ctl("list")).splitlines()
        assert table[0].split()[:3] == ["ID", "STATE", "COMMAND"], table
        row = [line for line in table if line.startswith(job)]
        assert len(row) == 1 and row[0].split()[1] == "running", table

        records = json.loads(ok(daemon.ctl("list", "--json")))
        mine = [r for r in records if r["job_id"] == job]
        assert len(mine) == 1 and mine[0]["state"] == "RUNNING" and mine[0]["owner"] == "admin"
        assert mine[0]["job_command"] == "sh" and mine[0]["job_arguments"] == ["-c", "echo started; exec sleep 100"]

        status = ok(daemon.ctl("status", job))
        fields = dict(line.split(":", 1) for line in status.splitlines())
        assert fields["id"].strip() == job and fields["state"].strip() == "running"
        assert fields["owner"].strip() == "admin"
        as_json = json.loads(ok(daemon.ctl("status", "--json", "--job", job)))
        assert as_json["job_id"] == job and as_json["state"] == "RUNNING"

        stopped = ok(daemon.ctl("stop", job))
        assert stopped.strip() == f"{job} stopped"
    finally:
        stop_quietly(api, job)

    assert json.loads(ok(daemon.ctl("status", "--json", job)))["state"] == "STOPPED"
    assert job not in ok(daemon.ctl("list"))
    finished = json.loads(ok(daemon.ctl("list", "--all", "--json")))
    assert [r["state"] for r in finished if r["job_id"] == job] == ["STOPPED"]
    assert any(line.startswith(job) and line.split()[1] == "stopped"
               for line in ok(daemon.ctl("list", "--all")).splitlines())
    assert daemon.ctl("output", job).stdout == b"started\n"


def test_output_from_byte_zero_of_a_finished_job(daemon, api):
    job = api.start("seq", "1", "5000")
    expected = "".join(f"{i}\n" for i in range(1, 5001)).encode()
    result = daemon.ctl("output", job)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    assert result.stdout == expected
    result = daemon.ctl("output", "--job", job)
    assert result.stdout == expected


def test_output_follows_a_running_job(daemon, api):
    job = api.start("sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.1; done")
    result = daemon.ctl("output", job)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"1\n2\n3\n4\n5\n"


def test_status_shows_exit_and_command(daemon, api):
    job = api.start("sh", "-c", "exit 9")
    api.output(job)
    fields = dict(line.split(":", 1) for line in ok(daemon.ctl("status", job)).splitlines())
    assert fields["state"].strip() == "exited" and fields["exit"].strip() == "9"
    assert fields["command"].strip() == "sh -c 'exit 9'"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "stop", "output"])
def test_unknown_job(daemon, command):
    missing = str(uuid.uuid4())
    err = one_line_error(daemon.ctl(command, missing))
    assert "not found" in err and missing in err, err


@pytest.mark.parametrize("command", ["status", "stop", "output"])
def test_malformed_job_id(daemon, command):
    err = one_line_error(daemon.ctl(command, "not-a-job"))
    assert "invalid argument" in err, err


@pytest.mark.parametrize("bad", ["garbage", "0" * 64, "revoked"])
def test_bad_token_from_the_environment(daemon, pki, bad):
    if bad == "revoked":
        bad = pki.issue("frank")
        ok(daemon.ctl("list", token_value=bad))
        token.revoke(bad, pki.tokens)
    for args in (("list",), ("start", "--command", "true"), ("status", str(uuid.uuid4()))):
        err = one_line_error(daemon.ctl(*args, token_value=bad))
        assert "unauthenticated" in err.lower(), err


def test_another_users_job_is_not_found(daemon, api, pki):
    alice, bob = pki.issue("alice"), pki.issue("bob")
    job = start_id(daemon, "--command", "sleep", "--arg", "100", token_value=alice)
    try:
        for args in (("status", job), ("stop", job), ("output", job)):
            err = one_line_error(daemon.ctl(*args, token_value=bob))
            assert "not found" in err and job in err, err
        assert job not in ok(daemon.ctl("list", "--all", token_value=bob))
        assert job in ok(daemon.ctl("list", token_value=alice))
        assert json.loads(ok(daemon.ctl("status", "--json", job, token_value=alice)))["state"] == "RUNNING"
        assert ok(daemon.ctl("stop", job)).strip() == f"{job} stopped"  # admin may
    finally:
        stop_quietly(api, job)
