"""Stream: one client reading a job's whole stdout, against the transport's ceiling.

IJR: a job runs `head -c N /dev/zero`; one StreamJobOutput client reads it live to the end.
Timed from the stream's request to its last byte (StartJob is not counted: it is the spawn
benchmark's business). Baseline: bench/bare_server.py, a grpc.aio server that streams the same
N bytes in the same 64 KiB JobOutput messages over the same mutual TLS, read by the same client
code. What IJR adds is the job, the pipe, the output file and the token check.
"""
import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator

import grpc

from bench.harness import (REPO, Client, Goal, Pki, Row, Workspace, free_port, median, runs_text, stop_process,
                           timed)

NAME = "stream"
CONNECT_TIMEOUT = 30


@contextlib.contextmanager
def bare_server(pki: Pki, nbytes: int) -> Iterator[int]:
    """bench/bare_server.py in a subprocess; yields its port."""
    port = free_port()
    args = [sys.executable, "-m", "bench.bare_server", "--port", str(port), "--bytes", str(nbytes),
            "--cert", pki.server_cert, "--key", pki.server_key, "--ca", pki.ca]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE)
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"bare_server did not start (exit {proc.wait()})")
        yield port
    finally:
        stop_process(proc, timeout=10)


def connect(client: Client) -> Client:
    """Finish the TLS handshake now, so no run pays for it."""
    grpc.channel_ready_future(client.channel).result(timeout=CONNECT_TIMEOUT)
    return client


def megabytes_per_second(nbytes: int, read: Callable[[], int]) -> float:
    """Time one full read; refuse a short one, which would flatter the rate."""
    got = []
    seconds = timed(lambda: got.append(read()))
    if got[0] != nbytes:
        raise RuntimeError(f"read {got[0]} bytes, expected {nbytes}")
    return nbytes / seconds / 1e6


def run(ws: Workspace) -> list[Row]:
    nbytes, ijr_rates, bare_rates = ws.sizes.stream_bytes, [], []
    with ws.daemon(NAME) as daemon, bare_server(ws.pki, nbytes) as bare_port:
        ijr = connect(daemon.client())
        bare = connect(Client(ws.pki.channel(bare_port), ws.pki.token))
        try:
            for _ in range(ws.sizes.stream_runs):
                bare_rates.append(megabytes_per_second(nbytes, lambda: bare.stream("")))
                job_id = ijr.start("head", "-c", str(nbytes), "/dev/zero")
                ijr_rates.append(megabytes_per_second(nbytes, lambda: ijr.stream(job_id)))
        finally:
            ijr.close()
            bare.close()
    ijr_rate, bare_rate = median(ijr_rates), median(bare_rates)
    size = f"{nbytes / (1 << 30):g} GiB" if nbytes >= 1 << 30 else f"{nbytes / 1e6:g} MB"
    return [Row(f"{NAME} ({size}, median of {len(ijr_rates)})", f"{ijr_rate:.0f} MB/s",
                f"{bare_rate:.0f} MB/s bare", ijr_rate / bare_rate, Goal(">=", 0.5),
                notes=[f"runs MB/s: IJR {runs_text(ijr_rates)}; bare grpc.aio {runs_text(bare_rates)}"])]

