"""Every YAML config builds a model; the recipe values are those the README promises."""

import subprocess
import sys

import pytest
import torch
from conftest import CONFIGS, REPO, make_cfg

from detectron2.modeling import build_model

import hrnet_d2

YAML_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("Base-"))


def test_expected_configs_exist():
    for w in (18, 32, 40, 48):
        for s in ("1x", "2x"):
            assert f"COCO-Detection/faster_rcnn_hrnetv2p_w{w}_{s}.yaml" in YAML_CONFIGS
            assert f"COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w{w}_{s}.yaml" in YAML_CONFIGS
    assert "faster_rcnn_hrnetv2p_w32.yaml" in YAML_CONFIGS
    assert any("quickstart" in c for c in YAML_CONFIGS)


@pytest.mark.parametrize("config", YAML_CONFIGS)
def test_every_config_builds(config):
    cfg = make_cfg(config)
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        shapes = model.backbone.output_shape()
        assert set(cfg.MODEL.RPN.IN_FEATURES) <= set(shapes)
        assert set(cfg.MODEL.ROI_HEADS.IN_FEATURES) <= set(shapes)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_recipe():
    for w in (18, 32, 40, 48):
        one = make_cfg(f"COCO-Detection/faster_rcnn_hrnetv2p_w{w}_1x.yaml")
        two = make_cfg(f"COCO-InstanceSegmentation/mask_rcnn_hrnetv2p_w{w}_2x.yaml")
        assert one.MODEL.HRNET.ARCH == two.MODEL.HRNET.ARCH == f"w{w}"
        assert one.SOLVER.IMS_PER_BATCH == 16 and one.SOLVER.BASE_LR == 0.02
        assert (one.SOLVER.MAX_ITER, tuple(one.SOLVER.STEPS)) == (90000, (60000, 80000))
        assert (two.SOLVER.MAX_ITER, tuple(two.SOLVER.STEPS)) == (180000, (150000, 170000))
        assert not one.MODEL.MASK_ON and two.MODEL.MASK_ON
    default = make_cfg("faster_rcnn_hrnetv2p_w32.yaml")
    assert default.MODEL.HRNET.ARCH == "w32" and default.SOLVER.MAX_ITER == 90000


def test_input_convention_of_the_official_weights():
    cfg = make_cfg("Base-RCNN-HRNetV2p.yaml")
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]


def test_full_w32_detector_forward_on_a_small_image():
    cfg = make_cfg("faster_rcnn_hrnetv2p_w32.yaml")
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 128, 160) * 255}])
    assert out[0]["instances"].image_size == (128, 160)


def test_import_from_another_project_directory(tmp_path):
    """`import hrnet_d2` from any cwd registers the builders; configs ship inside the package."""
    code = (
        "import hrnet_d2, os\n"
        "from detectron2.modeling import BACKBONE_REGISTRY\n"
        "from detectron2.config import get_cfg\n"
        "for n in ('build_hrnet_backbone', 'build_hrnetv2p_backbone', 'build_hrnet_fpn_backbone'):\n"
        "    BACKBONE_REGISTRY.get(n)\n"
        "cfg = get_cfg(); hrnet_d2.add_hrnet_config(cfg)\n"
        "path = hrnet_d2.get_config_file('faster_rcnn_hrnetv2p_w32.yaml')\n"
        "cfg.merge_from_file(path)\n"
        "assert cfg.MODEL.BACKBONE.NAME == 'build_hrnetv2p_backbone'\n"
        "assert os.path.commonpath([path, os.path.dirname(hrnet_d2.__file__)]) == os.path.dirname(hrnet_d2.__file__)\n"
        "print('OK', cfg.MODEL.HRNET.ARCH)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "OK w32" in result.stdout


def test_get_config_file_names_what_is_available():
    with pytest.raises(FileNotFoundError, match="faster_rcnn_hrnetv2p_w32.yaml"):
        hrnet_d2.get_config_file("no_such_config.yaml")


def test_setup_py_does_not_import_torch_or_require_detectron2():
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported and "detectron2" not in imported

    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == hrnet_d2.__version__
    assert "detectron2" not in out.stdout
    requires = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.requires('hrnet_d2'))"],
        capture_output=True,
        text=True,
    ).stdout
    assert "torch" in requires and "detectron2" not in requires
