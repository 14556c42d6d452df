"""The one exception type for bad input.

Everything a user can get wrong (a missing file, a mistyped config key, a corrupt checkpoint)
raises :class:`UserError` with a one-line message; the CLI prints it and exits with code 2.
"""

from __future__ import annotations


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
