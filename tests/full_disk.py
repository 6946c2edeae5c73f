"""Files that fill a disk (ENOSPC), for patching over ShardWriter._open_tmp."""

from __future__ import annotations

import errno
import io


class FillingFile(io.FileIO):
    """A real file that raises OSError(ENOSPC) once `room` bytes have been written (a disk filling up)."""

    def __init__(self, path, room: int) -> None:
        super().__init__(path, "wb")
        self.room = room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return super().write(data)


class FullAtClose(io.FileIO):
    """A real file that takes every member but raises ENOSPC on the tar's end-of-archive zero blocks (at close)."""

    def __init__(self, path) -> None:
        super().__init__(path, "wb")

    def write(self, data) -> int:
        if len(data) >= 1024 and not any(data[-1024:]):  # a (buffered) write ending in the two zero blocks
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def full_at_close(self):
    """A ShardWriter._open_tmp whose file fails at close."""
    return FullAtClose(self.tmp_path)


def filling(room: int):
    """A ShardWriter._open_tmp whose file holds `room` bytes."""
    def _open_tmp(self):
        return FillingFile(self.tmp_path, room)
    return _open_tmp
