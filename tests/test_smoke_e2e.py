"""The shortest real path: ijrd + ijrctl, one isolated job, its output and exit code."""
import pytest

from conftest import job_pb2

pytestmark = pytest.mark.cgroup  # also run on cgroup v2, in the VM


def test_start_output_status(daemon, admin_token):
    stub = daemon.stub(admin_token)
    job_id = stub.start("sh", "-c", "echo hello; exit 3")
    assert stub.output(job_id) == b"hello\n"
    record = stub.status(job_id)
    assert record.state == job_pb2.JobRecord.EXITED and record.exit_code == 3 and record.owner == "admin"


def test_ctl_start_output_ps(daemon):
    result = daemon.ctl("start", "--command", "ps", "--arg=-e", "--arg=-o", "--arg=pid=,comm=", "--output")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == ["1", "ijr-init", "2", "ps"]
