"""The transport's ceiling for the stream benchmark: a bare grpc.aio server.

It serves only JobService.StreamJobOutput, answering every call with --bytes zero bytes in
64 KiB JobOutput messages (ijrd's own chunk size), over the same mutual TLS 1.3 with the
same certificates as ijrd. Same messages and the same client code as against ijrd, but no
token check, no job, no output file: what is left is gRPC, protobuf and TLS.

Run by bench/stream.py as `python -m bench.bare_server ...`; prints `ready` once serving.
"""
import argparse
import asyncio
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ijr import tls  # noqa: E402

tls.restrict_to_tls13()
import grpc  # noqa: E402

from ijr.gen import job_pb2, job_pb2_grpc  # noqa: E402
from ijr.output import CHUNK  # noqa: E402


class Bare(job_pb2_grpc.JobServiceServicer):
    def __init__(self, total: int):
        self.total = total

    async def StreamJobOutput(self, request, context):
        """One prebuilt message sent again and again: only serialization and TLS remain."""
        full, rest = divmod(self.total, CHUNK)
        message = job_pb2.JobOutput(output=bytes(CHUNK))
        for _ in range(full):
            yield message
        if rest:
            yield job_pb2.JobOutput(output=bytes(rest))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    job_pb2_grpc.add_JobServiceServicer_to_server(Bare(args.bytes), server)
    credentials = grpc.ssl_server_credentials([(read(args.key), read(args.cert))],
                                              root_certificates=read(args.ca), require_client_auth=True)
    if not server.add_secure_port(f"127.0.0.1:{args.port}", credentials):
        raise SystemExit(f"bare_server: cannot listen on 127.0.0.1:{args.port}")
    await server.start()
    print("ready", flush=True)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(grace=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True, help="bytes each StreamJobOutput call sends")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
