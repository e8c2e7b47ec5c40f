"""Files written whole or not at all, and local vs remote paths."""

import os
import secrets
import tempfile
from contextlib import contextmanager

from .errors import UserError

__all__ = ["OutputDirError", "atomic_path", "atomic_write", "check_output_dir", "is_local_path"]


class OutputDirError(UserError, OSError):
    """An output folder that cannot be created or written."""


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, tmp_name=None):
    """A temporary path next to ``path`` for any writer (``open``, a downloader, ``torch.save``...):
    when the block ends normally the file there is fsynced and renamed to ``path`` (``os.replace``
    is atomic on POSIX: readers see the old file or the complete new one); when it raises, the
    temporary file is removed.  The file is created by the writer, with its usual permissions.

    The temporary name (``.<name>.<random>.tmp``, or ``tmp_name`` in the same folder, removed
    first if a killed run left it) does not end in ``.pth``, so Detectron2's checkpoint listing
    (``get_all_checkpoint_files``) and ``max_to_keep`` clean-up never see it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, tmp_name or f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    _unlink(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write(path, write_fn, mode="wb"):
    """Call ``write_fn(f)`` on a new file opened with ``mode`` ("wb" or "w") at a temporary path next
    to ``path``, then rename it to ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("w", "x")) as f:
            write_fn(f)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def is_local_path(path):
    """True for a (non-empty) local file system path, False for "" and URLs (``detectron2://``, ``https://``...)."""
    return bool(path) and "://" not in str(path)


def check_output_dir(path, key="OUTPUT_DIR"):
    """Create ``path`` (a local folder) and check that a file can be written in it; else raise
    ``OutputDirError`` naming ``key`` and the path.  Remote paths (``s3://``...) are left to PathManager."""
    if not is_local_path(path):
        return
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and os.path.abspath(str(e.filename)) != os.path.abspath(path) else ""
        raise OutputDirError(
            f"{key} = {path!r} cannot be created or written: {reason}{where}. Choose another folder (e.g. {key} "
            "./output/run1)"
        ) from e
