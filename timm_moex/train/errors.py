"""The errors a user can cause and fix, each with its own exit code.

``train_moex.py`` prints one of these as one line, ``train_moex.py: <message>``, and exits with its
``exit_code``; anything else is a bug and keeps its traceback.
"""
from typing import Any, Optional

__all__ = ['UserError', 'ConfigError', 'RunError', 'RunFolderBusy', 'ResumeMismatch', 'CheckpointError', 'DataError',
           'Diverged', 'Interrupted']


class UserError(Exception):
    """An error the user can cause and fix: train_moex.py prints it as one line and exits with ``exit_code``.

    Subclasses carry distinct exit codes so that a script driving runs can tell them apart.
    """

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the key and what is accepted."""

    exit_code = 2


class RunError(UserError):
    """A run that cannot go on: ``<what> (<the bad value>): <what to do>``.

    Args:
        what: what is wrong, e.g. ``'checkpoint is truncated or not a safetensors file'``.
        value: the offending value (a path, a number, a key); shown in parentheses.
        todo: what the user can do about it.
        exit_code: overrides the class's exit code.
    """

    exit_code = 3

    def __init__(self, what: str, value: Any, todo: str, exit_code: Optional[int] = None):
        self.what, self.value, self.todo = what, value, todo
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(f'{what} ({value}): {todo}')


class RunFolderBusy(RunError):
    """Another live process holds the run folder's lock."""

    exit_code = 4


class ResumeMismatch(RunError):
    """``--resume`` with settings that contradict the run folder's config.yaml."""

    exit_code = 5


class CheckpointError(RunError):
    """A checkpoint or weights file that is empty, truncated, foreign or of another model."""

    exit_code = 6


class DataError(RunError):
    """A dataset that cannot be trained on as configured (classes, sizes, empty folders)."""

    exit_code = 7


class Diverged(RunError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 8


class Interrupted(RunError):
    """Ctrl-C (SIGINT) during a run; the last checkpoint is kept and ``--resume auto`` continues."""

    exit_code = 130  # 128 + SIGINT, the shell's convention
