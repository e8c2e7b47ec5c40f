"""The model zoo: every published checkpoint that ``hrnet_d2://<name>`` resolves, in one table.

Facts only; fetching, checking and converting is ``catalog.py``.  Two kinds of entries:

* ``coco/<detector>``: the HRNetV2p COCO detectors published by mmdetection.  Name, URL,
  box / mask AP are copied verbatim from mmdetection 3.3.0's ``configs/hrnet/metafile.yml``
  (Faster / Mask / Cascade / Cascade Mask R-CNN, Hybrid Task Cascade run by ``HybridTaskCascadeROIHeads``,
  and FCOS run by ``FCOSDetector``); the SHA-256 prefix is the 8 hex digits mmdetection puts in each file name.
  ``config`` is the Detectron2 config that reproduces the checkpoint's test-time settings.
* ``imagenet/<arch>``: the ImageNet-pretrained HRNet bodies of HRNet-Image-Classification
  (whose own links are OneDrive share pages, not downloadable files), as published by timm: the
  ``v0.1-hrnet`` GitHub release (SHA-256 prefix in the file name), then, if that cannot be
  fetched, the ``<timm name>.ms_in1k`` safetensors on the Hugging Face hub (no published hash:
  checked by converting it, which verifies every tensor name and shape against ``arch``).

``python tools/model_zoo.py`` renders the README's "COCO model zoo" table from this one.
"""

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = [
    "Download",
    "ZooEntry",
    "ZOO",
    "coco_models",
    "imagenet_bodies",
    "MMDET_METAFILE",
    "MMDET_HRNET",
    "HRNET_CLASSIFICATION_REPO",
    "TIMM_HRNET_RELEASE",
]

MMDET_METAFILE = "mmdetection 3.3.0 configs/hrnet/metafile.yml"
MMDET_HRNET = "https://github.com/open-mmlab/mmdetection/tree/v3.3.0/configs/hrnet"
HRNET_CLASSIFICATION_REPO = "https://github.com/HRNet/HRNet-Image-Classification"
TIMM_HRNET_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/tag/v0.1-hrnet"


@dataclass(frozen=True)
class Download:
    """One place a checkpoint can be downloaded from.

    Args:
        url: the official URL.
        sha256: the leading hex digits of the file's SHA-256 as published (in the file name,
            torch.hub's convention), or None when no hash is published.
    """

    url: str
    sha256: Optional[str] = None


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint.

    Args:
        name: what follows ``hrnet_d2://``: ``coco/<detector>`` or ``imagenet/<arch>``.
        arch: the HRNet body (a key of ``hrnet_d2.modeling.arch.ARCHITECTURES``).
        downloads: where to get it, tried in order when one cannot be fetched (network or
            HTTP error; never after a hash mismatch).
        source: where the URL, hash and numbers come from.
        config: COCO models: the config the checkpoint is converted for and evaluated with,
            relative to ``configs/``.  ImageNet bodies: None (converted for the HRNetV2p
            detectors, ``backbone.bottom_up.*``, and checked against ``arch``).
        box_ap, mask_ap: published COCO val2017 AP (None: not applicable).
        source_name: the model's name at its source (mmdetection config name / timm model name).
        official_file: ImageNet bodies: the file name in the official HRNet-Image-Classification release.
    """

    name: str
    arch: str
    downloads: Tuple[Download, ...]
    source: str
    config: Optional[str] = None
    box_ap: Optional[float] = None
    mask_ap: Optional[float] = None
    source_name: str = ""
    official_file: str = ""

    @property
    def url(self) -> str:
        return self.downloads[0].url

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def timm_name(self) -> str:
        """ImageNet bodies: the timm model name (``hrnet_w32``)."""
        assert self.kind == "imagenet", self.name
        return self.source_name


_MMDET = "https://download.openmmlab.com/mmdetection/v2.0/hrnet/"
_MMDET_FILE = re.compile(r"-([0-9a-f]{8})\.pth$")

# (our name, mmdetection metafile Name, Weights URL, box AP, mask AP) -- verbatim from the metafile
_MMDET_MODELS = [
    (
        "faster_rcnn_hrnetv2p_w18_1x",
        "faster-rcnn_hrnetv2p-w18-1x_coco",
        "faster_rcnn_hrnetv2p_w18_1x_coco/faster_rcnn_hrnetv2p_w18_1x_coco_20200130-56651a6d.pth",
        36.9,
        None,
    ),
    (
        "faster_rcnn_hrnetv2p_w18_2x",
        "faster-rcnn_hrnetv2p-w18-2x_coco",
        "faster_rcnn_hrnetv2p_w18_2x_coco/faster_rcnn_hrnetv2p_w18_2x_coco_20200702_085731-a4ec0611.pth",
        38.9,
        None,
    ),
    (
        "faster_rcnn_hrnetv2p_w32_1x",
        "faster-rcnn_hrnetv2p-w32-1x_coco",
        "faster_rcnn_hrnetv2p_w32_1x_coco/faster_rcnn_hrnetv2p_w32_1x_coco_20200130-6e286425.pth",
        40.2,
        None,
    ),
    (
        "faster_rcnn_hrnetv2p_w32_2x",
        "faster-rcnn_hrnetv2p-w32_2x_coco",
        "faster_rcnn_hrnetv2p_w32_2x_coco/faster_rcnn_hrnetv2p_w32_2x_coco_20200529_015927-976a9c15.pth",
        41.4,
        None,
    ),
    (
        "faster_rcnn_hrnetv2p_w40_1x",
        "faster-rcnn_hrnetv2p-w40-1x_coco",
        "faster_rcnn_hrnetv2p_w40_1x_coco/faster_rcnn_hrnetv2p_w40_1x_coco_20200210-95c1f5ce.pth",
        41.2,
        None,
    ),
    (
        "faster_rcnn_hrnetv2p_w40_2x",
        "faster-rcnn_hrnetv2p-w40_2x_coco",
        "faster_rcnn_hrnetv2p_w40_2x_coco/faster_rcnn_hrnetv2p_w40_2x_coco_20200512_161033-0f236ef4.pth",
        42.1,
        None,
    ),
    (
        "mask_rcnn_hrnetv2p_w18_1x",
        "mask-rcnn_hrnetv2p-w18-1x_coco",
        "mask_rcnn_hrnetv2p_w18_1x_coco/mask_rcnn_hrnetv2p_w18_1x_coco_20200205-1c3d78ed.pth",
        37.7,
        34.2,
    ),
    (
        "mask_rcnn_hrnetv2p_w18_2x",
        "mask-rcnn_hrnetv2p-w18-2x_coco",
        "mask_rcnn_hrnetv2p_w18_2x_coco/mask_rcnn_hrnetv2p_w18_2x_coco_20200212-b3c825b1.pth",
        39.8,
        36.0,
    ),
    (
        "mask_rcnn_hrnetv2p_w32_1x",
        "mask-rcnn_hrnetv2p-w32-1x_coco",
        "mask_rcnn_hrnetv2p_w32_1x_coco/mask_rcnn_hrnetv2p_w32_1x_coco_20200207-b29f616e.pth",
        41.2,
        37.1,
    ),
    (
        "mask_rcnn_hrnetv2p_w32_2x",
        "mask-rcnn_hrnetv2p-w32-2x_coco",
        "mask_rcnn_hrnetv2p_w32_2x_coco/mask_rcnn_hrnetv2p_w32_2x_coco_20200213-45b75b4d.pth",
        42.5,
        37.8,
    ),
    (
        "mask_rcnn_hrnetv2p_w40_1x",
        "mask-rcnn_hrnetv2p-w40_1x_coco",
        "mask_rcnn_hrnetv2p_w40_1x_coco/mask_rcnn_hrnetv2p_w40_1x_coco_20200511_015646-66738b35.pth",
        42.1,
        37.5,
    ),
    (
        "mask_rcnn_hrnetv2p_w40_2x",
        "mask-rcnn_hrnetv2p-w40-2x_coco",
        "mask_rcnn_hrnetv2p_w40_2x_coco/mask_rcnn_hrnetv2p_w40_2x_coco_20200512_163732-aed5e4ab.pth",
        42.8,
        38.2,
    ),
    (
        "cascade_rcnn_hrnetv2p_w18_20e",
        "cascade-rcnn_hrnetv2p-w18-20e_coco",
        "cascade_rcnn_hrnetv2p_w18_20e_coco/cascade_rcnn_hrnetv2p_w18_20e_coco_20200210-434be9d7.pth",
        41.2,
        None,
    ),
    (
        "cascade_rcnn_hrnetv2p_w32_20e",
        "cascade-rcnn_hrnetv2p-w32-20e_coco",
        "cascade_rcnn_hrnetv2p_w32_20e_coco/cascade_rcnn_hrnetv2p_w32_20e_coco_20200208-928455a4.pth",
        43.3,
        None,
    ),
    (
        "cascade_rcnn_hrnetv2p_w40_20e",
        "cascade-rcnn_hrnetv2p-w40-20e_coco",
        "cascade_rcnn_hrnetv2p_w40_20e_coco/cascade_rcnn_hrnetv2p_w40_20e_coco_20200512_161112-75e47b04.pth",
        43.8,
        None,
    ),
    (
        "cascade_mask_rcnn_hrnetv2p_w18_20e",
        "cascade-mask-rcnn_hrnetv2p-w18_20e_coco",
        "cascade_mask_rcnn_hrnetv2p_w18_20e_coco/cascade_mask_rcnn_hrnetv2p_w18_20e_coco_20200210-b543cd2b.pth",
        41.6,
        36.4,
    ),
    (
        "cascade_mask_rcnn_hrnetv2p_w32_20e",
        "cascade-mask-rcnn_hrnetv2p-w32_20e_coco",
        "cascade_mask_rcnn_hrnetv2p_w32_20e_coco/cascade_mask_rcnn_hrnetv2p_w32_20e_coco_20200512_154043-39d9cf7b.pth",
        44.3,
        38.6,
    ),
    (
        "cascade_mask_rcnn_hrnetv2p_w40_20e",
        "cascade-mask-rcnn_hrnetv2p-w40-20e_coco",
        "cascade_mask_rcnn_hrnetv2p_w40_20e_coco/cascade_mask_rcnn_hrnetv2p_w40_20e_coco_20200527_204922-969c4610.pth",
        45.1,
        39.3,
    ),
    (
        "htc_hrnetv2p_w18_20e",
        "htc_hrnetv2p-w18_20e_coco",
        "htc_hrnetv2p_w18_20e_coco/htc_hrnetv2p_w18_20e_coco_20200210-b266988c.pth",
        42.8,
        37.9,
    ),
    (
        "htc_hrnetv2p_w32_20e",
        "htc_hrnetv2p-w32_20e_coco",
        "htc_hrnetv2p_w32_20e_coco/htc_hrnetv2p_w32_20e_coco_20200207-7639fa12.pth",
        45.4,
        39.9,
    ),
    (
        "htc_hrnetv2p_w40_20e",
        "htc_hrnetv2p-w40_20e_coco",
        "htc_hrnetv2p_w40_20e_coco/htc_hrnetv2p_w40_20e_coco_20200529_183411-417c4d5b.pth",
        46.4,
        40.8,
    ),
    # FCOS (issue 21): FCOSDetector with mmdetection's conventions (configs/Base-FCOS-HRNetV2p-mmdet.yaml)
    (
        "fcos_hrnetv2p_w18_1x",
        "fcos_hrnetv2p-w18-gn-head_4xb4-1x_coco",
        "fcos_hrnetv2p_w18_gn-head_4x4_1x_coco/fcos_hrnetv2p_w18_gn-head_4x4_1x_coco_20201212_100710-4ad151de.pth",
        35.3,
        None,
    ),
    (
        "fcos_hrnetv2p_w18_2x",
        "fcos_hrnetv2p-w18-gn-head_4xb4-2x_coco",
        "fcos_hrnetv2p_w18_gn-head_4x4_2x_coco/fcos_hrnetv2p_w18_gn-head_4x4_2x_coco_20201212_101110-5c575fa5.pth",
        38.2,
        None,
    ),
    (
        "fcos_hrnetv2p_w32_1x",
        "fcos_hrnetv2p-w32-gn-head_4xb4-1x_coco",
        "fcos_hrnetv2p_w32_gn-head_4x4_1x_coco/fcos_hrnetv2p_w32_gn-head_4x4_1x_coco_20201211_134730-cb8055c0.pth",
        39.5,
        None,
    ),
    (
        "fcos_hrnetv2p_w32_2x",
        "fcos_hrnetv2p-w32-gn-head_4xb4-2x_coco",
        "fcos_hrnetv2p_w32_gn-head_4x4_2x_coco/fcos_hrnetv2p_w32_gn-head_4x4_2x_coco_20201212_112133-77b6b9bb.pth",
        40.8,
        None,
    ),
    (
        "fcos_hrnetv2p_w18_ms_2x",
        "fcos_hrnetv2p-w18-gn-head_ms-640-800-4xb4-2x_coco",
        "fcos_hrnetv2p_w18_gn-head_mstrain_640-800_4x4_2x_coco/fcos_hrnetv2p_w18_gn-head_mstrain_640-800_4x4_2x_coco_20201212_111651-441e9d9f.pth",
        38.3,
        None,
    ),
    (
        "fcos_hrnetv2p_w32_ms_2x",
        "fcos_hrnetv2p-w32-gn-head_ms-640-800-4xb4-2x_coco",
        "fcos_hrnetv2p_w32_gn-head_mstrain_640-800_4x4_2x_coco/fcos_hrnetv2p_w32_gn-head_mstrain_640-800_4x4_2x_coco_20201212_090846-b6f2b49f.pth",
        41.9,
        None,
    ),
    (
        "fcos_hrnetv2p_w40_ms_2x",
        "fcos_hrnetv2p-w40-gn-head_ms-640-800-4xb4-2x_coco",
        "fcos_hrnetv2p_w40_gn-head_mstrain_640-800_4x4_2x_coco/fcos_hrnetv2p_w40_gn-head_mstrain_640-800_4x4_2x_coco_20201212_124752-f22d2ce5.pth",
        42.7,
        None,
    ),
]


def _coco_entry(name, mmdet_name, path, box, mask):
    folder = "COCO-InstanceSegmentation" if "mask_rcnn" in name or name.startswith("htc_") else "COCO-Detection"
    return ZooEntry(
        name=f"coco/{name}",
        arch=re.search(r"_hrnetv2p_(w\d+)_", name).group(1),
        downloads=(Download(_MMDET + path, _MMDET_FILE.search(path).group(1)),),
        source=MMDET_METAFILE,
        config=f"{folder}/{name}_mmdet.yaml",
        box_ap=box,
        mask_ap=mask,
        source_name=mmdet_name,
    )


_TIMM_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-hrnet/"
# arch -> (official HRNet-Image-Classification file name, timm model name, timm release file name)
_IMAGENET = {
    "w18_small_v1": ("hrnet_w18_small_model_v1.pth", "hrnet_w18_small", "hrnet_w18_small_v1-f460c6bc.pth"),
    "w18_small_v2": ("hrnet_w18_small_model_v2.pth", "hrnet_w18_small_v2", "hrnet_w18_small_v2-4c50a8cb.pth"),
    "w18": ("hrnetv2_w18_imagenet_pretrained.pth", "hrnet_w18", "hrnetv2_w18-8cb57bb9.pth"),
    "w30": ("hrnetv2_w30_imagenet_pretrained.pth", "hrnet_w30", "hrnetv2_w30-8d7f8dab.pth"),
    "w32": ("hrnetv2_w32_imagenet_pretrained.pth", "hrnet_w32", "hrnetv2_w32-90d8c5fb.pth"),
    "w40": ("hrnetv2_w40_imagenet_pretrained.pth", "hrnet_w40", "hrnetv2_w40-7cd397a4.pth"),
    "w44": ("hrnetv2_w44_imagenet_pretrained.pth", "hrnet_w44", "hrnetv2_w44-c9ac8c18.pth"),
    "w48": ("hrnetv2_w48_imagenet_pretrained.pth", "hrnet_w48", "hrnetv2_w48-abd2e6ab.pth"),
    "w64": ("hrnetv2_w64_imagenet_pretrained.pth", "hrnet_w64", "hrnetv2_w64-b47cc881.pth"),
}


def _imagenet_entry(arch, official_file, timm_name, release_file):
    return ZooEntry(
        name=f"imagenet/{arch}",
        arch=arch,
        downloads=(
            Download(_TIMM_RELEASE + release_file, release_file.rsplit("-", 1)[1].split(".")[0]),
            Download(f"https://huggingface.co/timm/{timm_name}.ms_in1k/resolve/main/model.safetensors", None),
        ),
        source=f"HRNet-Image-Classification weights as published by timm ({TIMM_HRNET_RELEASE}; "
        f"Hugging Face hub timm/{timm_name}.ms_in1k)",
        source_name=timm_name,
        official_file=official_file,
    )


ZOO: Dict[str, ZooEntry] = {
    e.name: e
    for e in [_coco_entry(*row) for row in _MMDET_MODELS] + [_imagenet_entry(a, *v) for a, v in _IMAGENET.items()]
}


def coco_models():
    return [e for e in ZOO.values() if e.kind == "coco"]


def imagenet_bodies():
    return {e.arch: e for e in ZOO.values() if e.kind == "imagenet"}
