"""Spawn: how long a whole job of /bin/true takes through ijrd, against plain `unshare`.

IJR: StartJob, then StreamJobOutput to its end (the stream ends only once the job has ended
and its record is final), then one GetJobStatus to read the exit code — over a warm mTLS
channel, so no handshake is counted. Streaming was as fast as polling GetJobStatus in a tight
loop, and it wakes up exactly when the job ends without loading the daemon with RPCs.

Baseline: `unshare --fork --pid --mount-proc --net --uts --ipc /bin/true` as a subprocess, the
same namespaces without cgroups, mount hardening, a daemon or gRPC.

The two alternate, one of each per round, so drift on a shared machine hits both alike.
"""
import subprocess
import time

from bench.harness import Client, Goal, Row, Workspace, median, percentile, timed

NAME = "spawn"
UNSHARE = ["unshare", "--fork", "--pid", "--mount-proc", "--net", "--uts", "--ipc", "/bin/true"]
WARMUP = 5


def run_unshare() -> None:
    subprocess.run(UNSHARE, check=True)


def run_job(client: Client) -> tuple[float, float]:
    """Seconds until StartJob answered, and from then until the final status was read."""
    started = time.perf_counter()
    job_id = client.start("/bin/true")
    answered = time.perf_counter()
    client.wait_final(job_id)
    return answered - started, time.perf_counter() - answered


def run(ws: Workspace) -> list[Row]:
    phases, base_times = [], []
    with ws.daemon(NAME) as daemon:
        client = daemon.client()
        try:
            for _ in range(WARMUP):
                run_job(client)
                run_unshare()
            for _ in range(ws.sizes.spawns):
                base_times.append(timed(run_unshare))
                phases.append(run_job(client))
        finally:
            client.close()
    ijr_times = [start + end for start, end in phases]
    note = (f"IJR phase medians: StartJob {median([s for s, _ in phases]) * 1000:.2f} ms, "
            f"then stream to the end + GetJobStatus {median([e for _, e in phases]) * 1000:.2f} ms")
    return [_row(ijr_times, base_times, 50, Goal("<=", 1.5), [note]), _row(ijr_times, base_times, 99, None, [])]


def _row(ijr_times: list[float], base_times: list[float], q: int, goal: Goal | None, notes: list[str]) -> Row:
    ijr, base = percentile(ijr_times, q), percentile(base_times, q)
    return Row(f"{NAME} p{q} (n={len(ijr_times)})", f"{ijr * 1000:.2f} ms", f"{base * 1000:.2f} ms", ijr / base,
               goal, notes=notes)
