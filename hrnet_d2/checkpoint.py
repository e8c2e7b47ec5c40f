"""Crash-safe checkpoints.

Detectron2 writes ``model_*.pth`` and ``last_checkpoint`` in place, so a kill during a
save leaves a truncated file, possibly named by ``last_checkpoint``, and ``--resume``
then fails on it.  ``AtomicCheckpointer`` writes each file to a temporary name in the
same folder, fsyncs it and renames it over the target (``os.replace`` is atomic on
POSIX): a reader sees the old file or the complete new one, never a partial one.
Loading a file that is not a readable checkpoint raises ``CheckpointError`` naming it.

Files are read without running code in them (``hrnet_d2.safe_load``): ``.pth`` / ``.pyth``
with ``torch.load(weights_only=True)``, Detectron2 / Caffe2 ``.pkl`` files with a restricted
unpickler; a file that references anything else raises ``UnsafeFileError`` naming the
file and the refused global.
"""
import logging
import os
import tempfile

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .safe_load import UnsafeFileError, load_pickle, torch_load

__all__ = ["AtomicCheckpointer", "CheckpointError", "atomic_write", "capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


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


def _is_local(path):
    return "://" not in path


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose saves are atomic, whose loads run no code from the file
    (``hrnet_d2.safe_load``) and whose load errors name the file."""

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):  # remote storage: PathManager's own semantics
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not _is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path, *args, **kwargs):
        if path and _is_local(path) and "?" not in path and not os.path.isfile(path):
            raise FileNotFoundError(self._describe(path, "does not exist"))
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._parsed_url_during_load = None  # DetectionCheckpointer leaves it set when loading fails

    def _load_file(self, filename):
        try:
            if filename.endswith(".pkl"):
                loaded = self._load_pkl(filename)
            elif filename.endswith(".pyth"):
                loaded = self._load_pycls(filename)
            else:  # Detectron2's .pth path (URL query handling), reading through _torch_load below
                loaded = super()._load_file(filename)
        except UnsafeFileError as e:
            raise UnsafeFileError(str(e) + self._resume_hint(filename), e.path, e.refused) from None
        except CheckpointError:
            raise
        except Exception as e:  # truncated zip, garbage bytes, wrong pickle, ...
            raise CheckpointError(
                self._describe(filename, f"is not a readable checkpoint (truncated or not a torch/pickle file): "
                                         f"{type(e).__name__}: {e}")
            ) from e
        if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict):
            raise CheckpointError(self._describe(filename, "does not hold a state dict"))
        return loaded

    def _torch_load(self, f):
        return torch_load(f)  # weights_only=True, whatever torch's default

    def _load_pkl(self, filename):
        """DetectionCheckpointer's .pkl reading, with the restricted unpickler instead of pickle.load."""
        with PathManager.open(filename, "rb") as f:
            data = load_pickle(f, filename)
        if not isinstance(data, dict):
            raise CheckpointError(self._describe(filename, f"holds a {type(data).__name__}, not a dict of weights"))
        if "model" in data and "__author__" in data:  # Detectron2 model zoo format
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        # Caffe2 / Detectron1 model zoo; detection models have "blobs", ImageNet models don't
        if "blobs" in data:
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _load_pycls(self, filename):
        """DetectionCheckpointer's .pyth (pycls) reading, with weights_only explicit."""
        with PathManager.open(filename, "rb") as f:
            data = torch_load(f, filename)
        if "model_state" not in data:
            raise CheckpointError(self._describe(filename, "is not a pycls checkpoint (no 'model_state')"))
        model_state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
        return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}

    def _describe(self, path, problem):
        return f"Checkpoint {path} {problem}." + self._resume_hint(path)

    def _resume_hint(self, path):
        """Where ``path`` came from when it is the checkpoint ``last_checkpoint`` names, else ""."""
        last = os.path.join(self.save_dir, "last_checkpoint") if self.save_dir else None
        if last and os.path.isfile(last) and os.path.abspath(self.get_checkpoint_file()) == os.path.abspath(path):
            others = sorted(set(map(os.path.basename, self.get_all_checkpoint_files())) - {os.path.basename(path)})
            hint = (
                f" It is named by {last}; to resume from an earlier checkpoint write one of {others} into that file"
                if others
                else f" It is named by {last}; delete that file to start from MODEL.WEIGHTS instead"
            )
            return hint + "."
        return ""


def capture_rng_state():
    """Python, NumPy and torch (CPU + CUDA) RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    import random

    import numpy as np

    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
