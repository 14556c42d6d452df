"""One training per run directory: an exclusive ``flock`` on ``RUN/.lock`` for the run's life.

Two processes training into one run directory would append every metrics record twice and lose
an energy record, so the second is refused with the PID of the first. The lock is an advisory
``fcntl.flock`` on an open file: the operating system releases it when the process ends, however
it ends (SIGKILL included), so a killed run never leaves a stale lock behind. The lock file is
empty and never changes once created (removing it would race with a process about to lock
it); the holder's PID comes from the kernel (/proc/locks on Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from attnkit.errors import UserError

LOCK = ".lock"
_held: dict[Path, int] = {}  # run directory (resolved) -> open file descriptor


def _holder(fd: int) -> str:
    """The PID holding a ``flock`` on ``fd``'s file, read from Linux's /proc/locks ('' when
    the system does not say)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ""
    holders = {}  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2147203 0 EOF" -> {device:inode: PID}
    for fields in map(str.split, lines):
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(f":{st.st_ino}"):
            holders[fields[5]] = fields[4]
    return holders.get(dev) or (next(iter(holders.values())) if len(holders) == 1 else "")


def lock_run(run_dir: str | Path) -> None:
    """Hold an exclusive lock on ``run_dir`` until :func:`release` or the end of the process.

    Locking a directory this process already holds does nothing. Raises :class:`UserError`
    naming the PID of the process that holds it.
    """
    key = Path(run_dir).resolve()
    if key in _held:
        return
    try:
        fd = os.open(key / LOCK, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UserError(f"cannot create the lock file {key / LOCK}: "
                        f"{err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        who = f"PID {pid}" if pid else "another process"
        raise UserError(f"{run_dir} is in use by another training ({who}); wait for it to "
                        "end or choose another run_dir") from None
    except OSError as err:
        os.close(fd)
        raise UserError(f"cannot lock {key / LOCK}: {err.strerror or err}") from None
    _held[key] = fd


def release(run_dir: str | Path) -> None:
    """Give up this process's lock on ``run_dir`` (nothing when it holds none)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def release_all() -> None:
    """Give up every run lock this process holds (the command that took them has ended)."""
    for run_dir in list(_held):
        release(run_dir)
