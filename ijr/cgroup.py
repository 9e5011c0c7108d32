"""Job cgroups on cgroup v1 and v2 behind one interface.

Every job gets its own cgroup (one per v1 controller) named after the job under a parent
named `ijr`; nothing outside those parents is ever written or removed. The job's init
writes 0 to each `cgroup.procs` before exec, so limits hold from the first instruction.
"""
import errno
import math
import os
import time
from dataclasses import dataclass

ROOT = "/sys/fs/cgroup"
PARENT = "ijr"


@dataclass(frozen=True)
class Limits:
    cpu_shares: int
    memory_bytes: int  # 0: no limit
    read_iops: tuple[int, int, int] | None  # (major, minor, iops) of a whole disk
    write_iops: tuple[int, int, int] | None
    pids_max: int


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares -> v2 cpu.weight, runc's current quadratic mapping (1024 -> 100)."""
    if shares <= 2:
        return 1
    if shares >= 262144:
        return 10000
    log = math.log2(shares)
    return math.ceil(10 ** ((log * log + 125 * log) / 612.0 - 7.0 / 34.0))


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise OSError(err.errno, f"write {value!r} to {path}: {err.strerror}") from None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _field(path: str, key: str) -> int:
    """A counter from a flat-keyed cgroup file ("key value" lines); 0 when absent."""
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _rmdir(path: str, patience: float = 5.0) -> None:
    """Remove a cgroup, killing what is left in it; a missing one is already gone.

    A process that has just exited can stay in its cgroup for a moment after its pipes close
    (EBUSY), so this backs off, up to `patience` seconds; it runs off the event loop.
    """
    delay, waited = 0.0005, 0.0
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or waited > patience:
                raise
        for pid in _read(os.path.join(path, "cgroup.procs")).split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        time.sleep(delay)
        waited += delay
        delay = min(delay * 2, 0.1)


class CgroupV1:
    """One directory per controller: cpu, memory, blkio, pids."""

    version = 1
    CONTROLLERS = ("cpu", "memory", "blkio", "pids")

    def __init__(self, job_id: str):
        self.dirs = {c: os.path.join(ROOT, c, PARENT, job_id) for c in self.CONTROLLERS}

    @classmethod
    def available(cls) -> bool:
        return all(os.path.isdir(os.path.join(ROOT, c)) for c in cls.CONTROLLERS)

    @classmethod
    def parents(cls) -> list[str]:
        return [os.path.join(ROOT, c, PARENT) for c in cls.CONTROLLERS]

    def procs_files(self) -> list[str]:
        """`tasks`, not `cgroup.procs`: the single-threaded init moving itself (pid 0) through
        `tasks` skips the kernel's global threadgroup lock, whose RCU wait cost ~10 ms a job."""
        return [os.path.join(d, "tasks") for d in self.dirs.values()]

    def create(self, limits: Limits) -> None:
        for parent in self.parents():
            os.makedirs(parent, exist_ok=True)
        for d in self.dirs.values():
            os.mkdir(d)
        _write(f"{self.dirs['cpu']}/cpu.shares", str(limits.cpu_shares))
        if limits.memory_bytes:
            memory = self.dirs["memory"]
            _write(f"{memory}/memory.limit_in_bytes", str(limits.memory_bytes))
            if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):  # swap accounting is on
                _write(f"{memory}/memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        for name, rule in (("read", limits.read_iops), ("write", limits.write_iops)):
            if rule:
                major, minor, iops = rule
                _write(f"{self.dirs['blkio']}/blkio.throttle.{name}_iops_device", f"{major}:{minor} {iops}")
        _write(f"{self.dirs['pids']}/pids.max", str(limits.pids_max))

    def oom_killed(self) -> bool:
        return _field(f"{self.dirs['memory']}/memory.oom_control", "oom_kill") > 0

    def remove(self) -> None:
        for d in self.dirs.values():
            _rmdir(d)


class CgroupV2:
    """One directory in the unified hierarchy, controllers enabled in the parent."""

    version = 2
    CONTROLLERS = ("cpu", "memory", "io", "pids")

    def __init__(self, job_id: str):
        self.dir = os.path.join(ROOT, PARENT, job_id)

    @classmethod
    def available(cls) -> bool:
        return os.path.exists(os.path.join(ROOT, "cgroup.controllers"))

    @classmethod
    def parents(cls) -> list[str]:
        return [os.path.join(ROOT, PARENT)]

    def procs_files(self) -> list[str]:
        return [os.path.join(self.dir, "cgroup.procs")]

    def create(self, limits: Limits) -> None:
        parent = self.parents()[0]
        if not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)
            enable = " ".join(f"+{c}" for c in self.CONTROLLERS)
            _write(os.path.join(ROOT, "cgroup.subtree_control"), enable)
            _write(os.path.join(parent, "cgroup.subtree_control"), enable)
        os.mkdir(self.dir)
        _write(f"{self.dir}/cpu.weight", str(shares_to_weight(limits.cpu_shares)))
        if limits.memory_bytes:
            _write(f"{self.dir}/memory.max", str(limits.memory_bytes))
            if os.path.exists(f"{self.dir}/memory.swap.max"):
                _write(f"{self.dir}/memory.swap.max", "0")
        rules: dict[tuple[int, int], list[str]] = {}
        for key, rule in (("riops", limits.read_iops), ("wiops", limits.write_iops)):
            if rule:
                rules.setdefault(rule[:2], []).append(f"{key}={rule[2]}")
        for (major, minor), settings in rules.items():
            _write(f"{self.dir}/io.max", f"{major}:{minor} {' '.join(settings)}")
        _write(f"{self.dir}/pids.max", str(limits.pids_max))

    def oom_killed(self) -> bool:
        return _field(f"{self.dir}/memory.events", "oom_kill") > 0

    def remove(self) -> None:
        if os.path.exists(f"{self.dir}/cgroup.kill"):
            try:
                _write(f"{self.dir}/cgroup.kill", "1")
            except FileNotFoundError:
                return
        _rmdir(self.dir)


Cgroup = CgroupV1 | CgroupV2


def detect() -> type[CgroupV1] | type[CgroupV2]:
    """Pure v2 hosts have cgroup.controllers at the root; hybrid and v1 hosts do not."""
    if CgroupV2.available():
        return CgroupV2
    if CgroupV1.available():
        return CgroupV1
    raise RuntimeError(f"no usable cgroup hierarchy under {ROOT}: need v2, or v1 cpu, memory, blkio and pids")


def sweep(kind: type[CgroupV1] | type[CgroupV2], job_ids: set[str]) -> list[str]:
    """Remove the cgroups of these jobs that a previous daemon left behind; returns those found.

    Only the given jobs (this daemon's own, from its state directory): another ijrd on the same
    host keeps its cgroups.
    """
    swept = sorted(job_id for job_id in job_ids if any(
        os.path.isdir(os.path.join(parent, job_id)) for parent in kind.parents()))
    for job_id in swept:
        kind(job_id).remove()
    return swept
