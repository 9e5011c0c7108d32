"""What every benchmark shares: sizes, statistics, result rows, a PKI, a real ijrd, clients,
and readings of a process's CPU time and memory from /proc.

Importing this module imports grpc, so it first restricts TLS to 1.3 (ijr.tls must run before
the process's first `import grpc`). This process never forks without exec: it only starts
subprocesses (no preexec_fn), which grpc tolerates.
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from ijr import tls  # noqa: E402

tls.restrict_to_tls13()
import grpc  # noqa: E402

from ijr import cgroup, init  # noqa: E402
from ijr.gen import job_pb2, job_pb2_grpc  # noqa: E402

SERVER_NAME = "localhost"  # in the certificate `ijr init` makes; we dial 127.0.0.1
ADMIN = "admin"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RPC_TIMEOUT = 120.0


# ---- sizes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is: the issue's sizes, or tiny ones for a smoke run."""

    spawns: int
    stream_bytes: int
    stream_runs: int
    fanout_readers: int
    fanout_bytes: int
    fanout_runs: int
    density_jobs: int
    list_calls: int
    cli_runs: int


FULL = Sizes(spawns=200, stream_bytes=1 << 30, stream_runs=3, fanout_readers=50, fanout_bytes=100_000_000,
             fanout_runs=3, density_jobs=1000, list_calls=20, cli_runs=10)
QUICK = Sizes(spawns=10, stream_bytes=20_000_000, stream_runs=1, fanout_readers=5, fanout_bytes=5_000_000,
              fanout_runs=1, density_jobs=20, list_calls=20, cli_runs=3)


# ---- statistics and results --------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: p99 of 200 samples is the 198th, a value that was measured."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil without floats going astray
    return ordered[int(rank) - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def runs_text(values: list[float], digits: int = 0) -> str:
    """Every run's figure, for the notes under the table: the spread says how far to trust a median."""
    return " ".join(f"{v:.{digits}f}" for v in values)


def timed(action: Callable[[], object]) -> float:
    """Wall seconds one call takes."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


@dataclass(frozen=True)
class Goal:
    """`ratio <= 1.5` and the like; absolute goals (MiB per job) use the same shape."""

    op: str  # "<=" or ">="
    limit: float
    unit: str = "x"

    def met(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}{self.unit}"


@dataclass
class Row:
    """One line of the table. `ratio` is IJR over the baseline; None when it means nothing."""

    benchmark: str
    ijr: str
    baseline: str
    ratio: float | None
    goal: Goal | None = None
    goal_value: float | None = None  # what the goal judges when it is not the ratio
    notes: list[str] = field(default_factory=list)

    @property
    def met(self) -> str:
        value = self.goal_value if self.goal_value is not None else self.ratio
        if self.goal is None or value is None:
            return "-"
        return "yes" if self.goal.met(value) else "NO"


# ---- /proc readings ----------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), not of its reaped children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages count once in total over all their sharers."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass  # it ended meanwhile
    return 0


def children(pid: int) -> list[int]:
    """Direct children of a process's main thread (where ijrd forks its spawner)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def job_pids(job_id: str) -> list[int]:
    """Every process of a job, from its cgroup (v1: the pids controller's copy; v2: the one)."""
    parents = sorted(cgroup.detect().parents(), key=lambda p: "/pids/" not in p)
    for parent in parents:
        try:
            with open(os.path.join(parent, job_id, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- PKI, channels, clients --------------------------------------------------------------

class Pki:
    """What `ijr init` makes, in a directory of our own: the daemon's and the client's files."""

    def __init__(self, directory: str):
        etc = os.path.join(directory, "etc")
        self.config = os.path.join(directory, "ctl.json")
        init.create(etc, SERVER_NAME, ADMIN, self.config)
        self.ca, self.tokens, self.secret_file = f"{etc}/ca.pem", f"{etc}/tokens", f"{etc}/secret"
        self.server_cert, self.server_key = f"{etc}/server.pem", f"{etc}/server.key"
        self.client_cert, self.client_key = f"{etc}/client.pem", f"{etc}/client.key"
        with open(self.config) as f:
            self.token = json.load(f)["token"]

    def ctl_config(self, port: int, path: str) -> str:
        """An ijrctl config pointing at a daemon on `port`; returns its path."""
        with open(self.config) as f:
            config = dict(json.load(f), port=port)
        with open(path, "w") as f:
            json.dump(config, f)
        os.chmod(path, 0o600)
        return path

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()
        return grpc.ssl_channel_credentials(read(self.ca), read(self.client_key), read(self.client_cert))

    def channel(self, port: int, aio: bool = False):
        """A mutual-TLS channel to 127.0.0.1:port; the certificate names `localhost`."""
        options = [("grpc.ssl_target_name_override", SERVER_NAME)]
        factory = grpc.aio.secure_channel if aio else grpc.secure_channel
        return factory(f"127.0.0.1:{port}", self.credentials(), options=options)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata ijrd wants on every RPC."""
    return (("authorization", f"Bearer {token}"),)


class Client:
    """JobService calls with the bearer token, on a sync channel that stays warm."""

    def __init__(self, channel: grpc.Channel, token: str):
        self.channel = channel
        self.stub = job_pb2_grpc.JobServiceStub(channel)
        self.metadata = bearer(token)

    def start(self, command: str, *args: str) -> str:
        request = job_pb2.StartRequest(job_command=command, job_arguments=args)
        return self.stub.StartJob(request, metadata=self.metadata, timeout=RPC_TIMEOUT).job_id

    def status(self, job_id: str) -> job_pb2.JobRecord:
        return self.stub.GetJobStatus(job_pb2.JobIdentifier(job_id=job_id), metadata=self.metadata,
                                      timeout=RPC_TIMEOUT)

    def list(self) -> Sequence[job_pb2.JobRecord]:
        """The running jobs' records (as received: no copy, so timing it times the RPC)."""
        return self.stub.ListJobs(job_pb2.ListJobsRequest(), metadata=self.metadata,
                                  timeout=RPC_TIMEOUT).job_records

    def stream(self, job_id: str) -> int:
        """Read a job's output to its end; returns the byte count.

        The stream ends only once the job has ended, so the status is final afterwards.
        """
        total = 0
        for message in self.stub.StreamJobOutput(job_pb2.JobIdentifier(job_id=job_id), metadata=self.metadata):
            total += len(message.output)
        return total

    def wait_final(self, job_id: str) -> job_pb2.JobRecord:
        """Wait for a job's end and return its final record, which must say exit 0.

        Streaming its output to the end waits without polling (no busy RPCs, no sleep
        granularity): the stream ends once the record is final. One GetJobStatus reads it.
        """
        self.stream(job_id)
        record = self.status(job_id)
        if record.state != job_pb2.JobRecord.EXITED or record.exit_code != 0:
            raise RuntimeError(f"job {job_id} ({record.job_command}) ended badly: {record}")
        return record

    def run_to_end(self, command: str, *args: str) -> job_pb2.JobRecord:
        return self.wait_final(self.start(command, *args))

    def close(self) -> None:
        self.channel.close()


# ---- subprocesses ------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen, timeout: float, sig: int = signal.SIGTERM) -> int | None:
    """Signal a child and wait; SIGKILL it if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Daemon:
    """A real ijrd subprocess on a free loopback port, with its own state directory.

    stop() ends it with SIGTERM, which stops its running jobs; should it not exit, it is
    killed and the cgroups of the jobs it started (named in its state directory) removed.
    """

    STOP_TIMEOUT = 300.0  # 1,000 jobs take a while to stop on two cores

    def __init__(self, pki: Pki, workdir: str):
        self.pki = pki
        self.port = free_port()
        self.state_dir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, "ijrd.log")
        args = [sys.executable, "-m", "ijr", "daemon", "--server", SERVER_NAME, "--listen", "127.0.0.1",
                "--port", str(self.port), "--cert", pki.server_cert, "--key", pki.server_key, "--ca", pki.ca,
                "--secret-file", pki.secret_file, "--tokens", pki.tokens, "--state-dir", self.state_dir,
                "--admin", ADMIN, "--stop-grace", "1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
            self.spawner_pid = self._find_spawner()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ijrd exited {self.proc.returncode}: {self.log()}")
            if b"serving on" in self._log_bytes():
                return
            time.sleep(0.02)
        raise RuntimeError(f"ijrd not ready in {timeout:g} s: {self.log()}")

    def _find_spawner(self) -> int:
        for pid in children(self.proc.pid):
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "ijr-spawner":
                    return pid
        raise RuntimeError("ijrd has no ijr-spawner child")

    def _log_bytes(self) -> bytes:
        with open(self.log_path, "rb") as f:
            return f.read()

    def log(self) -> str:
        return self._log_bytes()[-4000:].decode(errors="replace")

    def client(self) -> Client:
        return Client(self.pki.channel(self.port), self.pki.token)

    def cpu_seconds(self) -> float:
        """The daemon's and its spawner's own CPU time. Not the spawner's reaped children:
        those include the jobs' commands, which are the user's cost, not IJR's."""
        return cpu_seconds(self.proc.pid) + cpu_seconds(self.spawner_pid)

    def pss_kib(self) -> int:
        return pss_kib(self.proc.pid) + pss_kib(self.spawner_pid)

    def job_ids(self) -> list[str]:
        jobs = os.path.join(self.state_dir, "jobs")
        return os.listdir(jobs) if os.path.isdir(jobs) else []

    def stop(self) -> None:
        killed = stop_process(self.proc, self.STOP_TIMEOUT) != 0
        if killed:
            print(f"bench: ijrd did not stop cleanly: {self.log()}", file=sys.stderr)
        self._remove_leftover_cgroups()

    def _remove_leftover_cgroups(self) -> None:
        """Only our own jobs' cgroups: other daemons on this host may have theirs under ijr/.

        ijrd should leave none; when it does (its clean-up lost a race, see its log), we say so.
        """
        kind = cgroup.detect()
        left = [job_id for job_id in self.job_ids()
                if any(os.path.isdir(os.path.join(parent, job_id)) for parent in kind.parents())]
        for job_id in left:
            kind(job_id).remove()
        if left:
            failures = [line for line in self._log_bytes().decode(errors="replace").splitlines()
                        if "cgroup clean-up failed" in line]
            print(f"bench: ijrd left the cgroups of {len(left)} of its {len(self.job_ids())} jobs behind "
                  f"(removed now); it logged {len(failures)} clean-up failures"
                  + (f", e.g. {failures[0]}" if failures else ""), file=sys.stderr)


class Workspace:
    """The run's temporary directory, its PKI, and fresh daemons that always get stopped."""

    def __init__(self, directory: str, sizes: Sizes):
        self.dir = directory
        self.sizes = sizes
        self.pki = Pki(os.path.join(directory, "pki"))
        self._count = 0

    def subdir(self, name: str) -> str:
        self._count += 1
        path = os.path.join(self.dir, f"{self._count:02d}-{name}")
        os.mkdir(path)
        return path

    @contextlib.contextmanager
    def daemon(self, name: str) -> Iterator[Daemon]:
        """A fresh ijrd for one benchmark, so no benchmark sees another's jobs or memory."""
        workdir = self.subdir(name)
        daemon = Daemon(self.pki, workdir)
        try:
            yield daemon
        finally:
            daemon.stop()
            shutil.rmtree(daemon.state_dir, ignore_errors=True)  # outputs can be GiBs
