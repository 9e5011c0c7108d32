"""The job engine end to end, in process: real jobs through the shared spawner, real cgroups.

Every test starts real jobs with `JobManager` and checks real effects from inside the job
(what it can see and do) and from the host (cgroups, processes, mounts, files). Every test
that starts jobs stops what it started and ends with nothing left: no job cgroup, no process
under the spawner, no zombie.

The tests marked `cgroup` also run in a pure cgroup v2 VM (`../shared/vm/run-in-vm -- ...
-m cgroup`), where IJR_VM_ACCEL=tcg means slow emulation: their timeouts scale with SCALE.
"""
import asyncio
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
import collections
from collections import defaultdict

import pytest

from conftest import leftover_cgroups, run
from ijr import cgroup, limits
from ijr.jobs import CannotExecute, InvalidArgument, JobManager, NotFound
from ijr.spawner import JOB_PATH

IN_VM = os.environ.get("IJR_VM") == "1"
SCALE = 10.0 if os.environ.get("IJR_VM_ACCEL") == "tcg" else (2.0 if IN_VM else 1.0)
OWNER = "tester"


# ---- helpers ---------------------------------------------------------------------------------

def cgroup_version() -> int:
    return cgroup.detect().version


async def collect(manager: JobManager, job_id: str, timeout: float = 10.0) -> bytes:
    """The job's whole output, once it has ended; stops the job and fails if it takes too long."""
    chunks: list[bytes] = []

    async def read() -> None:
        async for chunk in manager.output(job_id):
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout * SCALE)
    except TimeoutError:
        await manager.stop(job_id)
        raise AssertionError(f"job did not end within {timeout * SCALE}s; output so far: "
                             f"{b''.join(chunks)[:2000]!r}") from None
    return b"".join(chunks)


async def run_job(manager: JobManager, command: str, *args: str, timeout: float = 10.0, **limits):
    """Start a job, wait for its end: (final record, whole output)."""
    record = await manager.start(OWNER, command, list(args), **limits)
    output = await collect(manager, record.id, timeout)
    job = manager.get(record.id)
    assert job.ended.is_set()
    return job.record, output


async def wait_output(manager: JobManager, job_id: str, marker: bytes, timeout: float = 10.0) -> bytes:
    """Follow the job's output until `marker` shows up; returns what was read."""
    data = b""

    async def read() -> None:
        nonlocal data
        stream = manager.output(job_id)
        try:
            async for chunk in stream:
                data += chunk
                if marker in data:
                    return
        finally:
            await stream.aclose()
        raise AssertionError(f"job ended without printing {marker!r}: {data[:2000]!r}")

    try:
        await asyncio.wait_for(read(), timeout * SCALE)
    except TimeoutError:
        raise AssertionError(f"no {marker!r} within {timeout * SCALE}s: {data[:2000]!r}") from None
    return data


def within(manager: JobManager, body):
    """Run `body()` on a fresh loop; whatever happens, stop every job it started."""
    async def main():
        try:
            return await body()
        finally:
            await manager.shutdown()
    return run(main())


def new_manager(spawner, state_dir, **kw) -> JobManager:
    kw.setdefault("grace", 1.0)
    kw.setdefault("pids_max", 256)
    m = JobManager(str(state_dir), spawner, **kw)
    m.load()
    return m


def proc_table() -> dict[int, tuple[str, int]]:
    """pid -> (state, ppid) for every process of the host's pid namespace."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(name)] = (fields[0], int(fields[1]))
    return table


def descendants(root: int) -> list[int]:
    children = defaultdict(list)
    for pid, (_, ppid) in proc_table().items():
        children[ppid].append(pid)
    found, stack = [], [root]
    while stack:
        for child in children[stack.pop()]:
            found.append(child)
            stack.append(child)
    return sorted(found)


def zombies_of(*parents: int) -> list[int]:
    return sorted(pid for pid, (state, ppid) in proc_table().items() if state == "Z" and ppid in parents)


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {words}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


_our_job_ids: set[str] = set()


@pytest.fixture(autouse=True)
def _note_our_cgroups(monkeypatch):
    """Record the job cgroups this test makes, so that another run on the same machine (its
    live jobs, or what it leaked) is not taken for this test's leak. On a machine to itself,
    `new_cgroups()` is `leftover_cgroups()`. Afterwards, remove whatever of them is left (and
    with them any process still in them)."""
    _our_job_ids.clear()
    for kind in (cgroup.CgroupV1, cgroup.CgroupV2):
        def recording_init(self, job_id, _init=kind.__init__):
            _our_job_ids.add(job_id)
            _init(self, job_id)
        monkeypatch.setattr(kind, "__init__", recording_init)
    yield
    # What the engine leaked (the test has failed already) must not pile up on the machine.
    for job_id in sorted(_our_job_ids):
        cgroup.detect()(job_id).remove()


def new_cgroups() -> list[str]:
    """The job cgroups this test made that still exist."""
    return [c for c in leftover_cgroups() if os.path.basename(c) in _our_job_ids]


def assert_nothing_left(spawner, zombies_before: tuple[int, ...] = ()) -> None:
    """No job cgroup, no process under the spawner, no new zombie child of this process or the spawner.

    The cgroups go when the end is recorded; the spawner reaps the inits on SIGCHLD, so give it a moment.
    """
    deadline = time.monotonic() + 5 * SCALE
    while True:
        cgroups = new_cgroups()
        procs = descendants(spawner.pid)
        zombies = [z for z in zombies_of(os.getpid(), spawner.pid) if z not in zombies_before]
        if not (cgroups or procs or zombies) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert cgroups == []
    assert procs == [], describe(procs)
    assert zombies == []


def host_ipv4_addresses() -> list[str]:
    """The host's non-loopback IPv4 addresses (SIOCGIFADDR on each interface)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                reply = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            address = socket.inet_ntoa(reply[20:24])
            if not address.startswith("127."):
                found.append(address)
    return found


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


# ---- isolation -------------------------------------------------------------------------------

@pytest.mark.cgroup
def test_ps_shows_only_the_jobs_processes(manager, spawner):
    record, out = within(manager, lambda: run_job(manager, "ps", "-e", "-o", "pid=,comm="))
    assert (record.state, record.exit_code) == ("exited", 0), out
    assert out.decode().split() == ["1", "ijr-init", "2", "ps"]
    assert_nothing_left(spawner)


NET_PROBE = r"""
import json, os, socket, sys
port = int(sys.argv[1])
with open("/proc/net/dev") as f:
    devs = sorted(line.split(":")[0].strip() for line in f.read().splitlines()[2:])
result = {"sys_class_net": sorted(os.listdir("/sys/class/net")), "proc_net_dev": devs, "connect": {}}
for host in sys.argv[2:]:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        result["connect"][host] = "connected"
    except OSError as err:
        result["connect"][host] = f"{type(err).__name__} errno={err.errno}"
    finally:
        s.close()
print(json.dumps(result))
"""


@pytest.mark.cgroup
def test_network_is_an_unconnected_loopback(manager, spawner):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    targets = ["127.0.0.1", *host_ipv4_addresses()]
    try:
        for target in targets:  # the listener is reachable from the host: the job's failure means something
            with socket.create_connection((target, port), timeout=2):
                pass
            listener.accept()[0].close()
        record, out = within(manager, lambda: run_job(manager, "python3", "-c", NET_PROBE, str(port), *targets))
        assert (record.state, record.exit_code) == ("exited", 0), out
        result = json.loads(out)
        assert result["sys_class_net"] == ["lo"]
        assert result["proc_net_dev"] == ["lo"]
        for target in targets:
            assert result["connect"][target] != "connected", (target, result)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing from the job ever got queued
            listener.accept()
    finally:
        listener.close()
    assert_nothing_left(spawner)


@pytest.mark.cgroup
def test_hostname_is_the_jobs_own(manager, spawner):
    record, out = within(manager, lambda: run_job(manager, "uname", "-n"))
    assert out == f"ijr-{record.id[:8]}\n".encode()
    assert out.decode().strip() != socket.gethostname()
    assert socket.gethostname() == os.uname().nodename  # the host's name is untouched
    assert_nothing_left(spawner)


MOUNT_PROBE = """
mount -t tmpfs none {target}; echo "tmpfs=$?"
mount -t proc proc {target}; echo "proc=$?"
mount -t cgroup2 none {target}; echo "cgroup2=$?"
mount -t sysfs none {target}; echo "sysfs=$?"
mount -o remount,rw /proc/sys; echo "remount_proc_sys=$?"
mount -o remount,rw /proc; echo "remount_proc=$?"
umount /proc; echo "umount_proc=$?"
umount -l /proc; echo "umount_lazy_proc=$?"
echo 1 > /proc/sys/vm/drop_caches; echo "proc_sys_write=$?"
echo "mounted_here=$(grep -c " {target} " /proc/self/mountinfo)"
echo ready
sleep 100
"""


@pytest.mark.cgroup
def test_root_job_cannot_mount_and_its_mounts_never_reach_the_host(manager, spawner, tmp_path):
    target = tmp_path / "mnt"
    target.mkdir()
    state_dir = os.path.dirname(manager.jobs_dir)
    before = mount_points()

    async def body():
        record = await manager.start(OWNER, "sh", ["-c", MOUNT_PROBE.format(target=target)])
        out = await wait_output(manager, record.id, b"ready\n")
        # While the job runs (its init has mounted /proc, /sys, /dev and a mask over the state dir):
        during = mount_points()
        await manager.stop(record.id)
        return out, during

    out, during = within(manager, body)
    results = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    for name in ("tmpfs", "proc", "cgroup2", "sysfs", "remount_proc_sys", "remount_proc", "umount_proc", "umount_lazy_proc",
                 "proc_sys_write"):
        assert results.get(name, "0") != "0", f"{name} succeeded in a root job:\n{out.decode()}"
    assert results["mounted_here"] == "0"
    job_mounts = ("/proc", "/sys", "/dev", str(target), state_dir)  # what the job and its init mount
    for points in (during, mount_points()):
        extra = collections.Counter(points) - collections.Counter(before)
        leaked = [p for p in extra if any(p == m or p.startswith(m + "/") for m in job_mounts)]
        assert leaked == [], extra
    assert os.listdir(target) == []
    assert_nothing_left(spawner)


ENV_PROBE = r"""
import json, os, sys
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("latin-1")
    except OSError as err:
        return f"error {type(err).__name__}"
def fds(path):  # what the fds of a process give away: each one's target, and whether it opens
    found = {}
    try:
        names = os.listdir(path)
    except OSError as err:
        return f"error {type(err).__name__}"
    for name in names:
        try:
            found[name] = os.readlink(f"{path}/{name}")
        except OSError as err:
            found[name] = f"error {type(err).__name__}"
        try:
            os.close(os.open(f"{path}/{name}", os.O_RDONLY | os.O_NONBLOCK))
            found[name] += " (opened)"
        except OSError:
            pass
    return found
print(json.dumps({"self": read("/proc/self/environ"), "init_environ": read("/proc/1/environ"),
                  "init_cmdline": read("/proc/1/cmdline"), "init_mem": read("/proc/1/mem"),
                  "init_fds": fds("/proc/1/fd")}))
"""


@pytest.mark.cgroup
def test_environment_is_clean_and_init_shows_nothing_of_the_daemon(manager, spawner, monkeypatch):
    monkeypatch.setenv("IJR_TEST_SECRET", "x-secret-value")

    record, out = within(manager, lambda: run_job(manager, "python3", "-c", ENV_PROBE))
    assert (record.state, record.exit_code) == ("exited", 0), out
    result = json.loads(out)
    env = dict(item.split("=", 1) for item in result["self"].split("\0") if item)
    assert env == {"PATH": JOB_PATH, "HOME": "/", "IJR_JOB_ID": record.id}
    # The init was forked from this process: neither its environment nor its argv may show through.
    init_environ = result["init_environ"]
    assert init_environ.startswith("error") or init_environ.strip("\0") == "", init_environ[:500]
    cmdline = result["init_cmdline"]
    assert cmdline.rstrip("\0") == "ijr-init", cmdline[:500]
    # Nor can a root job reach into its init: its memory, or its fds (the daemon's stdio, its pipes).
    assert result["init_mem"].startswith("error"), result["init_mem"][:100]
    init_fds = result["init_fds"]
    if not isinstance(init_fds, str):  # the numbers may show, but nothing behind them
        init_fds = [f"{n}: {what}" for n, what in init_fds.items() if what != "error PermissionError"]
        assert init_fds == []
    for arg in sys.argv:
        if len(arg) >= 4:
            assert arg not in cmdline
    assert "x-secret-value" not in out.decode()
    assert_nothing_left(spawner)


FD_PROBE = r"""
import json, os
listed = sorted(int(n) for n in os.listdir("/proc/self/fd"))
still_open = []
for fd in listed:
    try:
        os.fstat(fd)
        still_open.append(fd)
    except OSError:
        pass  # the fd listdir used, closed by now
links = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in still_open}
print(json.dumps({"listed": listed, "open": still_open, "links": links}))
"""


@pytest.mark.cgroup
def test_job_has_only_stdin_null_and_one_output_pipe(manager, spawner):
    async def body():
        return await asyncio.gather(run_job(manager, "python3", "-c", FD_PROBE),
                                    run_job(manager, "ls", "/proc/self/fd"),
                                    run_job(manager, "readlink", "/proc/self/fd/0"))

    (_, py_out), (_, ls_out), (_, stdin_out) = within(manager, body)
    result = json.loads(py_out)
    assert result["open"] == [0, 1, 2], result
    assert len(result["listed"]) == 4, result  # 0, 1, 2 and the directory fd of the listing itself
    links = result["links"]
    assert links["0"] == "/dev/null"
    assert links["1"].startswith("pipe:") and links["1"] == links["2"], links
    assert ls_out.split() == [b"0", b"1", b"2", b"3"]  # 3: the directory ls is reading
    assert stdin_out == b"/dev/null\n"
    assert_nothing_left(spawner)


DEV_PROBE = r"""
import json, os, stat
kinds = {}
for top, dirs, files in os.walk("/dev"):
    for name in dirs + files:
        path = os.path.join(top, name)
        mode = os.lstat(path).st_mode
        kinds[path] = ("blk" if stat.S_ISBLK(mode) else "chr" if stat.S_ISCHR(mode) else
                       "dir" if stat.S_ISDIR(mode) else "lnk" if stat.S_ISLNK(mode) else "other")
try:
    os.mknod("/dev/ijr-test-disk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    mknod = "created"
except OSError as err:
    mknod = err.errno
print(json.dumps({"kinds": kinds, "mknod": mknod}))
"""


@pytest.mark.cgroup
def test_dev_has_no_block_devices(manager, spawner):
    record, out = within(manager, lambda: run_job(manager, "python3", "-c", DEV_PROBE))
    assert (record.state, record.exit_code) == ("exited", 0), out
    result = json.loads(out)
    kinds = result["kinds"]
    assert [p for p, k in kinds.items() if k == "blk"] == []
    top = {p.split("/")[2] for p in kinds}
    assert top <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
                   "stdin", "stdout", "stderr", "fd"}, sorted(top)
    assert kinds["/dev/null"] == "chr"
    assert result["mknod"] != "created"  # CAP_MKNOD is dropped: a root job can't make a disk node either
    assert_nothing_left(spawner)


RT_PROBE = r"""
import json, os
result = {}
for name in ("SCHED_FIFO", "SCHED_RR"):
    try:
        os.sched_setscheduler(0, getattr(os, name), os.sched_param(10))
        result[name] = "granted"
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as err:
        result[name] = f"error {err.errno}"
print(json.dumps(result))
"""


@pytest.mark.cgroup
def test_job_cannot_take_a_realtime_policy(manager, spawner):
    """Real-time tasks run ahead of every CFS task, whatever cpu.shares/cpu.weight say: a root job
    that could switch to SCHED_FIFO could take ~95% of each CPU it runs on from the host."""
    record, out = within(manager, lambda: run_job(manager, "python3", "-c", RT_PROBE))
    assert (record.state, record.exit_code) == ("exited", 0), out
    result = json.loads(out)
    assert result == {"SCHED_FIFO": "error 1", "SCHED_RR": "error 1"}, result
    assert_nothing_left(spawner)


MASK_PROBE = r"""
import json, os, sys
secret_dir, secret_file, state_dir = sys.argv[1:4]
def attempt(fn):
    try:
        return fn()
    except OSError as err:
        return f"error {err.errno}"
def write_into_dir():
    with open(os.path.join(secret_dir, "planted"), "w") as f:
        f.write("x")
    return "written"
def overwrite_file():
    with open(secret_file, "w") as f:
        f.write("overwritten")
    return "written"
print(json.dumps({
    "dir": attempt(lambda: sorted(os.listdir(secret_dir))),
    "file": attempt(lambda: open(secret_file).read()),
    "state_dir": attempt(lambda: sorted(os.listdir(state_dir))),
    "write_into_dir": attempt(write_into_dir),
    "overwrite_file": attempt(overwrite_file),
}))
"""


@pytest.mark.cgroup
def test_masked_paths_look_empty(spawner, tmp_path):
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    (secret_dir / "key.pem").write_text("the key")
    secret_file = tmp_path / "token"
    secret_file.write_text("the token")
    state_dir = tmp_path / "state"
    manager = new_manager(spawner, state_dir, mask=(str(secret_dir), str(secret_file)))

    record, out = within(manager, lambda: run_job(manager, "python3", "-c", MASK_PROBE,
                                                  str(secret_dir), str(secret_file), str(state_dir)))
    assert (record.state, record.exit_code) == ("exited", 0), out
    result = json.loads(out)
    assert result["dir"] == []
    assert result["file"] == ""
    assert result["state_dir"] == []  # the daemon's own state (other jobs' output) is always masked
    assert result["write_into_dir"].startswith("error"), result
    # The host's files are untouched.
    assert os.listdir(secret_dir) == ["key.pem"]
    assert (secret_dir / "key.pem").read_text() == "the key"
    assert secret_file.read_text() == "the token"
    assert os.listdir(state_dir / "jobs") == [record.id]
    assert_nothing_left(spawner)


HANDLE_PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
handle = bytes.fromhex(sys.argv[1])
mount_fd = os.open("/", os.O_RDONLY)
fd = libc.open_by_handle_at(mount_fd, ctypes.create_string_buffer(handle, len(handle)), os.O_RDONLY)
print(os.read(fd, 100).decode() if fd >= 0 else "errno %d" % ctypes.get_errno())
"""


def file_handle(path: str) -> bytes:
    """name_to_handle_at(): the kernel's handle of a file, as the host sees it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint.from_buffer(buf).value = 128  # handle_bytes
    mount_id = ctypes.c_int()
    assert libc.name_to_handle_at(-100, path.encode(), buf, ctypes.byref(mount_id), 0) == 0, ctypes.get_errno()
    size = ctypes.c_uint.from_buffer(buf).value
    return buf.raw[:8 + size]


def test_masked_secret_cannot_be_opened_by_its_handle(spawner, tmp_path):
    """open_by_handle_at reaches a file by inode, past any mount over it: jobs lack the
    capability it needs (CAP_DAC_READ_SEARCH), so a masked secret stays hidden."""
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    (secret_dir / "secret").write_text("the secret")
    handle = file_handle(str(secret_dir / "secret"))
    host = subprocess.run([sys.executable, "-c", HANDLE_PROBE, handle.hex()], capture_output=True, text=True)
    if host.stdout.strip() != "the secret":
        pytest.skip(f"this filesystem does not open by handle even for the host: {host.stdout}{host.stderr}")
    manager = new_manager(spawner, tmp_path / "state", mask=(str(secret_dir),))
    record, out = within(manager, lambda: run_job(manager, "python3", "-c", HANDLE_PROBE, handle.hex()))
    assert out == b"errno 1\n", out  # EPERM
    assert_nothing_left(spawner)


def test_full_disk_cuts_the_output_cleanly(spawner, tmp_path):
    """The state directory's disk fills: the job runs to its end, readers get what was kept and
    finish, and the record says where the output was cut."""
    state = tmp_path / "small"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)], check=True)
    try:
        manager = new_manager(spawner, state)
        record, out = within(manager, lambda: run_job(
            manager, "sh", "-c", "head -c 5000000 /dev/zero; echo done >&2; exit 3", timeout=30))
        assert (record.state, record.exit_code) == ("exited", 3)
        assert 0 < len(out) < 2 * 1024 * 1024 and out == bytes(len(out))
        assert record.error.startswith(f"output cut at {len(out)} bytes: No space left on device"), record.error
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)
    assert_nothing_left(spawner)


@pytest.mark.cgroup
def test_cannot_execute_leaves_nothing_behind(manager, spawner, tmp_path):
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\necho hi\n")
    not_executable.chmod(0o644)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x01\x02 this is no program\n" * 10)
    garbage.chmod(0o755)
    bad_interpreter = tmp_path / "bad-interpreter"
    bad_interpreter.write_text("#!/nonexistent/ijr-interpreter\n")
    bad_interpreter.chmod(0o755)
    cases = [
        ("/nonexistent/ijr-test-command", "no such file"),
        (str(not_executable), "permission denied"),
        (str(tmp_path), "directory"),
        ("ijr-no-such-command-in-path", "no such file"),
        (str(garbage), "exec format error"),
        (str(bad_interpreter), "no such file"),
    ]
    zombies_before = tuple(zombies_of(os.getpid(), spawner.pid))

    async def body():
        for command, why in cases:
            with pytest.raises(CannotExecute) as info:
                await manager.start(OWNER, command, ["an-argument"])
            message = str(info.value)
            assert command in message and why in message.lower(), (command, message)
        assert manager.list(include_finished=True) == []
        assert os.listdir(manager.jobs_dir) == []
        assert new_cgroups() == []
        # The spawner still works.
        return await run_job(manager, "echo", "still", "works")

    record, out = within(manager, body)
    assert out == b"still works\n" and record.state == "exited"
    assert [r.id for r in manager.list(include_finished=True)] == [record.id]
    assert_nothing_left(spawner, zombies_before)


class CountingSpawner:
    """The real spawner, counting how often a job was asked for."""

    def __init__(self, real):
        self.real = real
        self.calls = 0

    def spawn(self, *args):
        self.calls += 1
        return self.real.spawn(*args)


@pytest.mark.cgroup
def test_bad_limits_are_refused_before_anything_starts(spawner, tmp_path):
    counting = CountingSpawner(spawner)
    manager = new_manager(counting, tmp_path / "state")
    cases = [
        (dict(write_iops="/dev/null:5"), "not a block device"),
        (dict(read_iops="/dev/ijr-no-such-disk:5"), "no such file"),
        (dict(read_iops="4095:4095:5"), "unknown block device"),
        (dict(write_iops=f"{tmp_path}:5"), "not a block device"),
        (dict(write_iops="/dev/null"), "bad iops"),
        (dict(read_iops="/dev/null:0"), "bad iops"),
        (dict(cpu_shares=1), "cpu shares"),
        (dict(cpu_shares=300000), "cpu shares"),
        (dict(cpu_shares=-5), "cpu shares"),
        (dict(memory_bytes=1000), "memory"),
        (dict(memory_bytes=-1), "memory"),
    ]

    async def body():
        for limits, why in cases:
            with pytest.raises(InvalidArgument) as info:
                await manager.start(OWNER, "true", [], **limits)
            assert why in str(info.value).lower(), (limits, str(info.value))
        for command, args in (("", []), ("   ", []), ("echo", ["a\0b"])):
            with pytest.raises(InvalidArgument):
                await manager.start(OWNER, command, args)

    within(manager, body)
    assert counting.calls == 0
    assert _our_job_ids == set()  # not even a cgroup was made
    assert manager.list(include_finished=True) == []
    assert os.listdir(manager.jobs_dir) == []
    assert_nothing_left(spawner)


# ---- limits ----------------------------------------------------------------------------------

@pytest.mark.cgroup
def test_memory_limit_oom_kill_is_reported_and_only_then(manager, spawner):
    limit = 50 << 20

    async def body():
        return await asyncio.gather(
            run_job(manager, "python3", "-c", "b = b'\\1' * (200 << 20); print('survived')",
                    memory_bytes=limit, timeout=30),
            run_job(manager, "python3", "-c", "b = b'\\1' * (10 << 20); print('fits')", memory_bytes=limit),
            run_job(manager, "sh", "-c", "kill -9 $$", memory_bytes=limit),
            run_job(manager, "sh", "-c", "exit 137", memory_bytes=limit),
        )

    (big, big_out), (small, small_out), (self_killed, _), (exit137, _) = within(manager, body)
    assert (big.state, big.oom_killed, big.signal, big.exit_code) == ("oom_killed", True, 9, None), big_out
    assert b"survived" not in big_out
    assert (small.state, small.exit_code, small.oom_killed) == ("exited", 0, False)
    assert small_out == b"fits\n"
    assert (self_killed.state, self_killed.signal, self_killed.oom_killed) == ("killed", 9, False)
    assert (exit137.state, exit137.exit_code, exit137.signal, exit137.oom_killed) == ("exited", 137, None, False)
    assert_nothing_left(spawner)


@pytest.mark.cgroup
def test_smallest_accepted_memory_limit_runs_or_is_refused_clearly(manager, spawner):
    """The least memory limit start() accepts either runs a trivial job (which may end OOM-killed)
    or is refused as too small; it must not claim the command cannot be executed."""
    async def body():
        try:
            return await run_job(manager, "true", memory_bytes=limits.MEMORY_MIN)
        except (InvalidArgument, CannotExecute) as err:
            return err

    result = within(manager, body)
    if isinstance(result, Exception):
        assert isinstance(result, InvalidArgument) and "memory" in str(result), (
            f"memory_bytes={limits.MEMORY_MIN} (the least accepted) gave {result!r}")
    else:
        record, _ = result
        assert record.state == "exited" or (record.state, record.oom_killed) == ("oom_killed", True), record
    assert_nothing_left(spawner)


CPU_BURNER = r"""
import os, sys, time
go = sys.argv[1]
print("ready", flush=True)
while not os.path.exists(go):  # burning already, until the test says when to measure
    pass
with open(go) as f:
    t1, t2 = (float(t) for t in f.read().split())
while time.time() < t1:
    pass
c1 = time.process_time()
while time.time() < t2:
    pass
print(time.process_time() - c1)
"""


@pytest.mark.cgroup
def test_cpu_shares_divide_one_cpu(manager, spawner, tmp_path):
    cpu = min(os.sched_getaffinity(0))
    window = 3.0
    go = tmp_path / "go"

    async def body():
        args = ["-c", str(cpu), "python3", "-c", CPU_BURNER, str(go)]
        high = await manager.start(OWNER, "taskset", args, cpu_shares=2048)
        low = await manager.start(OWNER, "taskset", args, cpu_shares=1024)
        for record in (high, low):
            await wait_output(manager, record.id, b"ready\n", timeout=30)
        # Both burn on one CPU; only the same window, from t1 to t2, is measured in each.
        t1 = time.time() + 0.5
        (tmp_path / "go.tmp").write_text(f"{t1} {t1 + window}")
        os.rename(tmp_path / "go.tmp", go)
        return [(manager.get(r.id).record, await collect(manager, r.id, timeout=30)) for r in (high, low)]

    (high, high_out), (low, low_out) = within(manager, body)
    assert (high.state, high.exit_code, low.state, low.exit_code) == ("exited", 0, "exited", 0), (high_out, low_out)
    high_cpu, low_cpu = float(high_out.split()[-1]), float(low_out.split()[-1])
    if cgroup_version() == 1:
        expected = 2.0
    else:
        expected = cgroup.shares_to_weight(2048) / cgroup.shares_to_weight(1024)
    ratio = high_cpu / low_cpu
    detail = f"cpu {high_cpu:.2f}s vs {low_cpu:.2f}s in {window}s, ratio {ratio:.2f}, expected {expected:.2f}"
    print(detail)
    assert 1.5 <= ratio <= 2.7, detail
    assert abs(ratio / expected - 1) < 0.25, detail
    assert high_cpu + low_cpu <= window * 1.1, detail  # they really shared one CPU
    assert high_cpu + low_cpu >= window * 0.5, detail
    assert_nothing_left(spawner)


def _sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def _dd_seconds(out: bytes) -> float:
    match = re.search(rb"copied, ([0-9.]+) s", out)
    assert match, out
    return float(match.group(1))


@pytest.mark.cgroup
def test_iops_limits_throttle_direct_io(manager, spawner, tmp_path):
    missing = [t for t in ("mkfs.ext4", "losetup", "mount", "umount", "dd") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} to make a file system on a scratch block device")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    loop_device, mounted = None, False
    try:
        device = os.environ.get("IJR_VM_DISK")
        if not device:  # on the host, a loop device on a sparse file
            image = tmp_path / "disk.img"
            with open(image, "wb") as f:
                f.truncate(64 << 20)
            loop_device = device = _sh("losetup", "-f", "--show", str(image))
        _sh("mkfs.ext4", "-q", "-F", device)
        _sh("mount", device, str(mnt))
        mounted = True
        rdev = os.stat(device).st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        for name in ("w", "r"):  # allocated and on disk, so the jobs' direct I/O is all data I/O
            with open(mnt / name, "wb") as f:
                f.write(os.urandom(100 * 4096))
                os.fsync(f.fileno())
        write = ["dd", "if=/dev/zero", f"of={mnt}/w", "bs=4096", "count=100", "oflag=direct", "conv=notrunc"]
        read = ["dd", f"if={mnt}/r", "of=/dev/null", "bs=4096", "count=100", "iflag=direct"]

        async def body():
            free = await asyncio.gather(run_job(manager, *write, timeout=30), run_job(manager, *read, timeout=30))
            throttled = await asyncio.gather(
                run_job(manager, *write, write_iops=f"{device}:50", timeout=30),
                run_job(manager, *read, read_iops=f"{major}:{minor}:50", timeout=30))
            return free, throttled

        free, throttled = within(manager, body)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if loop_device:
            subprocess.run(["losetup", "-d", loop_device], check=False)

    for record, out in (*free, *throttled):
        assert (record.state, record.exit_code) == ("exited", 0), out
    (w_free, _), (r_free, _) = ((_dd_seconds(o), r) for r, o in free)
    (w_slow, w_rec), (r_slow, r_rec) = ((_dd_seconds(o), r) for r, o in throttled)
    assert w_rec.write_iops == f"{device}:50" and r_rec.read_iops == f"{major}:{minor}:50"
    upper = 4.0 if SCALE == 1 else 8.0
    detail = f"100 direct 4k I/Os: write {w_free:.2f}s free, {w_slow:.2f}s at 50/s; " \
             f"read {r_free:.2f}s free, {r_slow:.2f}s at 50/s"
    print(detail)
    assert 1.4 <= w_slow <= upper, detail
    assert 1.4 <= r_slow <= upper, detail
    assert w_free < w_slow / 2 and r_free < r_slow / 2, detail
    assert_nothing_left(spawner)


# Every process forks for ever; a refused fork (EAGAIN at the cap) only makes it wait a little.
FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""


@pytest.mark.cgroup
def test_pids_limit_caps_a_fork_bomb(spawner, tmp_path):
    manager = new_manager(spawner, tmp_path / "state", pids_max=64)

    def pids_events(job) -> dict[str, int]:
        directory = job.cgroup.dirs["pids"] if cgroup_version() == 1 else job.cgroup.dir
        with open(os.path.join(directory, "pids.events")) as f:
            return {k: int(v) for k, v in (line.split() for line in f)}

    def count(job) -> int:
        most = 0
        for path in job.cgroup.procs_files():
            with open(path) as f:
                most = max(most, len(f.read().split()))
        return most

    async def body():
        record = await manager.start(OWNER, "python3", ["-c", FORK_BOMB])
        job = manager.get(record.id)
        counts = []
        end = time.monotonic() + 1.5 * min(SCALE, 4)
        while time.monotonic() < end and not job.ended.is_set():
            counts.append(count(job))
            await asyncio.sleep(0.02)
        while count(job) < 60 and not job.ended.is_set() and time.monotonic() < end + 10 * SCALE:
            counts.append(count(job))  # a slow machine: give it time to reach the cap
            await asyncio.sleep(0.05)
        events = pids_events(job)
        assert not job.ended.is_set(), "the fork bomb's job ended by itself"
        began = time.monotonic()
        stopped = await manager.stop(record.id)
        return counts, events, stopped, time.monotonic() - began

    counts, events, stopped, stop_seconds = within(manager, body)
    print(f"processes in the job's cgroup: {counts[:8]} ... {counts[-8:]}; pids.events {events}; "
          f"stopped in {stop_seconds:.2f}s")
    assert max(counts) <= 64, counts
    assert max(counts) >= 60, counts  # it really was a bomb, and it did reach the cap
    assert events.get("max", 0) > 0, events  # forks were refused at the cap
    assert stopped.state == "stopped"
    assert stop_seconds < 5 * SCALE
    assert_nothing_left(spawner)


# ---- output ----------------------------------------------------------------------------------

async def _digest(manager: JobManager, job_id: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    async for chunk in manager.output(job_id):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _file_digest(path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def test_100mb_output_same_for_20_live_readers_and_a_late_one(manager, spawner):
    size = 100_000_000

    async def body():
        record = await manager.start(OWNER, "head", ["-c", str(size), "/dev/urandom"])
        readers = [asyncio.create_task(_digest(manager, record.id)) for _ in range(20)]
        live = await asyncio.wait_for(asyncio.gather(*readers), 120)
        job = manager.get(record.id)
        assert job.ended.is_set()
        late = await _digest(manager, record.id)
        on_disk = await asyncio.to_thread(_file_digest, job.output.path)
        return job.record, live, late, on_disk

    record, live, late, on_disk = within(manager, body)
    assert (record.state, record.exit_code) == ("exited", 0)
    assert on_disk[1] == size
    assert set(live) == {on_disk}
    assert late == on_disk
    assert_nothing_left(spawner)


def test_last_line_without_newline_is_kept(manager, spawner):
    record, out = within(manager, lambda: run_job(manager, "printf", "a\\nb"))
    assert out == b"a\nb"
    assert record.exit_code == 0
    assert_nothing_left(spawner)


def test_background_process_does_not_keep_the_job_alive(manager, spawner):
    began = time.monotonic()
    record, out = within(manager, lambda: run_job(manager, "sh", "-c", "sleep 987 & echo hi"))
    assert time.monotonic() - began < 5
    assert out == b"hi\n"
    assert (record.state, record.exit_code) == ("exited", 0)
    assert_nothing_left(spawner)
    for pid in proc_table():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f.read() != b"sleep\x00987\x00", f"the job's background sleep survived as {pid}"
        except OSError:
            pass


def test_stdout_and_stderr_are_merged_in_order(manager, spawner):
    record, out = within(manager, lambda: run_job(manager, "sh", "-c", "echo 1; echo 2 >&2; echo 3; echo 4 >&2"))
    assert out == b"1\n2\n3\n4\n"
    assert_nothing_left(spawner)


def test_output_is_complete_when_the_job_exits_right_after_writing(manager, spawner):
    async def body():
        jobs = []
        for _ in range(4):
            jobs.append(run_job(manager, "head", "-c", "5000000", "/dev/zero"))  # more than the pipe holds
            jobs.append(run_job(manager, "sh", "-c", "printf x%.0s $(seq 1 100000)"))
        return await asyncio.gather(*jobs)

    results = within(manager, body)
    for i, (record, out) in enumerate(results):
        assert record.exit_code == 0
        if i % 2 == 0:
            assert len(out) == 5_000_000 and out.count(0) == 5_000_000
        else:
            assert out == b"x" * 100_000
    assert_nothing_left(spawner)


def test_slow_reader_does_not_block_the_job(manager, spawner):
    size = 20_000_000

    async def body():
        record = await manager.start(OWNER, "head", ["-c", str(size), "/dev/zero"])
        slow = manager.output(record.id)
        first = await slow.__anext__()  # then the reader stalls
        vanished = manager.output(record.id)
        await vanished.__anext__()
        await vanished.aclose()  # and this one goes away
        job = manager.get(record.id)
        await asyncio.wait_for(job.ended.wait(), 5)
        rest = [chunk async for chunk in slow]  # the stalled reader still gets everything
        return job.record, len(first) + sum(map(len, rest))

    record, total = within(manager, body)
    assert (record.state, record.exit_code) == ("exited", 0)
    assert total == size
    assert_nothing_left(spawner)


# ---- lifecycle -------------------------------------------------------------------------------

def test_stop_kills_a_job_ignoring_term_after_the_grace_period(manager, spawner):
    async def body():
        record = await manager.start(OWNER, "sh", ["-c", "trap '' TERM; echo ready; sleep 100"])
        await wait_output(manager, record.id, b"ready\n")
        assert [r.id for r in manager.list()] == [record.id]
        began = time.monotonic()
        stopped = await manager.stop(record.id)
        took = time.monotonic() - began
        assert manager.list() == [] and [r.id for r in manager.list(include_finished=True)] == [record.id]
        return stopped, took

    stopped, took = within(manager, body)
    assert (stopped.state, stopped.signal, stopped.exit_code) == ("stopped", 9, None)
    assert manager.grace <= took < manager.grace + 3
    assert_nothing_left(spawner)


def test_stop_forwards_term_to_the_command(spawner, tmp_path):
    manager = new_manager(spawner, tmp_path / "state", grace=5.0)
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 100 & wait"

    async def body():
        record = await manager.start(OWNER, "sh", ["-c", script])
        await wait_output(manager, record.id, b"ready\n")
        began = time.monotonic()
        stopped = await manager.stop(record.id)
        took = time.monotonic() - began
        again = await manager.stop(record.id)  # stopping an ended job just returns its record
        out = await collect(manager, record.id)
        return stopped, took, again, out

    stopped, took, again, out = within(manager, body)
    assert out == b"ready\ngot TERM\n"
    assert (stopped.state, stopped.exit_code) == ("stopped", 7)
    assert took < manager.grace  # ended by its own TERM handler, not by the KILL after the grace period
    assert again is stopped and again.state == "stopped"
    assert_nothing_left(spawner)


def test_exit_codes_and_signals(manager, spawner):
    async def body():
        return await asyncio.gather(run_job(manager, "sh", "-c", "exit 3"),
                                    run_job(manager, "sh", "-c", "kill -9 $$"),
                                    run_job(manager, "sh", "-c", "kill -TERM $$"),
                                    run_job(manager, "true"))

    (three, _), (nine, _), (term, _), (zero, _) = within(manager, body)
    assert (three.state, three.exit_code, three.signal) == ("exited", 3, None)
    assert (nine.state, nine.exit_code, nine.signal) == ("killed", None, 9)
    assert (term.state, term.exit_code, term.signal) == ("killed", None, 15)
    assert (zero.state, zero.exit_code, zero.signal) == ("exited", 0, None)
    assert zero.end >= zero.start
    assert_nothing_left(spawner)


def test_unknown_and_malformed_job_ids(manager):
    async def body():
        with pytest.raises(NotFound):
            await manager.stop(str(uuid.uuid4()))
        with pytest.raises(InvalidArgument):
            await manager.stop("../../etc")
        with pytest.raises(NotFound):
            manager.get(str(uuid.uuid4()))
        with pytest.raises(InvalidArgument):
            [c async for c in manager.output("not-a-job-id")]

    within(manager, body)


def test_finished_jobs_survive_a_restart(spawner, tmp_path):
    state_dir = tmp_path / "state"
    first = new_manager(spawner, state_dir)

    async def body():
        return await asyncio.gather(run_job(first, "sh", "-c", "echo out; echo err >&2; exit 3"),
                                    run_job(first, "sh", "-c", "printf partial; kill -9 $$"),
                                    run_job(first, "printf", "no newline"))

    results = within(first, body)
    before = {record.id: (dataclasses.asdict(record), out) for record, out in results}
    # A record a crashed daemon left as running (with its output so far).
    crashed = dataclasses.replace(results[0][0], id=str(uuid.uuid4()), state="running", end=None, exit_code=None)
    directory = state_dir / "jobs" / crashed.id
    directory.mkdir(mode=0o700)
    (directory / "job.json").write_text(json.dumps(dataclasses.asdict(crashed)))
    (directory / "output").write_bytes(b"half")

    second = new_manager(spawner, state_dir)

    async def reread():
        return {job_id: await collect(second, job_id) for job_id in [*before, crashed.id]}

    outputs = within(second, reread)
    assert second.list() == []
    records = {r.id: r for r in second.list(include_finished=True)}
    assert set(records) == {*before, crashed.id}
    for job_id, (record, out) in before.items():
        assert dataclasses.asdict(records[job_id]) == record
        assert outputs[job_id] == out
    assert [before[r.id][0]["state"] for r, _ in results] == ["exited", "killed", "exited"]
    assert outputs[results[1][0].id] == b"partial"
    revived = records[crashed.id]
    assert (revived.state, revived.signal) == ("killed", 9) and revived.error and revived.end
    assert outputs[crashed.id] == b"half"
    with open(directory / "job.json") as f:
        assert json.load(f)["state"] == "killed"  # and that was saved
    assert_nothing_left(spawner)


@pytest.mark.cgroup
def test_load_sweeps_its_own_leftover_cgroups_only(manager, spawner, tmp_path):
    within(manager, lambda: run_job(manager, "true"))  # the parents exist and are set up
    kind = cgroup.detect()
    state_dir = tmp_path / "crashed-state"
    own, foreign = str(uuid.uuid4()), str(uuid.uuid4())
    # A job a crashed daemon recorded as running, whose cgroups it left.
    record = dataclasses.replace(manager.jobs[next(iter(manager.jobs))].record, id=own, state="running",
                                 end=None, exit_code=None)
    (state_dir / "jobs" / own).mkdir(parents=True)
    (state_dir / "jobs" / own / "job.json").write_text(json.dumps(dataclasses.asdict(record)))
    made = [os.path.join(parent, job_id) for parent in kind.parents() for job_id in (own, foreign)]
    try:
        for path in made:
            os.mkdir(path)
        reloaded = new_manager(spawner, state_dir)
        assert [p for p in made if os.path.exists(p)] == [p for p in made if foreign in p]
        assert reloaded.get(own).record.state == "killed"
    finally:
        for path in made:
            if os.path.isdir(path):
                os.rmdir(path)
    assert_nothing_left(spawner)


@pytest.mark.cgroup
def test_many_short_jobs_leave_no_cgroups(spawner, tmp_path, caplog):
    """Each job's cgroup goes when its end is recorded, and a failed start's before start()
    raises, however long the job's init takes to die: its exit tears down the job's mount
    namespace, which takes longer the more mounts it holds (here the masks; on a real host its
    own mounts, all copied into every job)."""
    masks = []
    for i in range(300):
        masks.append(str(tmp_path / "masked" / str(i)))
        os.makedirs(masks[-1])
    manager = new_manager(spawner, tmp_path / "state", mask=tuple(masks))
    count, rounds = (30, 3) if SCALE == 1 else (8, 1)

    async def failed_start():
        try:
            await manager.start(OWNER, "/nonexistent/ijr-test-command", [])
        except Exception as err:  # noqa: BLE001 - the kind is what is checked
            return err
        return None

    async def body():
        ran, failed = [], []
        for _ in range(rounds):
            results = await asyncio.gather(*(run_job(manager, "true", timeout=30) for _ in range(count)),
                                           *(failed_start() for _ in range(count)))
            ran += results[:count]
            failed += results[count:]
        return ran, failed

    ran, failed = within(manager, body)
    assert [(r.state, r.exit_code) for r, _ in ran] == [("exited", 0)] * count * rounds
    wrong = [repr(err) for err in failed if not isinstance(err, CannotExecute)]
    failures = [r.getMessage() for r in caplog.records if "clean-up failed" in r.getMessage()]
    assert (wrong, failures) == ([], []), (
        f"{len(wrong)} of {count * rounds} failed starts raised something else than CannotExecute; "
        f"the cgroups of {len(failures)} of {count * rounds} ended jobs could not be removed")
    assert_nothing_left(spawner)


class GatedSpawner:
    """The real spawner; after each spawn it tells the loop, then waits to be let go."""

    def __init__(self, real, loop: asyncio.AbstractEventLoop):
        self.real, self.loop = real, loop
        self.spawned = asyncio.Event()
        self.release = threading.Event()

    def spawn(self, *args):
        result = self.real.spawn(*args)
        self.loop.call_soon_threadsafe(self.spawned.set)
        self.release.wait(30)
        return result


def open_fds() -> list[int]:
    """This process's fds, without the one the listing itself used."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
            fds.append(int(name))
        except OSError:
            pass
    return sorted(fds)


@pytest.mark.cgroup
@pytest.mark.parametrize("phase", ["spawning", "awaiting-first-report"])
def test_cancelled_start_leaves_nothing_behind(manager, spawner, phase):
    """A start cancelled half-way (its gRPC client gave up, or the daemon is shutting down) must
    neither leave the job running unowned, nor its cgroup, nor the daemon's fds for it."""
    job_ids = []
    fds_before = open_fds()

    def found_job() -> bool:
        names = os.listdir(manager.jobs_dir)
        if names and (phase == "spawning" or os.path.exists(os.path.join(manager.jobs_dir, names[0], "output"))):
            job_ids.append(names[0])
            return True
        return False

    async def body():
        gate = GatedSpawner(spawner, asyncio.get_running_loop())
        if phase == "spawning":
            manager.spawner = gate
        task = asyncio.create_task(manager.start(OWNER, "sleep", ["100"]))
        if phase == "spawning":  # the spawner has started the job; the start still awaits its answer
            await asyncio.wait_for(gate.spawned.wait(), 10 * SCALE)
            assert found_job()
        else:
            # The output file appears in the very step that then awaits the init's first report line,
            # and this loop runs again before the loop can deliver that line.
            for _ in range(100000):
                if found_job():
                    break
                assert not task.done(), task
                await asyncio.sleep(0)
            else:
                raise AssertionError("the start never got to the spawner")
        task.cancel()
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5 * SCALE)  # whatever clean-up the manager does in the background
        return [r.id for r in manager.list(include_finished=True)]

    listed = within(manager, body)
    if listed:  # kept and tracked (shutdown stopped it): acceptable, as long as nothing leaks
        assert listed == job_ids
    else:
        assert os.listdir(manager.jobs_dir) == []
    leaked = descendants(spawner.pid)  # (if so, the fixture's clean-up kills it with its cgroup)
    assert leaked == [], f"the cancelled job is still running, unowned: {describe(leaked)}"
    assert_nothing_left(spawner)
    leaked_fds = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in set(open_fds()) - set(fds_before)}
    assert leaked_fds == {}, "the daemon kept fds of the cancelled job"


def test_orphans_are_reaped_inside_the_job(manager, spawner):
    record, out = within(manager, lambda: run_job(
        manager, "sh", "-c", "(sleep 0.1 &) ; sleep 0.5; ps -e -o stat= | grep -c Z"))
    assert out == b"0\n", out
    assert_nothing_left(spawner)
