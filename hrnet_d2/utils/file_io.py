"""Files written whole or not at all, and local vs remote paths."""

import os
import tempfile

from .errors import UserError

__all__ = ["OutputDirError", "atomic_write", "check_output_dir", "is_local_path"]


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


def atomic_write(path, write_fn, mode="wb"):
    """Call ``write_fn(f)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name does not end in ``.pth``, so Detectron2's checkpoint listing
    (``get_all_checkpoint_files``) and ``max_to_keep`` clean-up never see it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; keep open()'s usual permissions
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


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
