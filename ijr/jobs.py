"""The job lifecycle: start, stop, status, list and output, with state kept on disk.

Used by the daemon's gRPC service; runs on its asyncio loop. Each job has a directory
`<state>/jobs/<id>/` with `job.json` (the record) and `output` (the merged stdout+stderr),
so finished jobs survive a daemon restart.
"""
import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator

from ijr import cgroup, limits
from ijr.output import Output
from ijr.spawner import JOB_PATH, Spawner

log = logging.getLogger("ijr")

RUNNING, EXITED, KILLED, STOPPED, OOM_KILLED = "running", "exited", "killed", "stopped", "oom_killed"
DEFAULT_CPU_SHARES = 1024
MAX_ARGS = 4096
MAX_ARGS_BYTES = 1 << 20
MAX_ARG_BYTES = 128 * 1024 - 1  # the kernel's MAX_ARG_STRLEN, less the NUL
_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class JobError(Exception):
    """Base of the errors a caller can act on; the message names the job or the input."""


class InvalidArgument(JobError):
    pass


class NotFound(JobError):
    pass


class CannotExecute(JobError):
    pass


class Exhausted(JobError):
    """The host or the daemon is out of something (descriptors, memory, processes)."""


@dataclasses.dataclass
class JobRecord:
    """What is known of a job; saved as job.json."""

    id: str
    owner: str
    command: str
    args: list[str]
    cpu_shares: int
    memory_bytes: int
    read_iops: str
    write_iops: str
    pids_max: int
    start: float
    state: str = RUNNING
    end: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    error: str = ""


class Job:
    """A record plus what a running job needs: its init's pidfd, cgroup, output, end event."""

    def __init__(self, record: JobRecord, directory: str, output: Output):
        self.record = record
        self.directory = directory
        self.output = output
        self.ended = asyncio.Event()
        self.pidfd: int | None = None
        self.cgroup: cgroup.Cgroup | None = None
        self.stop_requested = False
        self.report: list[str] = []  # the init's report lines
        loop = asyncio.get_running_loop() if record.state == RUNNING else None
        # Resolved at the init's first report line, at EOF of its report pipe, at EOF of the output.
        self.first_line = loop.create_future() if loop else None
        self.report_done = loop.create_future() if loop else None
        self.output_done: asyncio.Future | None = None

    def save(self) -> None:
        """Atomically, so a crash never leaves half a record. A full disk is logged, not raised:
        the record in memory stays right, and the job must still end cleanly."""
        tmp = os.path.join(self.directory, "job.json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(dataclasses.asdict(self.record), f)
            os.replace(tmp, os.path.join(self.directory, "job.json"))
        except OSError as err:
            log.error("job %s: cannot save its record %s: %s", self.record.id, tmp, err.strerror)


def check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument(f"malformed job id {job_id[:80]!r}: expected a UUID like the one start printed")


class JobManager:
    def __init__(self, state_dir: str, spawner: Spawner, *, grace: float = 5.0, pids_max: int = 4096,
                 mask: tuple[str, ...] = ()):
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.spawner = spawner
        self.grace = grace
        self.pids_max = pids_max
        self.mask = tuple(dict.fromkeys([state_dir, *mask]))  # secrets the jobs must not see
        self.cgroup_kind = cgroup.detect()
        self.jobs: dict[str, Job] = {}

    # ---- start-up ------------------------------------------------------------------------

    def load(self) -> None:
        """Sweep cgroups a previous daemon left and reload the jobs it recorded."""
        os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        for job_id in cgroup.sweep(self.cgroup_kind, set(os.listdir(self.jobs_dir))):
            log.info("swept leftover cgroup of job %s", job_id)
        for job_id in sorted(os.listdir(self.jobs_dir)):
            directory = os.path.join(self.jobs_dir, job_id)
            try:
                with open(os.path.join(directory, "job.json")) as f:
                    record = JobRecord(**json.load(f))
            except (OSError, ValueError, TypeError) as err:
                log.warning("skipping job directory %s: %s", directory, err)
                continue
            output_path = os.path.join(directory, "output")
            size = os.path.getsize(output_path) if os.path.exists(output_path) else 0
            stale = record.state == RUNNING  # the previous daemon died; its jobs died with it
            if stale:
                record.state, record.signal, record.end = KILLED, int(signal.SIGKILL), time.time()
                record.error = "the daemon stopped while the job was running"
            job = Job(record, directory, Output(output_path, size, closed=True))
            if stale:
                job.save()
            job.ended.set()
            self.jobs[job_id] = job

    # ---- start ---------------------------------------------------------------------------

    def _validate(self, command: str, args: list[str], cpu_shares: int, memory_bytes: int,
                  read_iops: str, write_iops: str) -> cgroup.Limits:
        if not command.strip():
            raise InvalidArgument("empty command: give the program to run")
        if len(args) > MAX_ARGS or sum(len(a) for a in args) + len(command) > MAX_ARGS_BYTES:
            raise InvalidArgument(f"too many or too long arguments (at most {MAX_ARGS}, {MAX_ARGS_BYTES} bytes)")
        if any("\0" in s for s in (command, *args)):
            raise InvalidArgument("the command and its arguments can't contain NUL bytes")
        if any(len(s.encode()) > MAX_ARG_BYTES for s in args):
            raise InvalidArgument(f"an argument is over {MAX_ARG_BYTES} bytes, the most the kernel passes to a program")
        try:
            limits.check_cpu_shares(cpu_shares)
            limits.check_memory(memory_bytes)
            read = limits.parse_iops(read_iops) if read_iops else None
            write = limits.parse_iops(write_iops) if write_iops else None
        except limits.LimitError as err:
            raise InvalidArgument(str(err)) from None
        return cgroup.Limits(cpu_shares, memory_bytes, read, write, self.pids_max)

    async def start(self, owner: str, command: str, args: list[str], cpu_shares: int = 0,
                    memory_bytes: int = 0, read_iops: str = "", write_iops: str = "") -> JobRecord:
        cpu_shares = cpu_shares or DEFAULT_CPU_SHARES
        job_limits = self._validate(command, args, cpu_shares, memory_bytes, read_iops, write_iops)
        job_id = str(uuid.uuid4())
        directory = os.path.join(self.jobs_dir, job_id)
        os.mkdir(directory, 0o700)
        record = JobRecord(job_id, owner, command, list(args), cpu_shares, memory_bytes, read_iops,
                           write_iops, self.pids_max, time.time())
        job = Job(record, directory, Output(os.path.join(directory, "output")))
        # Shielded: a caller that gives up (a cancelled RPC) must not cut a spawn in half.
        spawning = asyncio.ensure_future(self._spawn(job, job_limits))
        try:
            await asyncio.shield(spawning)
        except asyncio.CancelledError:
            await self._discard(spawning, job)
            raise
        except OSError as err:
            shutil.rmtree(directory, ignore_errors=True)
            raise Exhausted(f"cannot start a job now: {err.strerror or err}") from None
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        job.save()
        self.jobs[job_id] = job
        asyncio.get_running_loop().create_task(self._watch(job))
        log.info("job %s started by %s: %s", job_id, owner, command)
        return record

    async def _spawn(self, job: Job, job_limits: cgroup.Limits) -> None:
        """Create the cgroup, have the spawner start the job, wait for its init's first word."""
        job.cgroup = self.cgroup_kind(job.record.id)
        try:
            job.cgroup.create(job_limits)
        except OSError as err:
            job.cgroup.remove()
            raise InvalidArgument(f"cannot apply the limits: {err}") from None
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        spec = {"command": job.record.command, "args": job.record.args, "hostname": f"ijr-{job.record.id[:8]}",
                "env": {"PATH": JOB_PATH, "HOME": "/", "IJR_JOB_ID": job.record.id},
                "procs": job.cgroup.procs_files(), "mask": self.mask}
        try:
            _, job.pidfd = await asyncio.to_thread(self.spawner.spawn, spec, out_w, report_w)
        except BaseException:
            for fd in (out_r, out_w, report_r, report_w):
                os.close(fd)
            job.cgroup.remove()
            raise
        finally:
            if job.pidfd is not None:
                os.close(out_w)
                os.close(report_w)
        job.output_done = job.output.drain(out_r)
        self._read_report(job, report_r)
        await job.first_line
        first = job.report[0] if job.report else "error the job's init died before it could report"
        if first != "started":
            await self._gone(job)
            oom = job.cgroup.oom_killed()
            await self._release(job)
            if oom:
                raise InvalidArgument(f"memory limit {job.record.memory_bytes} bytes is too small to start the job")
            raise CannotExecute(first.removeprefix("error "))

    async def _discard(self, spawning: asyncio.Future, job: Job) -> None:
        """Undo a start whose caller went away: let the spawn finish, then kill and remove it."""
        try:
            await spawning
        except Exception:  # noqa: BLE001 - a failed spawn has cleaned up after itself
            pass
        else:
            self._signal(job, signal.SIGKILL)
            await self._gone(job)
            await self._release(job)
        shutil.rmtree(job.directory, ignore_errors=True)

    @staticmethod
    def _read_report(job: Job, fd: int) -> None:
        """Collect the init's report lines until it exits and its pipe closes."""
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        buffer = bytearray()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            buffer.extend(data)
            *lines, rest = buffer.split(b"\n")
            buffer[:] = rest
            job.report.extend(line.decode(errors="replace") for line in lines)
            if (job.report or not data) and not job.first_line.done():
                job.first_line.set_result(None)
            if not data:
                loop.remove_reader(fd)
                os.close(fd)
                job.report_done.set_result(None)

        loop.add_reader(fd, readable)

    # ---- the end of a job ------------------------------------------------------------------

    @staticmethod
    async def _gone(job: Job) -> None:
        """Until the output is drained and the init has exited, and so left its cgroups."""
        await asyncio.gather(job.output_done, job.report_done)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(job.pidfd, exited.set_result, None)  # a pidfd is readable once its process exits
        try:
            await exited
        finally:
            loop.remove_reader(job.pidfd)

    @staticmethod
    async def _release(job: Job) -> None:
        os.close(job.pidfd)
        job.pidfd = None
        await asyncio.to_thread(job.cgroup.remove)

    async def _watch(self, job: Job) -> None:
        """Once the init has exited and the output is drained, record how the job ended."""
        await self._gone(job)
        record = job.record
        final = job.report[-1] if len(job.report) > 1 else ""
        kind, _, number = final.partition(" ")
        if kind == "exit":
            record.state, record.exit_code = EXITED, int(number)
        else:  # "signal N", or the init itself was killed (stop's SIGKILL, the OOM killer)
            record.state, record.signal = KILLED, int(number) if kind == "signal" else int(signal.SIGKILL)
        try:
            record.oom_killed = job.cgroup.oom_killed()
            await self._release(job)
        except OSError as err:
            log.error("job %s: cgroup clean-up failed: %s", record.id, err)
        if record.oom_killed and record.signal == signal.SIGKILL:
            record.state = OOM_KILLED
        if job.stop_requested:
            record.state = STOPPED
        record.error = record.error or job.output.error
        if job.output.error:
            log.error("job %s: %s", record.id, job.output.error)
        record.end = time.time()
        job.save()
        job.ended.set()
        log.info("job %s ended: %s%s", record.id, record.state,
                 f" (exit {record.exit_code})" if record.exit_code is not None else f" (signal {record.signal})")

    # ---- stop, status, list, output --------------------------------------------------------

    async def stop(self, job_id: str, by_user: bool = True) -> JobRecord:
        """TERM, a grace period, then KILL to the job's init, which takes the whole job with it.

        Returns once the job is gone; stopping an ended job just returns its record. A job the
        daemon ends (by_user False) is recorded as killed, not as stopped by a user.
        """
        job = self.get(job_id)
        if job.ended.is_set():
            return job.record
        if by_user:
            job.stop_requested = True
        else:
            job.record.error = "ended because ijrd was shutting down"
        self._signal(job, signal.SIGTERM)
        try:
            await asyncio.wait_for(job.ended.wait(), self.grace)
        except TimeoutError:
            self._signal(job, signal.SIGKILL)
            await job.ended.wait()
        return job.record

    @staticmethod
    def _signal(job: Job, sig: int) -> None:
        """By pidfd, so a recycled pid can never be hit."""
        if job.pidfd is not None:
            try:
                signal.pidfd_send_signal(job.pidfd, sig)
            except ProcessLookupError:
                pass  # already exiting

    def get(self, job_id: str) -> Job:
        check_job_id(job_id)
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def list(self, include_finished: bool = False) -> list[JobRecord]:
        return [job.record for job in self.jobs.values() if include_finished or not job.ended.is_set()]

    async def output(self, job_id: str) -> AsyncIterator[bytes]:
        """The whole output, then live; ends once the job has ended, so its status is final."""
        job = self.get(job_id)
        async for chunk in job.output.follow():
            yield chunk
        await job.ended.wait()

    async def shutdown(self) -> None:
        """Stop every running job (the daemon is going away and must not leave jobs unowned)."""
        await asyncio.gather(*(self.stop(job_id, by_user=False)
                               for job_id, job in self.jobs.items() if not job.ended.is_set()))
