"""Parsing of the limits a user asks for, shared by ijrctl (early, clear errors) and ijrd.

No heavy imports here: the CLI validates before it opens any connection.
"""
import os
import re
import stat

_MEMORY = re.compile(r"^\s*([0-9]+)\s*([bkmg]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_MAJ_MIN = re.compile(r"^([0-9]+):([0-9]+)$")
_NUMBER = re.compile(r"^[0-9]+$")

CPU_SHARES_MIN, CPU_SHARES_MAX = 2, 262144  # cgroup v1 cpu.shares range
MEMORY_MIN = 1 << 20  # below a MiB no real command can even be executed
IOPS_MAX = 1 << 32


class LimitError(ValueError):
    """A limit the user asked for that can't be applied; the message says which and why."""


def parse_memory(text: str) -> int:
    """'100', '1024k', '2m', '1g' (any case) -> bytes."""
    match = _MEMORY.match(text)
    if not match:
        raise LimitError(f"bad memory limit {text!r}: use a number with an optional unit b, k, m or g (e.g. 512m)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def check_memory(limit: int) -> None:
    """0 means 'no limit'; anything else must be big enough to start a process."""
    if limit and limit < MEMORY_MIN:
        raise LimitError(f"memory limit {limit} bytes is too small: the least is {MEMORY_MIN} (1m)")
    if limit > 1 << 62:
        raise LimitError(f"memory limit {limit} bytes is absurd")


def check_cpu_shares(shares: int) -> None:
    """The cgroup v1 range; on v2 the value is mapped to cpu.weight (ijr.cgroup)."""
    if not CPU_SHARES_MIN <= shares <= CPU_SHARES_MAX:
        raise LimitError(f"cpu shares {shares} out of range {CPU_SHARES_MIN}..{CPU_SHARES_MAX}")


def split_iops(text: str) -> tuple[str, int]:
    """'<device>:<n>' -> (device, n); device is a path or MAJ:MIN. Syntax only."""
    device, sep, number = text.rpartition(":")
    if not sep or not device.strip() or "\0" in device or not _NUMBER.match(number.strip()):
        raise LimitError(f"bad IOPS limit {text!r}: use <device>:<n>, e.g. /dev/sda:100 or 8:0:100")
    iops = int(number)
    if not 0 < iops < IOPS_MAX:
        raise LimitError(f"bad IOPS limit {text!r}: the number must be between 1 and {IOPS_MAX - 1}")
    return device, iops


def resolve_device(device: str) -> tuple[int, int]:
    """A block device path or MAJ:MIN -> the (major, minor) of its whole disk.

    Partitions are resolved to their disk because the kernel's throttles only accept disks.
    """
    match = _MAJ_MIN.match(device)
    if match:
        major, minor = int(match.group(1)), int(match.group(2))
        if not os.path.exists(f"/sys/dev/block/{major}:{minor}"):
            raise LimitError(f"unknown block device {device}")
    else:
        try:
            st = os.stat(device)
        except OSError as err:
            raise LimitError(f"device {device}: {err.strerror}") from None
        if not stat.S_ISBLK(st.st_mode):
            raise LimitError(f"{device} is not a block device")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return _whole_disk(major, minor)


def _whole_disk(major: int, minor: int) -> tuple[int, int]:
    sysdir = os.path.realpath(f"/sys/dev/block/{major}:{minor}")
    if os.path.exists(os.path.join(sysdir, "partition")):
        with open(os.path.join(os.path.dirname(sysdir), "dev")) as f:
            major, minor = (int(x) for x in f.read().split(":"))
    return major, minor


def parse_iops(text: str) -> tuple[int, int, int]:
    """'<device>:<n>' -> (major, minor, n), resolved on this host."""
    device, iops = split_iops(text)
    major, minor = resolve_device(device)
    return major, minor, iops
