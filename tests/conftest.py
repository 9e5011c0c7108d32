"""Shared fixtures: a real PKI from `ijr init`, a real ijrd on loopback, real TLS clients.

The spawner used by in-process engine tests is forked here, at import, before any test
module imports grpc (grpc must never fork without exec), and the TLS 1.3 restriction is set
for this process's gRPC clients for the same reason.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ijr import tls

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0

tls.restrict_to_tls13()
from ijr.spawner import Spawner  # noqa: E402

SPAWNER = Spawner() if IS_ROOT else None

import grpc  # noqa: E402

from ijr import cgroup, init, token  # noqa: E402
from ijr.gen import job_pb2, job_pb2_grpc  # noqa: E402

needs_root = pytest.mark.skipif(not IS_ROOT, reason="jobs need root: namespaces and cgroups")


def pytest_sessionfinish(session, exitstatus):
    if SPAWNER is not None:
        SPAWNER.close()


@pytest.fixture(scope="session")
def spawner() -> Spawner:
    if SPAWNER is None:
        pytest.skip("jobs need root: namespaces and cgroups")
    return SPAWNER


@pytest.fixture
def manager(spawner, tmp_path):
    """A JobManager on a fresh state dir; use it inside `run(...)`."""
    from ijr.jobs import JobManager
    m = JobManager(str(tmp_path / "state"), spawner, grace=1.0, pids_max=256)
    m.load()
    return m


def run(coro):
    """Run a coroutine on a fresh loop (the engine is asyncio; pytest here is not)."""
    return asyncio.run(coro)


def leftover_cgroups() -> list[str]:
    kind = cgroup.detect()
    return [os.path.join(p, n) for p in kind.parents() if os.path.isdir(p)
            for n in os.listdir(p) if os.path.isdir(os.path.join(p, n))]


class Pki:
    """Everything `ijr init` makes, plus a way to issue tokens for more users."""

    def __init__(self, directory: str):
        self.dir = directory
        self.config = os.path.join(directory, "ctl.json")
        self.ijrd_line = init.create(os.path.join(directory, "etc"), "localhost", "admin", self.config)
        etc = os.path.join(directory, "etc")
        self.ca, self.tokens, self.secret_file = f"{etc}/ca.pem", f"{etc}/tokens", f"{etc}/secret"
        self.server_cert, self.server_key = f"{etc}/server.pem", f"{etc}/server.key"
        self.client_cert, self.client_key = f"{etc}/client.pem", f"{etc}/client.key"
        self.secret = token.read_secret(None, self.secret_file)

    def issue(self, user: str, ttl: int | None = None) -> str:
        data = token.generate(user, self.secret, ttl)
        token.save(data, self.tokens)
        return data.accessToken


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return Pki(str(tmp_path_factory.mktemp("pki")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A real ijrd subprocess on loopback."""

    def __init__(self, pki: Pki, state_dir: str, *extra: str):
        self.pki = pki
        self.port = free_port()
        self.state_dir = state_dir
        self.log_path = os.path.join(os.path.dirname(state_dir), f"ijrd-{self.port}.log")
        self.args = [sys.executable, "-m", "ijr", "daemon", "--server", "localhost", "--listen", "127.0.0.1",
                     "--port", str(self.port), "--cert", pki.server_cert, "--key", pki.server_key, "--ca", pki.ca,
                     "--secret-file", pki.secret_file, "--tokens", pki.tokens, "--state-dir", state_dir,
                     "--admin", "admin", "--stop-grace", "1", *extra]
        self.config = os.path.join(os.path.dirname(state_dir), f"ctl-{self.port}.json")
        with open(pki.config) as f:
            config = json.load(f)
        with open(self.config, "w") as f:
            json.dump(dict(config, port=self.port), f)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ijrd exited {self.proc.returncode}: {self.read_log()}")
            if b"serving on" in open(self.log_path, "rb").read():
                return
            time.sleep(0.05)
        raise RuntimeError(f"ijrd not ready in {timeout}s: {self.read_log()}")

    def read_log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()
        return self.proc.returncode

    def channel(self, cert: str | None = None, key: str | None = None, ca: str | None = None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=open(ca or self.pki.ca, "rb").read(),
            private_key=open(key or self.pki.client_key, "rb").read(),
            certificate_chain=open(cert or self.pki.client_cert, "rb").read())
        return grpc.secure_channel(f"127.0.0.1:{self.port}", creds,
                                   options=[("grpc.ssl_target_name_override", "localhost")])

    def stub(self, user_token: str | None, channel: grpc.Channel | None = None) -> "Stub":
        return Stub(channel or self.channel(), user_token)

    def ctl(self, *args: str, token_value: str | None = None, timeout: float = 60,
            input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
        """Run the real ijrctl against this daemon."""
        env = dict(os.environ, IJR_TOKEN=token_value) if token_value else dict(os.environ)
        return subprocess.run([sys.executable, "-m", "ijr", "ctl", "--config", self.config, *args],
                              cwd=REPO, env=env, capture_output=True, timeout=timeout, input=input_bytes)


class Stub:
    """JobService calls that carry a bearer token."""

    def __init__(self, channel: grpc.Channel, user_token: str | None):
        self.channel = channel
        self.raw = job_pb2_grpc.JobServiceStub(channel)
        self.metadata = [("authorization", f"Bearer {user_token}")] if user_token else []

    def __getattr__(self, name: str):
        method = getattr(self.raw, name)
        return lambda request, **kw: method(request, metadata=self.metadata, timeout=kw.pop("timeout", 60), **kw)

    def start(self, command: str, *args: str, **limits) -> str:
        return self.StartJob(job_pb2.StartRequest(job_command=command, job_arguments=args, **limits)).job_id

    def output(self, job_id: str) -> bytes:
        return b"".join(m.output for m in self.StreamJobOutput(job_pb2.JobIdentifier(job_id=job_id)))

    def status(self, job_id: str) -> job_pb2.JobRecord:
        return self.GetJobStatus(job_pb2.JobIdentifier(job_id=job_id))


@pytest.fixture(scope="session")
def daemon(pki, tmp_path_factory):
    """One ijrd for the session; tests that restart it make their own Daemon."""
    if not IS_ROOT:
        pytest.skip("ijrd needs root: namespaces and cgroups")
    d = Daemon(pki, str(tmp_path_factory.mktemp("ijrd") / "state"))
    yield d
    assert d.stop() == 0, d.read_log()


@pytest.fixture(scope="session")
def admin_token(pki) -> str:
    with open(pki.config) as f:
        return json.load(f)["token"]
