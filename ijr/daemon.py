"""ijrd: the job daemon. Serves JobService over mutual TLS 1.3 to clients holding a token.

Order matters: the spawner is forked before grpc is imported (grpc must never fork without
exec) and before any secret is read, and the TLS restriction is set before grpc is imported.
asyncio too is imported only after the fork: every job's init is a copy of the spawner, and
the less it holds, the faster it forks and the less memory each job costs.
"""
import argparse
import logging
import os
import signal
import sys

from ijr import __version__, tls

log = logging.getLogger("ijr")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: {message}\n")


def parse(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="ijrd", description="Run commands as isolated, resource-limited jobs, "
               "controlled over gRPC with mutual TLS 1.3 and bearer tokens. Runs as root.")
    p.add_argument("--version", action="version", version=f"ijrd {__version__}")
    p.add_argument("--server", required=True, help="the server name (must match the server certificate)")
    p.add_argument("--port", type=int, default=50051, help="the port to listen on (default: 50051)")
    p.add_argument("--listen", default="0.0.0.0", help="the address to listen on (default: 0.0.0.0)")
    p.add_argument("--cert", required=True, help="the server certificate (PEM)")
    p.add_argument("--key", required=True, help="the server private key (PEM)")
    p.add_argument("--ca", required=True, help="the CA certificate that client certificates must chain to")
    secret = p.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret", help="the token secret (visible in ps: prefer --secret-file)")
    secret.add_argument("--secret-file", help="a file holding the token secret")
    p.add_argument("--tokens", required=True, help="the directory ijrtoken writes tokens to")
    p.add_argument("--state-dir", default="/var/lib/ijr", help="job records and output (default: /var/lib/ijr)")
    p.add_argument("--admin", action="append", default=[], metavar="USER",
                   help="a user who may see and stop every job (repeatable)")
    p.add_argument("--mask", action="append", default=[], metavar="PATH",
                   help="another file or directory to hide from jobs (repeatable); the directories "
                   "of --key and --secret-file, --tokens and --state-dir are always hidden")
    p.add_argument("--stop-grace", type=float, default=5.0, metavar="SECONDS",
                   help="time between TERM and KILL when a job is stopped (default: 5)")
    p.add_argument("--pids-max", type=int, default=4096, help="the most processes one job may have (default: 4096)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"argument --port: {args.port} is not a port number")
    if args.stop_grace < 0 or args.pids_max < 1:
        p.error("--stop-grace must be >= 0 and --pids-max >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("ijrd: must run as root (it creates namespaces and cgroups)", file=sys.stderr)
        return 1
    _raise_fd_limit()
    tls.restrict_to_tls13()
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # ijrd reports failures itself, in one line
    from ijr.spawner import Spawner
    spawner = Spawner()  # before grpc and before any secret is in memory
    import asyncio
    try:
        return asyncio.run(serve(args, spawner))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"ijrd: {err}", file=sys.stderr)
        return 1
    finally:
        spawner.close()


def _raise_fd_limit() -> None:
    """A running job holds four of the daemon's descriptors; 1024 would cap it near 250 jobs."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _credentials(args: argparse.Namespace):
    import grpc
    key, cert, ca = (tls.read_pem(args.key, "--key"), tls.read_pem(args.cert, "--cert"), tls.read_pem(args.ca, "--ca"))
    tls.check_files(args.cert, args.key, args.ca)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


async def serve(args: argparse.Namespace, spawner) -> int:
    from ijr import token
    from ijr.jobs import JobManager

    try:
        secret = token.read_secret(args.secret, args.secret_file)
    except token.TokenError as err:
        raise ValueError(str(err)) from None
    if not os.path.isdir(args.tokens):
        raise ValueError(f"--tokens {args.tokens}: not a directory")
    # Whole directories: next to the key there is often the CA's key and other clients' keys.
    secret_dirs = [os.path.dirname(os.path.abspath(p)) for p in (args.key, args.secret_file) if p]
    mask = tuple(os.path.abspath(p) for p in (*secret_dirs, args.tokens, *args.mask))
    manager = JobManager(os.path.abspath(args.state_dir), spawner, grace=args.stop_grace,
                         pids_max=args.pids_max, mask=mask)
    try:
        manager.load()
    except OSError as err:
        raise ValueError(f"--state-dir {args.state_dir}: {err.strerror}") from None

    import grpc
    from ijr import service
    server = grpc.aio.server(interceptors=[service.AuthInterceptor(secret, os.path.abspath(args.tokens))],
                             options=[("grpc.so_reuseport", 0)])
    service.add_to_server(server, manager, frozenset(args.admin))
    address = f"[{args.listen}]:{args.port}" if ":" in args.listen else f"{args.listen}:{args.port}"
    if not server.add_secure_port(address, _credentials(args)):
        raise OSError(f"cannot listen on {address}")
    await server.start()
    log.info("ijrd %s serving on %s as %s (cgroup v%d, state %s)", __version__, address, args.server,
             manager.cgroup_kind.version, args.state_dir)
    import asyncio
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    spawner_exit = os.pidfd_open(spawner.pid)  # readable once the spawner has died
    loop.add_reader(spawner_exit, stopping.set)
    await stopping.wait()
    failed = _readable(spawner_exit)
    if failed:
        log.error("the spawner process died; its jobs ended with it: stopping ijrd")
    log.info("ijrd stopping: stopping running jobs")
    await server.stop(grace=1.0)
    await manager.shutdown()
    log.info("ijrd stopped")
    return 1 if failed else 0


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0)[0])
