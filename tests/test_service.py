"""JobService end to end: a real ijrd, real mutual TLS 1.3, real tokens, real isolated jobs.

The session `daemon` is shared with other test modules: never stop it, and stop every job
started here (a second daemon's start-up sweeps every job cgroup on the host, so a job left
running would be killed by the restart test anyway). Tests that restart a daemon make their own.
"""
import datetime
import json
import os
import random
import re
import secrets
import subprocess
import threading
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Daemon, grpc, job_pb2, leftover_cgroups, needs_root, token

pytestmark = needs_root

Code = grpc.StatusCode
State = job_pb2.JobRecord
ID = job_pb2.JobIdentifier
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# --- helpers ------------------------------------------------------------------------------


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError that call(*args) raises; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):  # a stream: drain it
            for _ in result:
                pass
    return info.value


def code_of(call, *args, **kwargs) -> Code:
    return rpc_error(call, *args, **kwargs).code()


def all_ids(stub) -> set[str]:
    return {r.job_id for r in stub.ListJobs(job_pb2.ListJobsRequest(include_finished=True)).job_records}


def running_ids(stub) -> set[str]:
    return {r.job_id for r in stub.ListJobs(job_pb2.ListJobsRequest()).job_records}


def wait_ended(stub, job_id: str, timeout: float = 20) -> job_pb2.JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = stub.status(job_id)
        if record.state != State.RUNNING:
            return record
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still running after {timeout}s")


def wait_for_log(daemon, pattern: str, timeout: float = 5) -> str:
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        log = daemon.read_log()
        if regex.search(log):
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r}; log tail:\n{log[-3000:]}")
        time.sleep(0.05)


def ensure_stopped(stub, job_id: str) -> None:
    try:
        stub.StopJob(ID(job_id=job_id), timeout=30)
    except grpc.RpcError:
        pass


def seq_bytes(n: int) -> bytes:
    return "".join(f"{i}\n" for i in range(1, n + 1)).encode()


# --- certificates -------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "Other CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_client(directory, name: str, ca_cert, ca_key, not_before, not_after) -> tuple[str, str]:
    """A client certificate and key signed by ca_key, written as name.pem / name.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("admin")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice(pki) -> str:
    return pki.issue("alice")


@pytest.fixture(scope="module")
def bob(pki) -> str:
    return pki.issue("bob")


@pytest.fixture(scope="module")
def admin(daemon, admin_token):
    return daemon.stub(admin_token)


# --- TLS ----------------------------------------------------------------------------------


def s_client(daemon, pki, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{daemon.port}", "-servername", "localhost",
         "-cert", pki.client_cert, "-key", pki.client_key, "-CAfile", pki.ca, *args],
        input=b"", capture_output=True, timeout=20)


def test_tls12_is_refused(daemon, pki):
    result = s_client(daemon, pki, "-tls1_2")
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode != 0, out + err
    # s_client prints "Protocol : TLSv1.2" even for a failed attempt; what matters is that no
    # cipher was negotiated and no certificate came back.
    assert not re.search(r"New, TLSv1\.2, Cipher is (?!\(NONE\))", out), out
    assert "Cipher is (NONE)" in out, out
    assert "BEGIN CERTIFICATE" not in out, out


@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_tls13_suites_are_accepted(daemon, pki, suite):
    result = s_client(daemon, pki, "-tls1_3", "-ciphersuites", suite)
    out = result.stdout.decode(errors="replace")
    # The return code may be 1: the server closes the connection once s_client sends no HTTP/2.
    assert f"New, TLSv1.3, Cipher is {suite}" in out, out + result.stderr.decode(errors="replace")
    assert "Verification: OK" in out, out


@pytest.fixture(scope="module")
def bad_certs(pki, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("badcerts"))
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    other_ca, other_key = make_ca()
    with open(os.path.join(pki.dir, "etc", "ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(pki.ca, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    return {
        "other_ca": make_client(directory, "other", other_ca, other_key, now - day, now + day),
        "expired": make_client(directory, "expired", ca_cert, ca_key, now - 10 * day, now - day),
        "not_yet_valid": make_client(directory, "future", ca_cert, ca_key, now + day, now + 10 * day),
        "good_fresh": make_client(directory, "fresh", ca_cert, ca_key, now - day, now + day),
    }


def test_a_fresh_cert_from_the_right_ca_works(daemon, admin_token, bad_certs):
    """Sanity check of the helper, so the refusals below are about the certificate's fault."""
    cert, key = bad_certs["good_fresh"]
    stub = daemon.stub(admin_token, daemon.channel(cert=cert, key=key))
    stub.ListJobs(job_pb2.ListJobsRequest(), timeout=10)


@pytest.mark.parametrize("which", ["other_ca", "expired", "not_yet_valid"])
def test_bad_client_certs_are_refused(daemon, admin_token, bad_certs, which):
    cert, key = bad_certs[which]
    channel = daemon.channel(cert=cert, key=key)
    try:
        err = rpc_error(daemon.stub(admin_token, channel).ListJobs, job_pb2.ListJobsRequest(), timeout=10)
    finally:
        channel.close()
    assert err.code() != Code.OK
    assert err.code() in (Code.UNAVAILABLE, Code.UNKNOWN, Code.INTERNAL, Code.DEADLINE_EXCEEDED), err


def test_no_client_cert_is_refused(daemon, pki, admin_token):
    with open(pki.ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    channel = grpc.secure_channel(f"127.0.0.1:{daemon.port}", creds,
                                  options=[("grpc.ssl_target_name_override", "localhost")])
    try:
        err = rpc_error(daemon.stub(admin_token, channel).ListJobs, job_pb2.ListJobsRequest(), timeout=10)
    finally:
        channel.close()
    assert err.code() in (Code.UNAVAILABLE, Code.UNKNOWN, Code.INTERNAL, Code.DEADLINE_EXCEEDED), err


def test_plaintext_is_refused(daemon, admin_token):
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")
    try:
        err = rpc_error(daemon.stub(admin_token, channel).ListJobs, job_pb2.ListJobsRequest(), timeout=10)
    finally:
        channel.close()
    assert err.code() != Code.OK


# --- tokens ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(daemon):
    ch = daemon.channel()
    yield ch
    ch.close()


def list_with_header(channel, header: str | None):
    from ijr.gen import job_pb2_grpc
    metadata = None if header is None else [("authorization", header)]
    return job_pb2_grpc.JobServiceStub(channel).ListJobs(job_pb2.ListJobsRequest(), metadata=metadata, timeout=10)


def assert_unauthenticated(channel, header: str | None) -> grpc.RpcError:
    err = rpc_error(list_with_header, channel, header)
    assert err.code() == Code.UNAUTHENTICATED, (header, err)
    return err


def test_valid_token_works_and_scheme_is_case_insensitive(channel, alice):
    list_with_header(channel, f"Bearer {alice}")
    list_with_header(channel, f"bearer {alice}")


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Basic x", "Token abc", "abc",
], ids=["missing", "empty", "bearer-alone", "bearer-space", "basic", "other-scheme", "no-scheme"])
def test_missing_or_malformed_header(channel, header):
    assert_unauthenticated(channel, header)


@pytest.mark.parametrize("variant", ["upper", "short", "long", "traversal", "unknown", "not-hex", "abc", "raw"])
def test_malformed_or_unknown_tokens(channel, alice, variant):
    value = {
        "upper": alice.upper(),
        "short": alice[:63],
        "long": alice + "0",
        "traversal": "../../etc/passwd",
        "unknown": secrets.token_hex(32),
        "not-hex": "g" * 64,
        "abc": "abc",
        "raw": alice,  # the token alone, without a scheme
    }[variant]
    assert_unauthenticated(channel, value if variant == "raw" else f"Bearer {value}")
    list_with_header(channel, f"Bearer {alice}")  # the channel itself is fine


def test_token_file_named_from_bearer_path_is_not_opened(channel, pki):
    """A token that would name a file outside the directory is refused before any path is made."""
    os.makedirs(os.path.join(pki.tokens, "sub"), exist_ok=True)
    assert_unauthenticated(channel, "Bearer sub/../" + "0" * 64)


def test_forged_token_file(channel, pki, alice):
    """A hand-written file whose accessToken is not the HMAC of its fields."""
    name = secrets.token_hex(32)
    fields = {"userId": "admin", "timestamp": int(time.time()), "randNumber": 12345, "accessToken": name}
    token.write_new(os.path.join(pki.tokens, name + ".json"), json.dumps(fields).encode())
    assert_unauthenticated(channel, f"Bearer {name}")


def test_edited_token_file_user_id(channel, pki):
    """Take a real token of user 'mallory' and rewrite its userId to admin: the HMAC no longer fits."""
    stolen = pki.issue("mallory")
    list_with_header(channel, f"Bearer {stolen}")
    path = os.path.join(pki.tokens, stolen + ".json")
    with open(path) as f:
        fields = json.load(f)
    fields["userId"] = "admin"
    os.unlink(path)
    token.write_new(path, json.dumps(fields).encode())
    assert_unauthenticated(channel, f"Bearer {stolen}")


def test_token_signed_with_another_secret(channel, pki):
    data = token.generate("admin", b"not the daemon's secret")
    token.save(data, pki.tokens)
    assert_unauthenticated(channel, f"Bearer {data.accessToken}")


def test_revoked_token_fails_at_once(channel, pki):
    value = pki.issue("carol")
    list_with_header(channel, f"Bearer {value}")
    token.revoke(value, pki.tokens)
    err = assert_unauthenticated(channel, f"Bearer {value}")
    assert "revoked" in err.details() or "unknown" in err.details()


def test_expired_token(channel, pki):
    data = token.generate("dave", pki.secret, ttl=2)
    token.save(data, pki.tokens)
    list_with_header(channel, f"Bearer {data.accessToken}")  # at least a second left
    time.sleep(max(0.0, data.expires - time.time()) + 0.2)
    err = assert_unauthenticated(channel, f"Bearer {data.accessToken}")
    assert "expired" in err.details()


def test_symlinked_token_file(channel, pki, tmp_path):
    data = token.generate("admin", pki.secret)
    elsewhere = str(tmp_path / "elsewhere")
    real = token.save(data, elsewhere)
    os.symlink(real, os.path.join(pki.tokens, data.accessToken + ".json"))
    assert_unauthenticated(channel, f"Bearer {data.accessToken}")


def test_fifo_token_file_does_not_hang(channel, pki):
    name = secrets.token_hex(32)
    os.mkfifo(os.path.join(pki.tokens, name + ".json"), 0o600)
    assert_unauthenticated(channel, f"Bearer {name}")
    list_with_header(channel, f"Bearer {pki.issue('erin')}")  # the daemon did not block


def test_token_directory_named_like_a_token(channel, pki):
    name = secrets.token_hex(32)
    os.mkdir(os.path.join(pki.tokens, name + ".json"))
    assert_unauthenticated(channel, f"Bearer {name}")


def test_every_job_rpc_needs_a_token(daemon):
    stub = daemon.stub(None)
    some_id = str(uuid.uuid4())
    assert code_of(stub.StartJob, job_pb2.StartRequest(job_command="true")) == Code.UNAUTHENTICATED
    assert code_of(stub.ListJobs, job_pb2.ListJobsRequest()) == Code.UNAUTHENTICATED
    assert code_of(stub.GetJobStatus, ID(job_id=some_id)) == Code.UNAUTHENTICATED
    assert code_of(stub.StopJob, ID(job_id=some_id)) == Code.UNAUTHENTICATED
    assert code_of(stub.StreamJobOutput, ID(job_id=some_id)) == Code.UNAUTHENTICATED


def test_health_needs_a_token(channel, alice):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(channel)
    err = rpc_error(health.Check, health_pb2.HealthCheckRequest(), timeout=10)
    assert err.code() == Code.UNAUTHENTICATED
    err = rpc_error(health.Check, health_pb2.HealthCheckRequest(), timeout=10,
                    metadata=[("authorization", "Bearer " + "0" * 64)])
    assert err.code() == Code.UNAUTHENTICATED
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=[("authorization", f"Bearer {alice}")])
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _reflect(channel, metadata):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        metadata=metadata, timeout=10)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_needs_a_token(channel, alice):
    assert code_of(_reflect, channel, None) == Code.UNAUTHENTICATED
    assert code_of(_reflect, channel, [("authorization", "Basic x")]) == Code.UNAUTHENTICATED
    names = _reflect(channel, [("authorization", f"Bearer {alice}")])
    assert "job.JobService" in names, names


# --- authorization --------------------------------------------------------------------------


def test_users_see_only_their_own_jobs(daemon, admin, alice, bob):
    a, b = daemon.stub(alice), daemon.stub(bob)
    job = a.start("sleep", "100")
    mine = b.start("sleep", "100")
    try:
        assert job in running_ids(a) and job in all_ids(a)
        assert mine not in all_ids(a)
        assert job not in running_ids(b) and job not in all_ids(b)
        assert mine in running_ids(b)
        assert {r.owner for r in b.ListJobs(job_pb2.ListJobsRequest(include_finished=True)).job_records} == {"bob"}
        assert {job, mine} <= running_ids(admin)

        nowhere = str(uuid.uuid4())
        for method in ("GetJobStatus", "StopJob", "StreamJobOutput"):
            theirs = rpc_error(getattr(b, method), ID(job_id=job))
            missing = rpc_error(getattr(b, method), ID(job_id=nowhere))
            assert theirs.code() == missing.code() == Code.NOT_FOUND, method
            assert theirs.details().replace(job, "ID") == missing.details().replace(nowhere, "ID"), method
        assert a.status(job).state == State.RUNNING  # bob's StopJob did nothing

        started = time.monotonic()
        assert admin.StopJob(ID(job_id=job)).status == job_pb2.StopResponse.STOPPED
        assert time.monotonic() - started < 5
        record = a.status(job)
        assert record.state == State.STOPPED and record.owner == "alice"
        assert admin.status(job).job_id == job
        assert job not in running_ids(a) and job in all_ids(a) and job not in all_ids(b)
    finally:
        ensure_stopped(admin, job)
        ensure_stopped(admin, mine)


# --- input validation -----------------------------------------------------------------------


def test_bad_start_requests(admin, alice, daemon):
    stub = daemon.stub(alice)
    cases = [
        (dict(job_command=""), Code.INVALID_ARGUMENT, "empty"),
        (dict(job_command="   "), Code.INVALID_ARGUMENT, "empty"),
        (dict(job_command="ec\0ho"), Code.INVALID_ARGUMENT, "NUL"),
        (dict(job_command="echo", job_arguments=["a\0b"]), Code.INVALID_ARGUMENT, "NUL"),
        (dict(job_command="true", job_arguments=["x"] * 5000), Code.INVALID_ARGUMENT, "arguments"),
        (dict(job_command="true", job_arguments=["x" * (1 << 20)]), Code.INVALID_ARGUMENT, "arguments"),
        (dict(job_command="true", cpu_shares=1), Code.INVALID_ARGUMENT, "cpu shares"),
        (dict(job_command="true", cpu_shares=262145), Code.INVALID_ARGUMENT, "cpu shares"),
        (dict(job_command="true", cpu_shares=2**32 - 1), Code.INVALID_ARGUMENT, "cpu shares"),
        (dict(job_command="true", memory_limit_in_bytes=1), Code.INVALID_ARGUMENT, "memory"),
        (dict(job_command="true", memory_limit_in_bytes=(1 << 20) - 1), Code.INVALID_ARGUMENT, "memory"),
        (dict(job_command="true", memory_limit_in_bytes=2**64 - 1), Code.INVALID_ARGUMENT, "memory"),
        (dict(job_command="true", disk_read_iops_limit="/dev/null:5"), Code.INVALID_ARGUMENT, "/dev/null"),
        (dict(job_command="true", disk_write_iops_limit="nosuch:3"), Code.INVALID_ARGUMENT, "nosuch"),
        (dict(job_command="true", disk_read_iops_limit="/dev/vda"), Code.INVALID_ARGUMENT, "IOPS"),
        (dict(job_command="true", disk_read_iops_limit="/dev/vda:0"), Code.INVALID_ARGUMENT, "IOPS"),
        (dict(job_command="true", disk_read_iops_limit="/dev/vda:x"), Code.INVALID_ARGUMENT, "IOPS"),
        (dict(job_command="true", disk_read_iops_limit="999:999:5"), Code.INVALID_ARGUMENT, "999:999"),
        (dict(job_command="true", disk_write_iops_limit="/etc/passwd:5"), Code.INVALID_ARGUMENT, "block"),
        (dict(job_command="/nonexistent/cmd"), Code.FAILED_PRECONDITION, "/nonexistent/cmd"),
        (dict(job_command="no-such-command-xyz"), Code.FAILED_PRECONDITION, "no-such-command-xyz"),
        (dict(job_command="/etc/passwd"), Code.FAILED_PRECONDITION, "/etc/passwd"),
        (dict(job_command="/"), Code.FAILED_PRECONDITION, "'/'"),
    ]
    before = all_ids(admin)
    failures = []
    for fields, expected, needle in cases:
        try:
            stub.StartJob(job_pb2.StartRequest(**fields))
            failures.append(f"{fields}: started a job")
            continue
        except grpc.RpcError as err:
            shown = {k: (v if len(str(v)) < 60 else f"{str(v)[:20]}...") for k, v in fields.items()}
            if err.code() != expected or needle not in err.details():
                failures.append(f"{shown}: {err.code().name} {err.details()!r}, expected {expected.name} "
                                f"mentioning {needle!r}")
    assert all_ids(admin) == before, "a refused StartJob left a job record"
    assert not failures, "\n".join(failures)


def test_good_limits_are_accepted_and_recorded(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("true", cpu_shares=2, memory_limit_in_bytes=64 << 20,
                     disk_read_iops_limit="/dev/vda:100", disk_write_iops_limit="254:0:50")
    record = wait_ended(stub, job)
    assert record.state == State.EXITED and record.exit_code == 0, record
    assert (record.cpu_shares, record.memory_limit_in_bytes) == (2, 64 << 20)
    assert record.disk_read_iops_limit == "/dev/vda:100" and record.disk_write_iops_limit == "254:0:50"
    default = stub.start("true")
    assert stub.status(default).cpu_shares == 1024  # 0 means the default


@pytest.mark.parametrize("job_id, expected", [
    ("", Code.INVALID_ARGUMENT),
    ("abc", Code.INVALID_ARGUMENT),
    ("../../etc/passwd", Code.INVALID_ARGUMENT),
    (str(uuid.uuid4()).upper(), Code.INVALID_ARGUMENT),
    (str(uuid.uuid1()), Code.INVALID_ARGUMENT),
    (str(uuid.uuid4()) + "x", Code.INVALID_ARGUMENT),
    ("x" * 10000, Code.INVALID_ARGUMENT),
    (str(uuid.uuid4()), Code.NOT_FOUND),
], ids=["empty", "abc", "traversal", "upper", "uuid1", "suffix", "huge", "unknown"])
def test_bad_job_ids(daemon, alice, job_id, expected):
    stub = daemon.stub(alice)
    for method in ("GetJobStatus", "StopJob", "StreamJobOutput"):
        err = rpc_error(getattr(stub, method), ID(job_id=job_id))
        assert err.code() == expected, (method, err)
        assert len(err.details()) < 300  # a huge id is not echoed back in full


# --- jobs end to end ------------------------------------------------------------------------


def test_stream_gets_every_line(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("sh", "-c", "for i in $(seq 1 50); do echo line $i; sleep 0.02; done")
    assert stub.output(job) == "".join(f"line {i}\n" for i in range(1, 51)).encode()
    record = stub.status(job)  # the stream ends only after the job has ended
    assert record.state == State.EXITED and record.exit_code == 0 and record.HasField("job_end")


def test_stderr_is_merged_and_exit_code_and_signal(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("sh", "-c", "echo out; echo err >&2; exit 5")
    assert stub.output(job) == b"out\nerr\n"
    record = stub.status(job)
    assert record.state == State.EXITED and record.exit_code == 5 and not record.HasField("signal")
    job = stub.start("sh", "-c", "kill -9 $$")
    assert stub.output(job) == b""
    record = stub.status(job)
    assert record.state == State.KILLED and record.signal == 9 and not record.HasField("exit_code")


def test_stop_a_long_job(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("sleep", "100")
    assert stub.status(job).state == State.RUNNING
    started = time.monotonic()
    assert stub.StopJob(ID(job_id=job)).status == job_pb2.StopResponse.STOPPED
    assert time.monotonic() - started < 3  # TERM works; the 1 s grace is the most KILL adds
    record = stub.status(job)
    assert record.state == State.STOPPED and record.HasField("job_end")
    assert job not in running_ids(stub)
    # stopping again is harmless and still says STOPPED
    assert stub.StopJob(ID(job_id=job)).status == job_pb2.StopResponse.STOPPED


def test_stop_a_job_that_ignores_term(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done")
    deadline = time.monotonic() + 10
    while b"ready" not in _first_chunk(stub, job) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert stub.StopJob(ID(job_id=job)).status == job_pb2.StopResponse.STOPPED
    assert 0.8 < time.monotonic() - started < 5  # the grace period, then KILL
    assert stub.status(job).state == State.STOPPED


def _first_chunk(stub, job_id: str) -> bytes:
    call = stub.StreamJobOutput(ID(job_id=job_id))
    try:
        return next(call).output
    except StopIteration:
        return b""
    finally:
        call.cancel()


def test_concurrent_streams_get_identical_bytes(daemon, alice):
    stub = daemon.stub(alice)
    expected = seq_bytes(700_000)  # about 4.8 MB
    job = stub.start("sh", "-c", "sleep 0.5; seq 1 700000")
    results: list[bytes | Exception] = [b""] * 20
    channels = [daemon.channel() for _ in range(4)]

    def read(i: int) -> None:
        try:
            results[i] = daemon.stub(alice, channels[i % len(channels)]).output(job)
        except Exception as err:  # noqa: BLE001 - reported below
            results[i] = err

    threads = [threading.Thread(target=read, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for ch in channels:
        ch.close()
    assert not any(t.is_alive() for t in threads)
    bad = [(i, r if isinstance(r, Exception) else len(r)) for i, r in enumerate(results) if r != expected]
    assert not bad, f"{len(expected)} bytes expected; got {bad}"
    assert stub.status(job).exit_code == 0


def test_stream_after_the_job_ended(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("seq", "1", "20000")
    wait_ended(stub, job)
    started = time.monotonic()
    assert stub.output(job) == seq_bytes(20000)
    assert time.monotonic() - started < 5


def test_empty_output_stream_completes(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("true")
    assert stub.output(job) == b""
    assert stub.output(job) == b""


def test_cancelled_stream_disturbs_nobody(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("sh", "-c", "for i in $(seq 1 100); do echo line $i; sleep 0.01; done")
    expected = "".join(f"line {i}\n" for i in range(1, 101)).encode()
    results = {}

    def read(name: str) -> None:
        results[name] = daemon.stub(alice).output(job)

    readers = [threading.Thread(target=read, args=(n,)) for n in ("a", "b")]
    for t in readers:
        t.start()
    cancelled = stub.StreamJobOutput(ID(job_id=job))
    first = next(cancelled).output
    assert first.startswith(b"line 1\n")
    cancelled.cancel()
    with pytest.raises(grpc.RpcError) as info:
        for _ in cancelled:
            pass
    assert info.value.code() == Code.CANCELLED
    for t in readers:
        t.join(30)
    assert results == {"a": expected, "b": expected}
    record = stub.status(job)
    assert record.state == State.EXITED and record.exit_code == 0
    assert stub.output(job) == expected


def test_job_start_timestamp_and_record(daemon, alice):
    stub = daemon.stub(alice)
    before = time.time()
    response = stub.StartJob(job_pb2.StartRequest(job_command="echo", job_arguments=["a b", "-n", ""]))
    assert UUID4.match(response.job_id)
    assert before - 1 < response.job_start.ToNanoseconds() / 1e9 < time.time() + 1
    assert stub.output(response.job_id) == b"a b -n \n"
    record = stub.status(response.job_id)
    assert record.job_command == "echo" and list(record.job_arguments) == ["a b", "-n", ""]
    assert record.owner == "alice" and record.job_start == response.job_start
    assert record.job_end.ToNanoseconds() >= record.job_start.ToNanoseconds()


# --- robustness -----------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_commands = st.one_of(_text, st.sampled_from(["", " ", "true", "/bin/true", "echo", "env", "nosuch", "/", "/etc",
                                              "/etc/passwd", "/dev/null", "\0", "true\0", "../../bin/true"]))
_args = st.one_of(st.lists(_text, max_size=20),
                  st.integers(0, 6000).map(lambda n: ["x"] * n),
                  st.integers(0, 1_100_000).map(lambda n: ["y" * n]))
_iops = st.one_of(_text, st.sampled_from(["", "/dev/vda:100", "254:0:10", "/dev/null:5", "nosuch:3", ":5", "/dev/vda:0",
                                          "/dev/vda:99999999999999", "7:0:1", "/dev/loop0:5", "a\0:5", "/dev/vda\0:5",
                                          "/dev/vda:-1", "1:3:5", "0:0:1", "/proc/self/fd/0:1", "/dev/vda: 5"]))
_shares = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 1024, 262144, 262145]))
_memory = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, (1 << 20) - 1, 1 << 20, 1 << 62, (1 << 62) + 1]))
_job_ids = st.one_of(_text, st.uuids(version=4).map(str), st.uuids().map(str),
                     st.uuids(version=4).map(lambda u: f"{u}\n"), st.uuids(version=4).map(lambda u: f" {u}"))
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION}


def _code(call, *args):
    try:
        result = call(*args)
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            for _ in result:
                pass
        return Code.OK, result
    except grpc.RpcError as err:
        return err.code(), err


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(command=_commands, args=_args, shares=_shares, memory=_memory, read=_iops, write=_iops, job_id=_job_ids)
def test_arbitrary_requests_get_clean_answers(daemon, alice, command, args, shares, memory, read, write, job_id):
    stub = daemon.stub(alice, _shared_channel(daemon))
    request = job_pb2.StartRequest(job_command=command, job_arguments=args, cpu_shares=shares,
                                   memory_limit_in_bytes=memory, disk_read_iops_limit=read,
                                   disk_write_iops_limit=write)
    code, result = _code(stub.StartJob, request)
    if code == Code.OK:
        code, _ = _code(stub.StopJob, ID(job_id=result.job_id))
        assert code == Code.OK
        assert stub.status(result.job_id).state != State.RUNNING
    assert code in ALLOWED, f"StartJob: {code.name}: {result.details() if code != Code.OK else ''}"
    for method in ("GetJobStatus", "StopJob"):
        code, result = _code(getattr(stub, method), ID(job_id=job_id))
        assert code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), f"{method}({job_id!r}): {code.name}"


_channels: dict[int, grpc.Channel] = {}


def _shared_channel(daemon) -> grpc.Channel:
    if daemon.port not in _channels:
        _channels[daemon.port] = daemon.channel()
    return _channels[daemon.port]


@pytest.mark.parametrize("iops", ["a\0:5", "/dev/vda\0:5"], ids=["nul-device", "nul-after-device"])
def test_nul_in_device_path_is_invalid_argument(daemon, alice, iops):
    stub = daemon.stub(alice)
    for field in ("disk_read_iops_limit", "disk_write_iops_limit"):
        err = rpc_error(stub.StartJob, job_pb2.StartRequest(job_command="true", **{field: iops}))
        assert err.code() == Code.INVALID_ARGUMENT, (field, err.code(), err.details())


@pytest.mark.parametrize("char, count", [("a", 100), ("\u00e9", 40)], ids=["ascii-300k", "non-ascii-120k-chars"])
def test_big_argument_lists_within_the_limits_run(daemon, alice, char, count):
    """Arguments under the server's own limit (4096 args, 1 MiB) and the kernel's (128 KiB per
    argument, ARG_MAX in all) must run the job, not fail inside the daemon."""
    stub = daemon.stub(alice)
    args = [char * 3000] * count
    try:
        job = stub.start("echo", *args)
    except grpc.RpcError as err:
        pytest.fail(f"StartJob with {count} x 3000 {char!r}: {err.code().name}: {err.details()}")
    assert stub.output(job) == (" ".join(args) + "\n").encode()


def test_garbage_bytes_do_not_hurt_the_daemon(daemon, alice):
    channel = daemon.channel()
    metadata = [("authorization", f"Bearer {alice}")]
    rng = random.Random(1234)
    blobs = [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc", bytes(range(256)),
             *(rng.randbytes(rng.randrange(1, 2000)) for _ in range(30))]
    for method in ("StartJob", "GetJobStatus", "StopJob", "ListJobs"):
        raw = channel.unary_unary(f"/job.JobService/{method}", request_serializer=None, response_deserializer=None)
        for blob in blobs:
            try:
                raw(blob, metadata=metadata, timeout=10)
            except grpc.RpcError as err:
                assert err.code() not in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED), err
    stream = channel.unary_stream("/job.JobService/StreamJobOutput", request_serializer=None,
                                  response_deserializer=None)
    for blob in blobs[:5]:
        try:
            list(stream(blob, metadata=metadata, timeout=10))
        except grpc.RpcError as err:
            assert err.code() not in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED), err
    unknown = channel.unary_unary("/job.JobService/NoSuchMethod", request_serializer=None, response_deserializer=None)
    assert code_of(unknown, b"", metadata=metadata, timeout=10) == Code.UNIMPLEMENTED
    channel.close()
    assert daemon.proc.poll() is None
    stub = daemon.stub(alice)
    job = stub.start("echo", "still alive")
    assert stub.output(job) == b"still alive\n"


# --- audit ----------------------------------------------------------------------------------


def test_audit_lines(daemon, alice):
    stub = daemon.stub(alice)
    job = stub.start("true")
    wait_for_log(daemon, rf"ijr\.audit .*user=alice method=StartJob job={job} outcome=OK")
    stub.output(job)
    wait_for_log(daemon, rf"ijr\.audit .*user=alice method=StreamJobOutput job={job} outcome=OK")
    missing = str(uuid.uuid4())
    rpc_error(stub.GetJobStatus, ID(job_id=missing))
    wait_for_log(daemon, rf"ijr\.audit .*user=alice method=GetJobStatus job={missing} outcome=NOT_FOUND")
    rpc_error(daemon.stub("f" * 64).StopJob, ID(job_id=job))
    wait_for_log(daemon, rf"ijr\.audit .*user=- method=StopJob job={job} outcome=UNAUTHENTICATED")
    rpc_error(daemon.stub(None).ListJobs, job_pb2.ListJobsRequest())
    log = wait_for_log(daemon, r"ijr\.audit .*user=- method=ListJobs job=- outcome=UNAUTHENTICATED")
    assert alice not in log, "a token was written to the log"


def test_audit_lines_cannot_be_forged(daemon, alice):
    """A job id is the caller's text: a newline in it must not start a line of its own."""
    forged = "2026-01-01 00:00:00,000 ijr.audit INFO user=admin method=StopJob job=forged outcome=OK"
    rpc_error(daemon.stub(alice).StopJob, ID(job_id="nope\n" + forged + "x" * 10000))
    log = wait_for_log(daemon, r"ijr\.audit .*user=alice method=StopJob job=nope\\n2026.* outcome=INVALID_ARGUMENT")
    assert not any(line.startswith(forged) for line in log.splitlines())
    assert max(len(line) for line in log.splitlines() if "ijr.audit" in line) < 400


# --- restart --------------------------------------------------------------------------------


def start_running(stub, marker: str) -> str:
    """A long job, returned once it has printed `marker`: it is surely running by then."""
    job_id = stub.start("sh", "-c", f"echo {marker}; sleep 100")
    while marker.encode() not in _first_chunk(stub, job_id):
        time.sleep(0.02)
    return job_id


def test_restart_keeps_finished_jobs_and_ends_running_ones(pki, admin_token, tmp_path):
    state = str(tmp_path / "state")
    first = Daemon(pki, state)
    try:
        stub = first.stub(admin_token)
        done = stub.start("sh", "-c", "echo kept; exit 4")
        assert stub.output(done) == b"kept\n"
        quiet = stub.start("true")
        wait_ended(stub, quiet)
        running = start_running(stub, "before")
        stub.channel.close()
    finally:
        code = first.stop()
    assert code == 0, first.read_log()
    assert not cgroups_of(done, quiet, running)

    second = Daemon(pki, state)
    try:
        stub = second.stub(admin_token)
        record = stub.status(done)
        assert record.state == State.EXITED and record.exit_code == 4
        assert stub.output(done) == b"kept\n"
        assert stub.output(quiet) == b""
        record = stub.status(running)
        assert record.state == State.KILLED and "ijrd was shutting down" in record.error, record
        assert record.HasField("job_end")
        assert stub.output(running) == b"before\n"
        assert running_ids(stub) == set()
        assert {done, quiet, running} <= all_ids(stub)
        assert not cgroups_of(done, quiet, running)
        new = stub.start("echo", "again")
        assert stub.output(new) == b"again\n"
        stub.channel.close()
    finally:
        assert second.stop() == 0, second.read_log()


def test_restart_after_a_crash(pki, admin_token, tmp_path):
    """SIGKILL the daemon: its running job must not survive, and the next daemon marks it ended."""
    import signal
    state = str(tmp_path / "state")
    first = Daemon(pki, state)
    try:
        stub = first.stub(admin_token)
        running = start_running(stub, "up")
        stub.channel.close()
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.stop()
    # The spawner dies with the daemon (PDEATHSIG), its inits see their lifeline close and end
    # their jobs: no job outlives its daemon, even before a successor sweeps.
    deadline = time.monotonic() + 5
    while job_pids(running) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job_pids(running), "the job outlived its SIGKILLed daemon"
    second = Daemon(pki, state)
    try:
        stub = second.stub(admin_token)
        record = stub.status(running)
        assert record.state in (State.KILLED, State.STOPPED), record
        assert stub.output(running) == b"up\n"
        assert not cgroups_of(running)
        assert not job_pids(running), "job processes survived the daemon and its successor's sweep"
        stub.channel.close()
    finally:
        assert second.stop() == 0, second.read_log()


def test_a_second_daemon_leaves_a_live_daemons_jobs_alone(daemon, admin, pki, tmp_path):
    """Starting another ijrd on the host (own state dir and port) must not kill the first one's jobs.

    Its start-up sweep of "leftover" cgroups must only touch cgroups of jobs it owns; this
    suite itself runs private daemons next to the session one.
    """
    job = admin.start("sleep", "100")
    try:
        other = Daemon(pki, str(tmp_path / "state"))
        assert other.stop() == 0, other.read_log()
        time.sleep(0.2)
        record = admin.status(job)
        assert record.state == State.RUNNING, f"the other daemon's start-up ended our job: {record}"
    finally:
        ensure_stopped(admin, job)


def cgroups_of(*job_ids: str) -> list[str]:
    """The job cgroups (leftover_cgroups) of these jobs. Only theirs: other daemons may share the host."""
    return [path for path in leftover_cgroups() if os.path.basename(path) in job_ids]


def job_pids(job_id: str) -> list[int]:
    """Host pids of the processes of a job, found by the IJR_JOB_ID in their environment."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if f"IJR_JOB_ID={job_id}".encode() in f.read().split(b"\0"):
                        pids.append(int(name))
            except OSError:
                pass
    return pids


def test_spawner_death_ends_jobs_and_daemon(pki, admin_token, tmp_path):
    """If the spawner dies, its jobs' inits see their lifeline close and end their jobs, and
    ijrd, which can no longer start jobs, exits non-zero rather than serve a broken API."""
    import signal
    d = Daemon(pki, str(tmp_path / "state"))
    try:
        stub = d.stub(admin_token)
        running = start_running(stub, "up")
        stub.channel.close()
        with open(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children") as f:
            (spawner_pid,) = (int(p) for p in f.read().split())
        os.kill(spawner_pid, signal.SIGKILL)
        assert d.proc.wait(timeout=30) == 1
        assert "the spawner process died" in d.read_log()
        deadline = time.monotonic() + 5
        while job_pids(running) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not job_pids(running), "the job outlived its spawner"
        assert not cgroups_of(running)
    finally:
        d.stop()
