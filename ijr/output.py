"""A job's output: one append-only file on disk, read by any number of followers.

The daemon drains the job's pipe into the file whatever the readers do, so a slow or vanished
reader never blocks the job, and memory stays bounded whatever the output size. Followers
read from byte 0 and wait on an event that the writer fires after each append.
"""
import asyncio
import fcntl
import os
from collections.abc import AsyncIterator

CHUNK = 64 * 1024  # what one StreamJobOutput message carries
PIPE_SIZE = 1 << 20  # a bigger pipe: fewer wake-ups for chatty jobs
F_SETPIPE_SZ = 1031


class Output:
    def __init__(self, path: str, size: int = 0, closed: bool = False):
        self.path = path
        self.size = size
        self.closed = closed
        self.error = ""  # why bytes were lost (a full disk); the job still runs to its end
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def drain(self, pipe_fd: int) -> asyncio.Future:
        """Copy the pipe into the file until EOF; the future resolves at EOF."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        try:
            fcntl.fcntl(pipe_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size still works
        os.set_blocking(pipe_fd, False)
        file_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

        def readable() -> None:
            try:
                data = os.read(pipe_fd, PIPE_SIZE)
            except BlockingIOError:
                return
            if data:
                self._append(file_fd, data)
            else:
                loop.remove_reader(pipe_fd)
                os.close(pipe_fd)
                os.close(file_fd)
                self.closed = True
                done.set_result(None)
            self._notify()

        loop.add_reader(pipe_fd, readable)
        return done

    def _append(self, file_fd: int, data: bytes) -> None:
        """Write all of data, or, once the disk refuses, drop the rest so the job never blocks.

        `size` counts only what is on disk, so followers never read past it.
        """
        if self.error:
            return
        view = memoryview(data)
        try:
            while view:
                written = os.write(file_fd, view)
                self.size += written
                view = view[written:]
        except OSError as err:
            self.error = f"output cut at {self.size} bytes: {err.strerror}"

    async def follow(self) -> AsyncIterator[bytes]:
        """Every byte from the first, then live ones, until the job's output is closed."""
        offset = 0
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                if offset < self.size:
                    data = os.pread(fd, min(CHUNK, self.size - offset), offset)
                    offset += len(data)
                    yield data
                elif self.closed:
                    return
                else:
                    await self._changed.wait()
        finally:
            os.close(fd)
