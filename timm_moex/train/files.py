"""Files written whole or not at all: a temporary name in the same folder, then a rename.

Every file the applications write goes through :func:`atomic_path`: a reader (or a crash) never sees
half a file, and a file that was there stays whole when writing fails.
"""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ['atomic_path', 'atomic_write_text', 'atomic_write_bytes']


@contextlib.contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without error.

    For writers that take a file name (safetensors, PIL, timm's config writer)::

        with atomic_path(folder / 'model.safetensors') as tmp:
            save_file(tensors, str(tmp))

    The folder is created if missing. The file is synced to disk before the rename and gets the
    permissions a plain ``open`` would (0o666 less the umask). On an error the temporary file is
    removed and ``path`` is left as it was.

    Args:
        path: The file to write.

    Yields:
        The temporary path (an empty file, in ``path``'s folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the writer may have replaced the file: sync what is there now
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`).

    Args:
        path: The file to write.
        text: Its content.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`).

    Args:
        path: The file to write.
        data: Its content.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
