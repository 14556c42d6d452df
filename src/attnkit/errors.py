"""The one exception type for bad input.

Everything a user can get wrong (a missing file, a mistyped config key, a corrupt checkpoint)
raises :class:`UserError` with a one-line message; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input from the user: shown as one line, exit code 2, never a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after finishing its step and saving a checkpoint."""

    def __init__(self, run_dir: str, step: int, signum: int):
        import signal

        self.run_dir, self.step, self.signum = run_dir, step, signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint saved in {run_dir}")


# OS errors that come from the paths, permissions or disk the user gave, not from a bug: the CLI
# shows them as one line too (see attnkit.cli.expected_failure).
USER_ERRNOS = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EACCES,
    errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG,
    errno.ELOOP, errno.EXDEV, errno.ETXTBSY, errno.EBUSY})


def os_error_message(err: OSError) -> str | None:
    """One line for an OS failure the user caused ("not a directory: runs/x"), else None.

    A rename names its destination (the path the user gave), not the temporary file.
    """
    if err.errno not in USER_ERRNOS:
        return None
    reason = (err.strerror or errno.errorcode.get(err.errno, "error")).lower()
    where = err.filename2 if err.filename2 is not None else err.filename
    return reason if where is None else f"{reason}: {where}"
