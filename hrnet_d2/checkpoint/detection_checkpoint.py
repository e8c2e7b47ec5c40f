"""Crash-safe checkpoints.

Detectron2 writes ``model_*.pth`` and ``last_checkpoint`` in place, so a kill during a
save leaves a truncated file, possibly named by ``last_checkpoint``, and ``--resume``
then fails on it.  ``AtomicCheckpointer`` writes each file to a temporary name in the
same folder, fsyncs it and renames it over the target (``os.replace`` is atomic on
POSIX): a reader sees the old file or the complete new one, never a partial one.
Loading a file that is not a readable checkpoint raises ``CheckpointError`` naming it.

Files are read without running code in them (``hrnet_d2.utils.safe_load``): ``.pth`` / ``.pyth``
with ``torch.load(weights_only=True)``, Detectron2 / Caffe2 ``.pkl`` files with a restricted
unpickler; a file that references anything else raises ``UnsafeFileError`` naming the
file and the refused global.

Given the config (``cfg=``), it also checks what MODEL.WEIGHTS gives the HRNet backbone,
where Detectron2 only logs skipped keys and trains on from random weights:
  * official / timm ImageNet and mmdetection HRNet checkpoints are recognised by their
    key layout and converted on the fly (``hrnet_d2.checkpoint.convert``), as Detectron2 does for
    Caffe2 ``.pkl`` files; a log line says so;
  * a checkpoint whose backbone does not fit the config (another width or architecture,
    another pyramid layout) stops with what was found and what was expected;
  * one that leaves HRNet body tensors at their random init stops too, unless
    ``MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS`` says it is intended.  Missing heads and (for
    ImageNet weights) a missing pyramid are normal and pass.
"""

import logging
import os

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..modeling.build import BACKBONES, backbone_name
from ..utils.errors import UserError
from ..utils.file_io import atomic_write, is_local_path
from ..utils.safe_load import UnsafeFileError, load_pickle, torch_load
from .class_transfer import checkpoint_class_names, is_class_specific, model_class_names, transfer_rows
from .convert import convert_state_dict
from .layouts import (
    ConversionError,
    checkpoint_layout,
    describe_specs,
    detect_stage_specs,
    strip_module_prefix,
    unwrap_state_dict,
)

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "CheckpointNotFound",
    "CheckpointWriteError",
]

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, or not fitting the model; the message names it."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A local checkpoint path that does not exist."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (disk full, quota, file-size limit); the message names
    the file and the OS error.  The previous checkpoint stays the one ``--resume`` reads."""


def _os_error(error):
    """The OSError behind a failed save: itself, or what torch's zip writer met while writing."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


# BatchNorm statistics a checkpoint may hold for a model whose norm has none (GN, FrozenBN): harmless
_NORM_STATISTICS = ("num_batches_tracked", "running_mean", "running_var")
_MAX_LISTED = 3


# the switch of class-name transfer (YAML, LazyConfig)
TRANSFER_KEYS = ("MODEL.CLASS_NAME_TRANSFER", "train.class_name_transfer")


def _layers(keys):
    """Tensor names -> their layers (``roi_heads.box_head.2``, ``roi_heads.mask_head``, ...) with counts."""
    groups = {}
    for k in keys:
        parts = k.split(".")
        n = 2
        while n < len(parts) - 1 and (parts[n].isdigit() or parts[n] == "heads"):
            n += 1
        layer = ".".join(parts[: max(1, min(n, len(parts) - 1))])
        groups[layer] = groups.get(layer, 0) + 1
    return ", ".join(f"{g} ({c} tensor{'s' * (c > 1)})" for g, c in groups.items())


def _num_classes(model):
    heads = getattr(model, "roi_heads", None)
    return getattr(heads, "num_classes", "the config's")


def _listed(items):
    items = list(items)
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(map(str, items[:_MAX_LISTED])) + more


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose saves are atomic, whose loads run no code from the file
    (``hrnet_d2.utils.safe_load``) and whose load errors name the file.

    Args:
        model, save_dir, checkpointables: as DetectionCheckpointer.
        cfg: the model's config (YAML CfgNode, or LazyConfig); with an HRNet backbone,
            foreign HRNet checkpoints are converted on load and checkpoints that do not fit
            or fill the backbone stop (see the module docstring).  None: Detectron2's behaviour.
        complete: for inference (evaluation, demo, export): every tensor of the model must
            come from the checkpoint, heads included; a missing or other-shaped one stops.
        The switch that accepts a partial checkpoint (with a warning) is
        ``MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS True`` (``train.allow_partial_weights=True`` in a LazyConfig).
    """

    def __init__(self, model, save_dir="", *, cfg=None, complete=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self._cfg = cfg
        self._lazy = cfg is not None and not hasattr(cfg, "MODEL")
        self._weights_key = "train.init_checkpoint" if self._lazy else "MODEL.WEIGHTS"
        self._allow_key = "train.allow_partial_weights=True" if self._lazy else "MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS True"
        self._complete = complete
        self._loading = None

    def _allow_partial(self):
        if self._cfg is None:
            return False
        if self._lazy:
            from omegaconf import OmegaConf

            return bool(OmegaConf.select(self._cfg, "train.allow_partial_weights", default=False))
        return self._cfg.MODEL.HRNET.ALLOW_PARTIAL_WEIGHTS

    def _check_complete(self, incompatible):
        """Stop (for inference) when tensors of the model are not in the checkpoint."""
        missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
        wrong = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
        wrong_keys = {k for k, _, _ in wrong}
        missing = [k for k in missing if k not in wrong_keys]
        if not missing and not wrong:
            return
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors of the model are not in it, e.g. {_listed(missing)}")
        if wrong:
            problems.append(
                f"{len(wrong)} have other shapes, e.g. " + _listed(f"{k}: found {a}, expected {b}" for k, a, b in wrong)
            )
        message = (
            f"{self._weights_key} {self._loading} does not hold the whole model, which inference needs (those "
            f"tensors would be random): " + "; ".join(problems)
        )
        self._stop_unless_allowed(
            message, "Use the checkpoint of a model trained with this config (e.g. OUTPUT_DIR/model_final.pth)"
        )

    def _stop_unless_allowed(self, message, advice):
        """Raise CheckpointError(message + advice), or only warn where the config allows partial weights."""
        if self._allow_partial():
            self.logger.warning("%s. Loading it anyway (%s).", message, self._allow_key)
            return
        raise CheckpointError(f"{message}. {advice}, or set {self._allow_key} if this is intended.")

    def _hrnet_target(self):
        """(backbone name, stage specs, stem width, where the specs come from) or None."""
        cfg = self._cfg
        if cfg is None:
            return None
        if self._lazy:
            return self._hrnet_target_from_model()
        if cfg.MODEL.BACKBONE.NAME not in BACKBONES:
            return None
        from ..config.validate import stage_specs_from_cfg

        h = cfg.MODEL.HRNET
        where = f"MODEL.HRNET.ARCH = {h.ARCH!r}" if h.ARCH else "MODEL.HRNET.STAGE1..4"
        return cfg.MODEL.BACKBONE.NAME, stage_specs_from_cfg(cfg), h.STEM_CHANNELS, where

    def _hrnet_target_from_model(self):
        """As _hrnet_target, read from the model (LazyConfig models have no MODEL.* keys)."""
        name = backbone_name(getattr(self.model, "backbone", None))
        if name is None:
            return None
        prefix = BACKBONES[name].body_prefix
        body = {k[len(prefix) :]: v for k, v in self.model.state_dict().items() if k.startswith(prefix)}
        specs, stem = detect_stage_specs(body)
        return name, specs, stem, "the model of the config"

    def _convert_foreign(self, checkpoint, target):
        """Official / timm / mmdetection layouts -> our names, in place (Detectron2 does the
        same for Caffe2 checkpoints in DetectionCheckpointer._load_model)."""
        sd = checkpoint["model"]
        if isinstance(sd.get("state_dict"), dict):  # a whole mmdetection / mmcv file
            sd = sd["state_dict"]
        if checkpoint_layout({strip_module_prefix(k): None for k in sd}) is None:
            return
        name, specs, stem, where = target
        source = f"{self._weights_key} {self._loading}"
        try:
            conv = convert_state_dict(
                unwrap_state_dict(sd, source),
                backbone=name,
                expected_specs=specs,
                expected_stem_channels=stem,
                expected_from=where,
                source=source,
            )
        except ConversionError as e:
            raise CheckpointError(f"{e}. The checkpoint does not fit the config.") from e
        checkpoint["model"] = dict(conv.state_dict)
        checkpoint["matching_heuristics"] = False
        self.logger.info(
            "%s is an %s: converted on the fly (as python -m hrnet_d2.convert does): HRNet %s, %d tensors mapped, "
            "%d dropped (classification / detector heads, BatchNorm counters), %d left out",
            source,
            conv.source_format,
            describe_specs(conv.specs),
            len(conv.mapped),
            len(conv.dropped),
            len(conv.unexpected),
        )

    def _check_fit(self, incompatible, given, target):
        """Stop when the loaded checkpoint does not fit or fill the HRNet backbone."""
        name, specs, _, where = target
        body = BACKBONES[name].body_prefix
        source = f"{self._weights_key} {self._loading}"
        ours = "backbone."
        wrong = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes if k.startswith(ours)]
        extra = [k for k in incompatible.unexpected_keys if k.startswith(ours) and not k.endswith(_NORM_STATISTICS)]
        missing = [k for k in incompatible.missing_keys if k.startswith(ours) and not k.endswith("num_batches_tracked")]
        wrong_keys = {k for k, _, _ in wrong}
        model_keys = [k for k in self.model.state_dict() if k.startswith(ours)]
        loaded_pyramid = [k for k in model_keys if not k.startswith(body) and k in given and k not in wrong_keys]
        missing_body = [k for k in missing if k.startswith(body)]  # wrong shapes included: not loaded
        # the pyramid may be absent (ImageNet weights), but not half there
        missing_pyramid = (
            [k for k in missing if not k.startswith(body) and k not in wrong_keys] if loaded_pyramid else []
        )
        problems = []
        if wrong or extra or missing_pyramid:
            found = None
            try:
                found = detect_stage_specs({k[len(body) :]: v for k, v in given.items() if k.startswith(body)})[0]
            except ConversionError:
                pass
            if found is not None and tuple(found) != tuple(specs):
                # the architecture says it all; the tensor lists would only repeat it
                wrong, extra, missing_pyramid, missing_body = [], [], [], []
                problems.append(
                    f"found HRNet {describe_specs(found)} in the checkpoint, expected {describe_specs(specs)} from {where}"
                )
            if wrong:
                problems.append(
                    f"{len(wrong)} backbone tensors have other shapes, e.g. "
                    + _listed(f"{k}: found {a}, expected {b}" for k, a, b in wrong)
                )
            if extra:
                problems.append(f"{len(extra)} backbone tensors are not in the model ({name}), e.g. {_listed(extra)}")
            if missing_pyramid:
                problems.append(
                    f"{len(missing_pyramid)} pyramid tensors of the model are not in it, e.g. {_listed(missing_pyramid)}"
                )
        if missing_body:
            n = len([k for k in model_keys if k.startswith(body) and not k.endswith("num_batches_tracked")])
            problems.append(
                f"it fills {n - len(missing_body)} of the {n} HRNet body tensors ({body}*): {len(missing_body)} "
                f"would keep their random init, e.g. {_listed(missing_body)}"
            )
        if not problems:
            return
        message = (
            f"{source} does not fit the backbone of "
            + (f"{where}: " if self._lazy else f"the config (MODEL.BACKBONE.NAME = {name!r}, {where}): ")
            + "; ".join(problems)
        )
        self._stop_unless_allowed(
            message, "Use a checkpoint of this architecture (or convert one: python -m hrnet_d2.convert)"
        )

    def _load_model(self, checkpoint):
        target = self._hrnet_target()
        if target is not None:
            self._convert_foreign(checkpoint, target)
        fine_tuning = self._cfg is not None and not self._complete
        transferred = self._transfer_class_rows(checkpoint) if fine_tuning else None
        # fvcore pops "model" and deletes the tensors of other shapes from it: keep a view
        given = {strip_module_prefix(k): v for k, v in checkpoint["model"].items()}
        incompatible = super()._load_model(checkpoint)
        if target is not None:
            self._check_fit(incompatible, given, target)
        if self._complete:
            self._check_complete(incompatible)
        elif fine_tuning:
            self._check_detector(incompatible, given, transferred)
        return incompatible

    def _option(self, yaml_key, lazy_key, default):
        if self._lazy:
            from omegaconf import OmegaConf

            return OmegaConf.select(self._cfg, lazy_key, default=default)
        node = self._cfg
        for part in yaml_key.split("."):
            node = getattr(node, part, None) if node is not None else None
        return default if node is None else node

    def _transfer_class_rows(self, checkpoint):
        """Class-name transfer (``class_transfer``): the class-specific tensors of the checkpoint
        are replaced, in place, by the model's fresh ones with the rows of the classes of the same
        name copied.  Returns (layers, matched names, fresh names), or None when nothing was done."""
        if not self._option(*TRANSFER_KEYS, True):
            return None
        old_names = checkpoint_class_names(checkpoint, self._loading)
        new_names = model_class_names(self._cfg)
        if not old_names or not new_names or list(old_names) == list(new_names):
            return None
        sd = checkpoint["model"]
        ours = self.model.state_dict()
        layers = []
        for key in list(sd):
            name = strip_module_prefix(key)
            if not is_class_specific(name) or name.startswith("sem_seg_head.") or name not in ours:
                continue
            rows = transfer_rows(name, torch.as_tensor(sd[key]), ours[name].detach().cpu(), old_names, new_names)
            if rows is not None:
                sd[key] = rows
                layers.append(name)
        if not layers:
            return None
        matched = [n for n in new_names if n in set(old_names)]
        fresh = [n for n in new_names if n not in set(old_names)]
        key = TRANSFER_KEYS[1 if self._lazy else 0]
        self.logger.info(
            "Class-name transfer (%s): %d of the %d classes start from the checkpoint's rows of the class of the same "
            "name: %s; fresh: %s (in %s)",
            f"{key}=False" if self._lazy else f"{key} False",
            len(matched),
            len(new_names),
            ", ".join(matched) or "none",
            ", ".join(fresh) or "none",
            ", ".join(sorted({k.rsplit(".", 1)[0] for k in layers})),
        )
        return layers, matched, fresh

    def _check_detector(self, incompatible, given, transferred):
        """Fine-tuning: class-specific layers of another class count are re-initialised (logged);
        any other layer of the detector that a detector checkpoint leaves at its random init stops."""

        def counted(k):
            return not k.startswith("backbone.") and not k.endswith("num_batches_tracked")

        reinit = [k for k, _, _ in incompatible.incorrect_shapes if is_class_specific(k)]
        reinit += transferred[0] if transferred else []  # re-sized, some rows then copied by name
        if reinit:
            self.logger.info(
                "Fine-tuning to %s classes: the class-specific layers (classifier, box regression, mask predictor) "
                "are re-initialised for the new class count%s: %s; every other tensor of the checkpoint is loaded",
                _num_classes(self.model),
                " (rows of classes named as in the checkpoint copied, see above)" if transferred else "",
                ", ".join(sorted({k.rsplit(".", 1)[0] for k in reinit})),
            )
        if not any(counted(k) for k in given):
            return  # a backbone checkpoint (ImageNet weights): the heads start from their init
        wrong = [k for k, _, _ in incompatible.incorrect_shapes if counted(k) and not is_class_specific(k)]
        other_shapes = {k for k, _, _ in incompatible.incorrect_shapes}  # fvcore lists them as missing too
        missing = [k for k in incompatible.missing_keys if counted(k) and k not in other_shapes]
        if not missing and not wrong:
            return
        problems = []
        if missing:
            problems.append(f"{_layers(missing)} are not in it")
        if wrong:
            problems.append(f"{_layers(wrong)} have other shapes")
        message = (
            f"{self._weights_key} {self._loading} would leave layers of the detector that do not depend on the "
            f"class count at their random init: " + "; ".join(problems)
        )
        self._stop_unless_allowed(
            message,
            "Use the checkpoint of a detector of this config (same heads: MODEL.MASK_ON, ROI_HEADS.NAME, cascade "
            "stages), or a backbone-only checkpoint",
        )

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if not is_local_path(self.save_dir):  # remote storage: PathManager's own semantics
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        names = model_class_names(self._cfg)
        if names:  # what the class-specific rows stand for: class-name transfer when fine-tuned
            data["thing_classes"] = names
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
        except (OSError, RuntimeError) as e:
            cause = _os_error(e)
            if cause is None:
                raise
            last = self.get_checkpoint_file() if self.has_checkpoint() else None
            kept = f"; {last} stays the last complete checkpoint" if last else ""
            reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno and cause.strerror else str(cause)
            raise CheckpointWriteError(f"Cannot write checkpoint {save_file}: {reason}{kept}") from e
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not is_local_path(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path, *args, **kwargs):
        if is_local_path(path) and "?" not in path and not os.path.isfile(path):
            raise CheckpointNotFound(self._describe(path, "does not exist"))
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._parsed_url_during_load = None  # DetectionCheckpointer leaves it set when loading fails
            self._loading = None

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
                self._describe(
                    filename,
                    f"is not a readable checkpoint (truncated or not a torch/pickle file): {type(e).__name__}: {e}",
                )
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
