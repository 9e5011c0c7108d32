"""The spawner: the only process that forks jobs, and the init that runs inside each job.

grpc must never fork without exec, so the daemon forks this small single-threaded process
before it imports grpc. For each job it forks a child that unshares the job's namespaces and
forks the job's init (PID 1 of the new PID namespace), then exits, so the init is reparented
to the spawner, a subreaper. The init joins the job's cgroups, builds the job's view of the
system, spawns the command, forwards TERM/INT/HUP to it, reaps orphans, and when the
command exits kills whatever is left, so nothing keeps the job or its output open.

The init tells the daemon what happened on a report pipe, one line each:
`started`, `error <why>`, then `exit <code>` or `signal <n>`.
If the spawner dies, every init sees its lifeline pipe close and ends its job.
"""
import errno
import json
import os
import select
import signal
import socket
import stat
import threading

from ijr import linux

JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# /proc entries a root job could use to reach the host: made read-only.
PROC_READONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
# The device nodes a job gets: no disks, no host terminals.
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
SO_SNDBUFFORCE = 32
MAX_MESSAGE = 8 << 20  # a spec carries up to 1 MiB of arguments, JSON-escaped


class Spawner:
    """The daemon's handle on the spawner process. Create it before importing grpc."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, MAX_MESSAGE)  # one spec, one message
        self.pid = os.fork()
        if self.pid == 0:
            parent.close()
            try:
                _serve(child)
            finally:
                os._exit(0)
        child.close()
        self._sock = parent
        self._lock = threading.Lock()

    def spawn(self, spec: dict, out_fd: int, report_fd: int) -> tuple[int, int]:
        """Start a job; returns (pid, pidfd) of its init. Thread-safe; blocks for a few ms.

        The init's first report line says whether the command was executed.
        """
        with self._lock:
            socket.send_fds(self._sock, [json.dumps(spec, ensure_ascii=False).encode()], [out_fd, report_fd])
            data, fds, _, _ = socket.recv_fds(self._sock, MAX_MESSAGE, 1)
        if not data:
            raise RuntimeError("the spawner process has died")
        reply = json.loads(data)
        if "error" in reply:
            raise OSError(reply.get("errno", 0), reply["error"])
        if not fds:  # the daemon is out of descriptors: the job can't be watched, so it can't run
            os.kill(reply["pid"], signal.SIGKILL)
            raise OSError(errno.EMFILE, "too many open files in ijrd: no descriptor left for the job")
        return reply["pid"], fds[0]

    def close(self) -> None:
        """Closing the socket ends the spawner; its jobs' inits then kill their jobs."""
        self._sock.close()
        os.waitpid(self.pid, 0)


# ---- the spawner process -------------------------------------------------------------------

def _serve(sock: socket.socket) -> None:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    linux.set_name("ijr-spawner")
    linux.scrub_cmdline("ijr-spawner")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we end
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            _drain(wake_r)
            _reap()
        if sock in ready:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
            if not data:
                return  # the daemon is gone: exiting closes the lifeline
            spec = json.loads(data)
            try:
                pid, pidfd = _start(spec, fds, lifeline_r, keep_closed=(sock.fileno(), lifeline_w, wake_r, wake_w))
                socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd])
                os.close(pidfd)
            except OSError as err:
                sock.send(json.dumps({"error": str(err), "errno": err.errno}).encode())
            finally:
                for fd in fds:
                    os.close(fd)


def _start(spec: dict, fds: list[int], lifeline_r: int, keep_closed: tuple[int, ...]) -> tuple[int, int]:
    """Double fork: the middle child unshares; its child is PID 1 of the job."""
    out_fd, report_fd = fds
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    middle = os.fork()
    if middle == 0:
        try:
            os.close(pid_r)
            signal.set_wakeup_fd(-1)  # the spawner's, closed just below
            for fd in keep_closed:
                os.close(fd)
            linux.unshare(linux.JOB_NAMESPACES)
            init = os.fork()
            if init == 0:
                _job_init(spec, out_fd, report_fd, lifeline_r)
            os.write(pid_w, str(init).encode())
        except BaseException as err:  # noqa: BLE001 - a forked child must never return
            _report(report_fd, f"error {_reason(err)}")
        finally:
            os._exit(0)
    os.close(pid_w)
    data = _read_all(pid_r)
    os.close(pid_r)
    os.waitpid(middle, 0)
    if not data:
        raise OSError(errno.ECHILD, "the job's namespaces could not be created (see the job's report)")
    pid = int(data)
    return pid, os.pidfd_open(pid)  # before any reaping, so the pid can't be reused yet


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ---- the job's init (PID 1 of the job) -----------------------------------------------------

def _job_init(spec: dict, out_fd: int, report_fd: int, lifeline_r: int) -> None:
    """Never returns. Reports `started` or `error ...`, then the command's end."""
    final = ""
    try:
        _close_all_but(out_fd, report_fd, lifeline_r)
        for fd in (out_fd, report_fd, lifeline_r):
            os.set_inheritable(fd, False)  # the command inherits only 0, 1 and 2
        linux.set_name("ijr-init")
        linux.scrub_cmdline("ijr-init")
        linux.prctl(linux.PR_SET_DUMPABLE, 0)  # a root job can't read the init's memory
        os.setsid()  # off the daemon's terminal: a Ctrl-C meant for ijrd never reaches a job
        pending: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda n, _: pending.append(n))
        for procs in spec["procs"]:
            with open(procs, "w") as f:
                f.write("0")
        _isolate(spec)
        command = _resolve(spec["command"])
        pid = _spawn_command(command, spec, out_fd)
        os.close(out_fd)
        _report(report_fd, "started")
        final = _supervise(pid, pending, lifeline_r)
    except Exception as err:  # noqa: BLE001 - reported to the daemon, which fails the start
        _report(report_fd, f"error {_reason(err)}")
    finally:
        _kill_all()
        if final:
            _report(report_fd, final)
        os._exit(0)


def _isolate(spec: dict) -> None:
    """The job's own view: private mounts, fresh /proc and /sys, a minimal /dev, secrets masked."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    for path in spec["mask"]:
        _mask(path)
    linux.umount("/proc", linux.MNT_DETACH)
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    for path in PROC_READONLY:
        if os.path.exists(path):
            _bind_readonly(path)
    linux.umount("/sys", linux.MNT_DETACH)
    linux.mount("sysfs", "/sys", "sysfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    _mount_dev()
    socket.sethostname(spec["hostname"])


def _mask(path: str) -> None:
    """Hide a daemon secret: an empty read-only tmpfs over a directory, /dev/null over a file."""
    if os.path.isdir(path):
        linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                    "size=0,mode=000")
    elif os.path.exists(path):
        linux.mount("/dev/null", path, None, linux.MS_BIND)


def _bind_readonly(path: str) -> None:
    linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
    linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)


def _mount_dev() -> None:
    linux.mount("tmpfs", "/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=755,size=1m")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"/dev/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)
    os.mkdir("/dev/pts")
    linux.mount("devpts", "/dev/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, "newinstance,ptmxmode=0666")
    os.symlink("pts/ptmx", "/dev/ptmx")
    os.mkdir("/dev/shm")
    linux.mount("tmpfs", "/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")


def _resolve(command: str) -> str:
    """The file to execute, or an error that names the command and says why."""
    if "/" in command:
        candidates = [command]
    else:
        candidates = [os.path.join(d, command) for d in JOB_PATH.split(":")]
    for path in candidates:
        if os.path.isdir(path):
            if "/" in command:
                raise OSError(errno.EISDIR, f"cannot execute {command!r}: it is a directory")
        elif os.path.exists(path):
            if not os.access(path, os.X_OK):
                raise OSError(errno.EACCES, f"cannot execute {command!r}: permission denied (not executable)")
            return path
    where = "" if "/" in command else f" in PATH {JOB_PATH}"
    raise OSError(errno.ENOENT, f"cannot execute {command!r}: no such file{where}")


def _spawn_command(path: str, spec: dict, out_fd: int) -> int:
    """Start the command with posix_spawn (a vfork: no copy of this process's memory).

    The init's own descriptors are close-on-exec, so the command gets exactly stdin
    (/dev/null), stdout and stderr (the output pipe). An exec failure is raised right here.
    """
    _drop_capabilities()
    os.chdir("/")
    try:
        return os.posix_spawn(
            path, [spec["command"], *spec["args"]], spec["env"],
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, out_fd, 1), (os.POSIX_SPAWN_DUP2, out_fd, 2)],
            setsigmask=(),
            # Python ignores SIGPIPE and SIGXFSZ, and exec would keep them ignored.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    except OSError as err:
        raise OSError(err.errno, f"cannot execute {spec['command']!r}: {err.strerror}") from None


def _drop_capabilities() -> None:
    """From the bounding set: the command, root as it is, execs without them."""
    for cap in linux.DROPPED_CAPS:
        try:
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: this kernel has no such capability
                raise


def _supervise(pid: int, pending: list[int], lifeline_r: int) -> str:
    """Forward signals and reap until the command exits; returns its report line."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        while pending:
            os.kill(pid, pending.pop(0))
        status = _reap_until(pid)
        if status is not None:
            if os.WIFSIGNALED(status):
                return f"signal {os.WTERMSIG(status)}"
            return f"exit {os.WEXITSTATUS(status)}"
        ready, _, _ = select.select([wake_r, lifeline_r], [], [])
        if lifeline_r in ready:
            return "signal 9"  # the spawner is gone: end the job rather than leave it unowned
        _drain(wake_r)


def _reap_until(pid: int) -> int | None:
    """Reap every dead child (orphans too); the command's wait status once it is dead."""
    while True:
        try:
            reaped, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if reaped == 0:
            return None
        if reaped == pid:
            return status


def _kill_all() -> None:
    """As PID 1, kill(-1) reaches every other process of the job's namespace."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


# ---- small helpers -------------------------------------------------------------------------

def _reason(err: BaseException) -> str:
    """An OSError's own message without the '[Errno N]' prefix."""
    return getattr(err, "strerror", None) or str(err)


def _report(fd: int, line: str) -> None:
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    except OSError:
        pass  # the daemon is gone; nobody is left to tell


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _close_all_but(*keep: int) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))

