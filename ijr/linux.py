"""The few Linux system calls Python 3.11 lacks, through ctypes on libc.

Kept tiny on purpose: the spawner imports it before anything else, and every fork copies
what the spawner has loaded.
"""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
JOB_NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

# <sys/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# <linux/capability.h>: what a root job loses, so it can't undo its isolation (remount /proc,
# mount cgroupfs and leave its cgroups, read its init's memory, load modules, make device
# nodes, change the clock, take a real-time policy that cpu.weight can't bound, or open a
# masked secret by its inode number with open_by_handle_at).
CAP_DAC_READ_SEARCH = 2
CAP_LINUX_IMMUTABLE = 9
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_PTRACE = 19
CAP_SYS_PACCT = 20
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
CAP_SYS_NICE = 23
CAP_SYS_TIME = 25
CAP_MKNOD = 27
CAP_AUDIT_CONTROL = 30
CAP_MAC_OVERRIDE = 32
CAP_MAC_ADMIN = 33
CAP_SYSLOG = 34
CAP_WAKE_ALARM = 35
CAP_BLOCK_SUSPEND = 36
CAP_PERFMON = 38
CAP_BPF = 39
DROPPED_CAPS = (CAP_DAC_READ_SEARCH, CAP_LINUX_IMMUTABLE, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PTRACE, CAP_SYS_PACCT, CAP_SYS_ADMIN,
                CAP_SYS_BOOT, CAP_SYS_NICE, CAP_SYS_TIME, CAP_MKNOD, CAP_AUDIT_CONTROL, CAP_MAC_OVERRIDE,
                CAP_MAC_ADMIN, CAP_SYSLOG, CAP_WAKE_ALARM, CAP_BLOCK_SUSPEND, CAP_PERFMON, CAP_BPF)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), target.encode(), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {fstype or source} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def set_name(name: str) -> None:
    """The name ps and top show (15 bytes at most)."""
    _check(_libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0), "prctl PR_SET_NAME")

PR_SET_DUMPABLE = 4


def scrub_cmdline(name: str) -> None:
    """Overwrite this process's argv and environ as /proc shows them.

    Jobs can read /proc/1/cmdline and /proc/1/environ of their init, which was forked from the
    daemon: without this they would see the daemon's command line (perhaps a --secret) and
    environment.
    """
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 48..51 of proc(5), counted from field 3 (the state) after the ')'.
    arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(env_start)
        mem.write(bytes(env_end - env_start))
        title = name.encode()[: arg_end - arg_start - 1]
        mem.seek(arg_start)
        mem.write(title + bytes(arg_end - arg_start - len(title)))
