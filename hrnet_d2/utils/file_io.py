"""Files written whole or not at all, and local vs remote paths."""

import os
import tempfile

__all__ = ["atomic_write", "is_local_path"]


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
