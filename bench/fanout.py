"""Fan-out: many clients reading one job's output at once, in daemon CPU per reader-GB.

A job writes N bytes (`head -c N /dev/zero`); R readers, each on its own mTLS connection like
R separate clients, stream it live to the end and hash it; every digest must equal the
expected one. The cost is the daemon's and its spawner's CPU seconds over the whole trial
(start included) per GB delivered to readers. The baseline is the same figure with one reader:
a fan-out that costs more per delivered GB than a single stream points at per-reader overhead.
"""
import asyncio
import hashlib

from bench.harness import Daemon, Goal, Row, Workspace, bearer, median, runs_text
from ijr.gen import job_pb2, job_pb2_grpc

NAME = "fanout"


async def read_all(daemon: Daemon, job_id: str, readers: int) -> list[str]:
    """Start every reader at once; each returns the sha256 of what it read."""
    async def one() -> str:
        channel = daemon.pki.channel(daemon.port, aio=True)
        try:
            stub = job_pb2_grpc.JobServiceStub(channel)
            digest = hashlib.sha256()
            call = stub.StreamJobOutput(job_pb2.JobIdentifier(job_id=job_id), metadata=bearer(daemon.pki.token))
            async for message in call:
                digest.update(message.output)
            return digest.hexdigest()
        finally:
            await channel.close()
    return await asyncio.gather(*(one() for _ in range(readers)))


def cpu_per_reader_gb(daemon: Daemon, readers: int, nbytes: int, expected: str) -> float:
    client = daemon.client()
    try:
        before = daemon.cpu_seconds()
        job_id = client.start("head", "-c", str(nbytes), "/dev/zero")
        digests = asyncio.run(read_all(daemon, job_id, readers))
        spent = daemon.cpu_seconds() - before
    finally:
        client.close()
    wrong = [d for d in digests if d != expected]
    if wrong:
        raise RuntimeError(f"{len(wrong)} of {readers} readers got other bytes than the job wrote")
    return spent / (readers * nbytes / 1e9)


def run(ws: Workspace) -> list[Row]:
    readers, nbytes = ws.sizes.fanout_readers, ws.sizes.fanout_bytes
    expected = hashlib.sha256(bytes(nbytes)).hexdigest()
    single, many = [], []
    with ws.daemon(NAME) as daemon:
        for _ in range(ws.sizes.fanout_runs):
            single.append(cpu_per_reader_gb(daemon, 1, nbytes, expected))
            many.append(cpu_per_reader_gb(daemon, readers, nbytes, expected))
    one, all_ = median(single), median(many)
    return [Row(f"{NAME} ({readers} x {nbytes / 1e6:g} MB)", f"{all_:.2f} CPU-s/GB", f"{one:.2f} CPU-s/GB 1 reader",
                all_ / one, Goal("<=", 2),
                notes=[f"daemon+spawner CPU-s per reader-GB, runs: {readers} readers "
                       f"{runs_text(many, 2)}; 1 reader {runs_text(single, 2)}"])]

