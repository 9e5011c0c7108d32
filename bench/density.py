"""Density: memory per running job, and ListJobs latency with many jobs.

Memory: PSS (shared pages split among their sharers, so a sum over processes is honest) of
the daemon, its spawner and every process of every job (found through the jobs' cgroups),
with N `sleep 600` jobs running, minus the same daemon's PSS when idle, divided by N.
The idle figure is taken after one job has run, so lazy start-up costs are not charged to jobs.

Latency: ListJobs p50 over a warm channel with N jobs running, against the same with 1 job.

Jobs are started one after another (what a 2-core box can take); the daemon's SIGTERM stops
them all at the end.
"""
import time

from bench.harness import Client, Daemon, Goal, Row, Workspace, job_pids, median, pss_kib, timed

NAME = "density"
MIB = 1024


def list_p50(client: Client, calls: int, expected: int) -> float:
    client.list()  # a warm-up call
    return median([timed(lambda: _check_count(client, expected)) for _ in range(calls)])


def _check_count(client: Client, expected: int) -> None:
    """Every job must still be running, or the figures would describe fewer jobs."""
    count = len(client.list())
    if count != expected:
        raise RuntimeError(f"ListJobs shows {count} running jobs, expected {expected}")


def memory_kib(daemon: Daemon, job_ids: list[str]) -> tuple[int, int, int]:
    """PSS of (daemon + spawner, every job's processes, how many processes those were)."""
    pids = [pid for job_id in job_ids for pid in job_pids(job_id)]
    return daemon.pss_kib(), sum(pss_kib(pid) for pid in pids), len(pids)


def run(ws: Workspace) -> list[Row]:
    count = ws.sizes.density_jobs
    with ws.daemon(NAME) as daemon:
        client = daemon.client()
        try:
            client.run_to_end("/bin/true")
            idle_kib = daemon.pss_kib()
            job_ids = [client.start("sleep", "600")]
            one = list_p50(client, ws.sizes.list_calls, 1)
            started = time.monotonic()
            job_ids += [client.start("sleep", "600") for _ in range(count - 1)]
            start_seconds = time.monotonic() - started
            many = list_p50(client, ws.sizes.list_calls, count)
            daemon_kib, jobs_kib, processes = memory_kib(daemon, job_ids)
        finally:
            client.close()
    per_job = (daemon_kib + jobs_kib - idle_kib) / count / MIB
    notes = [f"PSS: idle daemon+spawner {idle_kib / MIB:.1f} MiB; with {count} jobs daemon+spawner "
             f"{daemon_kib / MIB:.1f} MiB ({(daemon_kib - idle_kib) / count:+.0f} KiB/job: it shares pages "
             f"with the inits), {processes} job processes {jobs_kib / MIB:.1f} MiB ({jobs_kib / count:.0f} KiB/job)",
             f"{count - 1} jobs started one after another in {start_seconds:.1f} s "
             f"({start_seconds / max(count - 1, 1) * 1000:.1f} ms each)"]
    return [Row(f"{NAME} memory ({count} jobs)", f"{per_job:.2f} MiB/job", f"{idle_kib / MIB:.1f} MiB idle daemon",
                None, Goal("<=", 1, " MiB/job"), goal_value=per_job, notes=notes),
            Row(f"{NAME} ListJobs p50", f"{many * 1000:.2f} ms ({count} jobs)", f"{one * 1000:.2f} ms (1 job)",
                many / one, Goal("<=", 3))]
