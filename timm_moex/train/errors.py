"""The errors a user can cause and fix, each with its own exit code.

``train_moex.py`` prints one of these as one line, ``train_moex.py: <message>``, and exits with its
``exit_code``; anything else is a bug and keeps its traceback.
"""
from typing import Any, Optional

__all__ = ['UserError', 'ConfigError', 'RunError', 'RunFolderBusy', 'ResumeMismatch', 'CheckpointError', 'DataError',
           'UnreadableImage', 'Diverged', 'Interrupted', 'Terminated', 'TerminationRequest', 'first_line', 'describe']


def first_line(e: BaseException) -> str:
    """What a foreign error says, fit for a one-line message: its first line, 200 characters at most.

    Args:
        e: The error (torch's, PIL's, PyYAML's, ... messages run to paragraphs).

    Returns:
        The first line of its message, or its type's name when it has none.
    """
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def describe(e: BaseException) -> str:
    """``Type: first line`` of an error, or its type's name alone when it has no message (an empty file's EOFError).

    Args:
        e: The error.

    Returns:
        The description, one line.
    """
    return f'{type(e).__name__}: {first_line(e)}' if str(e).strip() else type(e).__name__


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


class UnreadableImage(DataError):
    """An image file that cannot be decoded (truncated, or not an image at all).

    A DataLoader worker's error reaches the main process rebuilt from one string, the worker's formatted traceback
    (``torch.utils.data``'s ``ExceptionWrapper``), whose last line is this error's message: the one-argument form
    reads the file and the reason back from it, so that the error stays an :class:`UnreadableImage` in the main
    process, whatever the number of workers.

    Args:
        path: The file; or, alone, a DataLoader's message about this error raised in a worker.
        reason: Why the decoder refused it.
    """

    WHAT = 'an image file cannot be decoded'
    TODO = 'replace or remove the file (a truncated copy, or not an image)'

    def __init__(self, path: Any, reason: Optional[str] = None):
        if reason is None:  # rebuilt from a worker's traceback: its last line is "<module>.UnreadableImage: <message>"
            message = str(path).rstrip().splitlines()[-1] if str(path).strip() else ''
            head, tail = f'{self.WHAT} (', f'): {self.TODO}'
            start = message.find(head)
            if start >= 0 and message.endswith(tail):
                value = message[start + len(head):-len(tail)]
                path, _, reason = value.partition(': ')
            else:
                path, reason = message, 'unreadable'
        self.path, self.reason = str(path), reason
        super().__init__(self.WHAT, f'{path}: {reason}', self.TODO)

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class Diverged(RunError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 8


class Interrupted(RunError):
    """Ctrl-C (SIGINT) during a run; the last checkpoint is kept and ``--resume auto`` continues."""

    exit_code = 130  # 128 + SIGINT, the shell's convention


class Terminated(Interrupted):
    """SIGTERM (``kill``, a job scheduler's stop) during a run; the last checkpoint is kept, as on Ctrl-C."""

    exit_code = 143  # 128 + SIGTERM


class TerminationRequest(KeyboardInterrupt):
    """What train_moex.py's SIGTERM handler raises in the main thread: a KeyboardInterrupt, so that the run stops as
    it does on Ctrl-C (loaders shut down, files being written removed), then reports :class:`Terminated`."""
