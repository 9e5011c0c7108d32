"""ijrctl, the command-line client of ijrd: start, stop, list, output and status of jobs.

Every failure is one line on stderr, `ijrctl: <what went wrong>`, never a traceback.
Exit status: 0 success; 1 failure (config, certificates, an RPC); 2 bad command-line input;
130 interrupted (Ctrl-C); 141 stdout closed early (`| head`); `start --output` exits like
`docker run`: the job's own exit code, 128 + N if a signal N ended it; 127 when `start` fails
because the command can't be executed.

Order matters: flags are checked first, then the config and certificate files are read, and
only then is grpc imported (after ijr.tls.restrict_to_tls13) and the connection made. So a
typo costs no network round trip, and `import ijr.ctl` pays for neither grpc nor cryptography.
"""
import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timezone
from typing import NoReturn

from ijr import __version__, limits, tls

DEFAULT_CONFIG = "~/.ijrctl-config"
CONFIG_KEYS = ("address", "port", "server_name", "ca", "cert", "key", "token")
TOKEN_ENV = "IJR_TOKEN"
TIMEOUT_ENV = "IJRCTL_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds per unary RPC; StopJob gets twice as long (see _stop)
COMMAND_WIDTH = 40  # widest COMMAND cell of `ijrctl list`
ID_COMMANDS = ("stop", "output", "status")

EPILOG = f"""\
environment:
  {TOKEN_ENV}        bearer token to use instead of the config's "token"
  {TIMEOUT_ENV}   seconds to wait for an answer to each request (default {DEFAULT_TIMEOUT:g})

The config is JSON with the keys {", ".join(CONFIG_KEYS)}; relative
certificate paths are relative to the config file.

exit status: 0 ok, 1 failure, 2 bad usage, 130 interrupted, 141 stdout closed;
`start --output` exits with the job's exit code, 128+N if signal N ended it;
`start` exits 127 if the command can't be executed."""


class CtlError(Exception):
    """A failure reported as one line on stderr; `status` is the exit code of ijrctl."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def main(argv: list[str]) -> int:
    """Run one ijrctl command and return its exit status (see the module docstring)."""
    try:
        args = _parse_args(argv)
        timeout = _timeout_from_env()
        config = read_config(os.path.expanduser(args.config))
        with Connection(config, timeout) as conn:
            return args.run(conn, args)
    except SystemExit as done:  # argparse, after printing --help or --version
        return done.code
    except CtlError as err:
        print(f"ijrctl: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:  # the channel is closed by now, which cancels the RPC
        return 130
    except BrokenPipeError:
        _discard_stdout()
        return 141


# --- command line ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (`ijrctl: ...`, exit 2) rather than usage + message."""

    def error(self, message: str) -> NoReturn:
        raise CtlError(f"{message} (see '{self.prog} --help')", status=2)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check every flag, so bad input fails before any file or network access."""
    args = _parser().parse_args(_glue_arg_values(argv))
    if args.subcommand in ID_COMMANDS:
        args.job = _one_job_id(args)
    return args


def _glue_arg_values(argv: list[str]) -> list[str]:
    """Turn `--arg -c` into `--arg=-c`: argparse would take '-c' for an option of ijrctl,
    while job arguments starting with '-' are the rule (`sh -c`, `ls -l`)."""
    glued = []
    words = iter(argv)
    for word in words:
        value = next(words, None) if word == "--arg" else None
        glued.append(word if value is None else f"--arg={value}")
    return glued


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ijrctl",
        description="The client of ijrd, the Isolated Job Runner daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help=f"client config (default {DEFAULT_CONFIG})")
    parser.add_argument("--version", action="version", version=f"ijrctl {__version__}")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    start = commands.add_parser("start", help="start a job and print its id")
    start.add_argument("--command", required=True, help="the program to run")
    start.add_argument("--arg", action=_AppendArg, default=[], metavar="ARG",
                       help="an argument of the command; repeat for more")
    start.add_argument("--cpu", type=_cpu_shares, default=1024, metavar="SHARES",
                       help=f"relative CPU weight, {limits.CPU_SHARES_MIN}..{limits.CPU_SHARES_MAX} (default 1024)")
    start.add_argument("--memory", type=_memory, default=0, metavar="SIZE",
                       help="memory limit, e.g. 512m or 2g (default: none)")
    start.add_argument("--disk-read-iops", type=_iops, metavar="DEV:N",
                       help="read operations per second on a device, e.g. /dev/sda:100")
    start.add_argument("--disk-write-iops", type=_iops, metavar="DEV:N",
                       help="write operations per second on a device, e.g. /dev/sda:100")
    start.add_argument("--output", action="store_true",
                       help="print the id on stderr, stream the output, exit with the job's status")
    start.set_defaults(run=_start)

    jobs = commands.add_parser("list", help="list running jobs (--all: also finished ones)")
    jobs.add_argument("--all", action="store_true", help="include jobs that have ended")
    jobs.add_argument("--json", action="store_true", help="print the records as a JSON list")
    jobs.set_defaults(run=_list)

    for name, run, summary in (
        ("stop", _stop, "stop a running job"),
        ("output", _output, "print a job's output from its beginning, following it while it runs"),
        ("status", _status, "show everything about one job"),
    ):
        sub = commands.add_parser(name, help=summary)
        sub.add_argument("job_id", nargs="?", metavar="ID", help="the job id")
        sub.add_argument("--job", metavar="ID", help="the job id (same as the positional ID)")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print the record as JSON")
        sub.set_defaults(run=run)

    return parser


def _one_job_id(args: argparse.Namespace) -> str:
    """The job id given either as --job or positionally; exactly one of them is required."""
    if args.job is not None and args.job_id is not None:
        raise CtlError(f"{args.subcommand}: give the job id once, as ID or as --job ID, not both", status=2)
    if args.job is None and args.job_id is None:
        raise CtlError(f"{args.subcommand}: which job? usage: ijrctl {args.subcommand} ID (or --job ID)", status=2)
    return args.job if args.job is not None else args.job_id


# argparse type functions: an ArgumentTypeError becomes "argument --flag: <message>".

class _AppendArg(argparse._AppendAction):
    """--arg, where a lone `--` is a value to pass on (argparse would strip it to nothing)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, "--" if values == [] else values, option_string)


def _cpu_shares(text: str) -> int:
    try:
        shares = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cpu shares must be a whole number, not {text!r}") from None
    with _flag_error():
        limits.check_cpu_shares(shares)
    return shares


def _memory(text: str) -> int:
    """Bytes; 0 means no limit."""
    with _flag_error():
        limit = limits.parse_memory(text)
        limits.check_memory(limit)
    return limit


def _iops(text: str) -> str:
    """Syntax only, normalised to DEV:N: only the server can tell whether the device exists."""
    with _flag_error():
        device, iops = limits.split_iops(text)
    return f"{device}:{iops}"


@contextmanager
def _flag_error() -> Iterator[None]:
    """Let argparse report ijr.limits' message as the flag's error."""
    try:
        yield
    except limits.LimitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _timeout_from_env() -> float:
    """Seconds to wait for each unary RPC: IJRCTL_TIMEOUT, or 30."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(text)
    except ValueError:
        timeout = 0.0  # rejected just below, with the same message
    if not 0 < timeout < math.inf:  # NaN fails this too
        raise CtlError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {text!r}", status=2)
    return timeout


# --- config and connection ------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What a connection needs: where ijrd is, the certificates (PEM bytes) and the token."""

    target: str  # address:port
    server_name: str  # the name in ijrd's certificate
    ca: bytes
    cert: bytes
    key: bytes
    token: str


def read_config(path: str) -> Config:
    """Read the JSON config and the certificate files it names; every error names the file."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as err:
        raise CtlError(f"cannot read config {path}: {err.strerror}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CtlError(f"config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CtlError(f"config {path} must be a JSON object, not {type(data).__name__}")

    token = os.environ.get(TOKEN_ENV) or data.get("token")
    missing = [key for key in CONFIG_KEYS if key not in data and not (key == "token" and token)]
    if missing:
        raise CtlError(f"config {path} lacks {', '.join(map(repr, missing))}")
    strings = {key: data[key] for key in ("address", "server_name", "ca", "cert", "key")}
    for key, value in {**strings, "token": token}.items():
        if not isinstance(value, str) or not value.strip():
            raise CtlError(f"config {path}: {key!r} must be a non-empty string, not {value!r}")
    token = token.strip()
    if not (token.isascii() and token.isprintable()):  # else grpc fails with "Invalid metadata"
        where = TOKEN_ENV if os.environ.get(TOKEN_ENV) else f"config {path}: 'token'"
        raise CtlError(f"{where} must be printable ASCII: it travels in a gRPC header")
    port = data["port"]
    if not isinstance(port, (int, str)) or not str(port).isdecimal():
        raise CtlError(f"config {path}: 'port' must be a port number, not {port!r}")

    return Config(
        target=f"{data['address']}:{port}",
        server_name=data["server_name"],
        ca=_read_pem(path, data["ca"], "CA certificate"),
        cert=_read_pem(path, data["cert"], "client certificate"),
        key=_read_pem(path, data["key"], "client key"),
        token=token,
    )


def _read_pem(config_path: str, pem_path: str, what: str) -> bytes:
    """Relative paths are relative to the config file, so a config directory can move as one."""
    path = os.path.join(os.path.dirname(config_path), os.path.expanduser(pem_path))
    try:
        return tls.read_pem(path, what)
    except OSError as err:
        raise CtlError(f"config {config_path}: {err}") from None


class Connection:
    """A mutual-TLS channel to ijrd that sends the token with every call and turns gRPC
    failures into CtlErrors. Creating one is what imports grpc."""

    def __init__(self, config: Config, timeout: float):
        if "grpc" not in sys.modules:  # else someone imported it already: too late to restrict
            tls.restrict_to_tls13()
            # Failures are reported by ijrctl itself; grpc's own log lines would be noise.
            os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        import grpc
        from ijr.gen import job_pb2_grpc

        credentials = grpc.ssl_channel_credentials(
            root_certificates=config.ca, private_key=config.key, certificate_chain=config.cert)
        self.channel = grpc.secure_channel(
            config.target, credentials, options=[("grpc.ssl_target_name_override", config.server_name)])
        self.stub = job_pb2_grpc.JobServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {config.token}"),)
        self.target = config.target
        self.timeout = timeout

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info) -> None:
        self.channel.close()  # also cancels an RPC still running, e.g. after Ctrl-C

    def call(self, what: str, rpc: Callable, request, timeout: float | None = None):
        """Make one unary RPC; `what` names the attempt in the error message."""
        import grpc

        timeout = timeout or self.timeout
        try:
            return rpc(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise self._error(what, err, timeout) from None

    def output(self, job_id: str) -> Iterator[bytes]:
        """The job's output from byte 0, chunk by chunk, until the job ends.

        No deadline: a job may run (and stream) for as long as it likes.
        """
        import grpc
        from ijr.gen import job_pb2

        stream = self.stub.StreamJobOutput(job_pb2.JobIdentifier(job_id=job_id), metadata=self.metadata)
        try:
            for message in stream:
                yield message.output
        except grpc.RpcError as err:
            raise self._error(f"output of {job_id}", err, None) from None

    def _error(self, what: str, err, timeout: float | None) -> CtlError:
        import grpc

        details = " ".join((err.details() or "").split())  # one line, whatever the server sent
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            # With TLS 1.3 a server that refuses our certificate just closes the connection.
            hint = " (if ijrd is up, it refused this client's certificate)" if "Socket closed" in details else ""
            return CtlError(f"cannot reach ijrd at {self.target}: {details}{hint}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout:
            return CtlError(f"{what}: no answer from ijrd at {self.target} within {timeout:g} s"
                            f" (set {TIMEOUT_ENV} to wait longer)")
        # FAILED_PRECONDITION: the command can't be executed; 127 as a shell (or docker run) says
        status = 127 if code == grpc.StatusCode.FAILED_PRECONDITION else 1
        return CtlError(f"{what}: {code.name.lower().replace('_', ' ')}: {details}", status)


# --- commands -------------------------------------------------------------------------


def _start(conn: Connection, args: argparse.Namespace) -> int:
    from ijr.gen import job_pb2

    request = job_pb2.StartRequest(
        job_command=args.command,
        job_arguments=args.arg,
        cpu_shares=args.cpu,
        memory_limit_in_bytes=args.memory,
        disk_read_iops_limit=args.disk_read_iops or "",
        disk_write_iops_limit=args.disk_write_iops or "",
    )
    job_id = conn.call("start", conn.stub.StartJob, request).job_id
    if not args.output:
        print(job_id)
        return 0
    print(job_id, file=sys.stderr)  # stdout carries exactly the job's bytes
    try:
        _copy_output(conn, job_id)
    except KeyboardInterrupt:  # like `docker run`: Ctrl-C ends the job it started, not just the view
        print(f"ijrctl: interrupted: stopping job {job_id}", file=sys.stderr)
        conn.call(f"stop {job_id}", conn.stub.StopJob, job_pb2.JobIdentifier(job_id=job_id), conn.timeout * 2)
        raise
    record = conn.call(f"status {job_id}", conn.stub.GetJobStatus, job_pb2.JobIdentifier(job_id=job_id))
    return _exit_status(record)


def _stop(conn: Connection, args: argparse.Namespace) -> int:
    """Stopping waits for the job's grace period on the server, hence the doubled timeout."""
    from ijr.gen import job_pb2

    response = conn.call(f"stop {args.job}", conn.stub.StopJob,
                         job_pb2.JobIdentifier(job_id=args.job), timeout=2 * conn.timeout)
    if response.status != response.STOPPED:
        raise CtlError(f"stop {args.job}: ijrd answered without confirming the stop (status {response.status})")
    print(f"{args.job} stopped")
    return 0


def _output(conn: Connection, args: argparse.Namespace) -> int:
    _copy_output(conn, args.job)
    return 0


def _status(conn: Connection, args: argparse.Namespace) -> int:
    from ijr.gen import job_pb2

    record = conn.call(f"status {args.job}", conn.stub.GetJobStatus, job_pb2.JobIdentifier(job_id=args.job))
    if args.json:
        print(json.dumps(_as_dict(record), indent=2))
    else:
        _print_status(record)
    return 0


def _list(conn: Connection, args: argparse.Namespace) -> int:
    from ijr.gen import job_pb2

    response = conn.call("list", conn.stub.ListJobs, job_pb2.ListJobsRequest(include_finished=args.all))
    records = sorted(response.job_records, key=lambda r: (r.job_start.seconds, r.job_start.nanos))
    if args.json:
        print(json.dumps([_as_dict(record) for record in records], indent=2))
    else:
        _print_table(records)
    return 0


def _copy_output(conn: Connection, job_id: str) -> None:
    """Write the job's bytes unchanged to stdout, flushing each chunk so a pipe sees it live."""
    out = sys.stdout.buffer
    for chunk in conn.output(job_id):
        out.write(chunk)
        out.flush()


def _exit_status(record) -> int:
    """How `docker run` would exit: the job's code, or 128 + the signal that ended it."""
    if record.HasField("exit_code"):
        return record.exit_code
    if record.HasField("signal"):
        return 128 + record.signal
    raise CtlError(f"job {record.job_id} is {_state(record)} and has neither an exit code nor a signal")


# --- formatting -----------------------------------------------------------------------


def _print_table(records) -> None:
    rows = [("ID", "STATE", "COMMAND", "STARTED", "EXIT")]
    for r in records:
        rows.append((r.job_id, _state(r), _shorten(r), _when(r, "job_start"), _exit(r)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_status(record) -> None:
    fields = [
        ("id", record.job_id),
        ("state", _state(record)),
        ("exit", _exit(record)),
        ("oom killed", "yes" if record.oom_killed else "no"),
        ("owner", record.owner),
        ("command", _command_line(record)),
        ("started", _when(record, "job_start")),
        ("ended", _when(record, "job_end")),
        ("cpu shares", str(record.cpu_shares)),
        ("memory", _size(record.memory_limit_in_bytes) if record.memory_limit_in_bytes else "unlimited"),
        ("read iops", record.disk_read_iops_limit or "unlimited"),
        ("write iops", record.disk_write_iops_limit or "unlimited"),
        ("pids", str(record.pids_limit) if record.pids_limit else "unlimited"),
    ]
    if record.error:
        fields.insert(3, ("error", record.error))
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        print(f"{name + ':':<{width}} {value}")


def _state(record) -> str:
    """RUNNING -> 'running', OOM_KILLED -> 'oom-killed'; a state that ijrd knows and this
    client does not (the proto grows additively) shows as its number."""
    try:
        return record.State.Name(record.state).lower().replace("_", "-")
    except ValueError:
        return f"state {record.state}"


def _exit(record) -> str:
    if record.HasField("exit_code"):
        return str(record.exit_code)
    if record.HasField("signal"):
        return f"signal {record.signal}"
    return "-"


def _command_line(record) -> str:
    """Quoted as a shell would need it, so arguments with spaces stay recognisable."""
    return shlex.join([record.job_command, *record.job_arguments])


def _shorten(record) -> str:
    """The command line for the table: unquoted, on one line, at most COMMAND_WIDTH characters."""
    text = " ".join(" ".join([record.job_command, *record.job_arguments]).split())
    return text if len(text) <= COMMAND_WIDTH else text[: COMMAND_WIDTH - 3] + "..."


def _when(record, field: str) -> str:
    """A timestamp as local ISO 8601, or '-' if unset (job_end of a running job)."""
    if not record.HasField(field):
        return "-"
    moment = getattr(record, field).ToDatetime(tzinfo=timezone.utc)
    return moment.astimezone().isoformat(timespec="seconds")


def _size(n: int) -> str:
    """Bytes in the units --memory accepts: 536870912 -> '512m'."""
    for unit, size in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _as_dict(record) -> dict:
    """Proto JSON with every field present, so scripts see the same keys for every job."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _discard_stdout() -> None:
    """After EPIPE (`ijrctl output ID | head`), keep Python's flush at exit from complaining."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
