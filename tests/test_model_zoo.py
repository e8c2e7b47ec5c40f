"""The model-zoo table (docs/model_zoo.md) cannot drift from the code; the README has one zoo table
only (the published detectors); the published-#Params explanation holds; tools/analyze_model.py
reports consistent numbers."""

import analyze_model
import model_zoo
import pytest
from conftest import REPO

from hrnet_d2 import analysis

# FLOPs need a real forward at 800x1333 (about a minute on 2 cores): CI recomputes the
# cheapest COCO config; params are recomputed for every config.
FLOPS_CHECKED = "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml"


@pytest.mark.e2e
def test_doc_is_what_the_script_generates():
    doc = model_zoo.DOC.read_text()
    written = model_zoo.parse_gflops(doc)
    assert sorted(written) == model_zoo.coco_configs(), "docs/model_zoo.md must list every COCO config"
    rows = model_zoo.collect(flops_for=[FLOPS_CHECKED], log=lambda *_: None)
    checked = next(r for r in rows if r.config == FLOPS_CHECKED)
    assert checked.gflops == written[FLOPS_CHECKED]
    for r in rows:
        r.gflops = r.gflops or written[r.config]
    assert doc == model_zoo.render_doc(rows), "docs/model_zoo.md is stale: run python tools/model_zoo.py"


def test_readme_has_one_ap_table_and_links_the_recipe_table():
    """One source of published AP in the README (the hrnet_d2://coco block, tests/test_zoo.py); the
    recipes' table lives in docs/model_zoo.md only."""
    readme = model_zoo.README.read_text()
    assert "](docs/model_zoo.md)" in readme
    assert model_zoo.parse_gflops(readme) == {}, "the recipes' table belongs to docs/model_zoo.md"
    assert readme.count("| published box AP |") == 1
    # negative control: the recipes' table pasted into the README is found
    rows = [model_zoo.Row(c, "w18", 1, "1.0") for c in model_zoo.coco_configs()]
    assert sorted(model_zoo.parse_gflops(readme + model_zoo.render_table(rows))) == model_zoo.coco_configs()


def test_published_numbers_name_existing_configs_and_a_source():
    configs = set(model_zoo.coco_configs())
    for name, pub in model_zoo.PUBLISHED.items():
        assert name in configs, name
        assert model_zoo.SOURCES[pub["src"]].startswith("https://github.com/HRNet/HRNet-Object-Detection")
        if "mask" in pub:
            assert pub["box"] > pub["mask"], name


def test_published_params_are_our_counts_in_units_of_2_pow_20():
    """The explanation in docs/model_zoo.md: same modules, count / 2^20 (not 10^6), no BN affine."""
    for name in model_zoo.FASTER:
        _, model = analysis.load_model(model_zoo.CONFIG_DIR / name, device="meta")
        total = analysis.count_parameters(model, norms=False)
        published = model_zoo.PUBLISHED[name]["params"]
        assert round(total / 2**20, 1) == published, name
        assert round(total / 1e6, 1) != published, name
        groups = analysis.parameter_groups(model, norms=False)
        # head sizes fixed by the reference recipe (mmdetection v0.x HRFPN/RPNHead/SharedFCBBoxHead)
        assert groups["backbone.fpn_convs"] == 5 * (256 * 256 * 9 + 256)
        assert groups["proposal_generator.rpn_head"] == (256 * 256 * 9 + 256) + (256 * 3 + 3) + (256 * 12 + 12)
        assert groups["roi_heads.box_head"] == (256 * 7 * 7 * 1024 + 1024) + (1024 * 1024 + 1024)


def test_analyze_model_cli(capsys):
    cfg_file = REPO / "configs" / "quickstart" / "mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
    assert analyze_model.main(["--config-file", str(cfg_file), "--input-size", "128", "160"]) == 0
    out = capsys.readouterr().out
    cfg, model = analysis.load_model(cfg_file)
    total = analysis.count_parameters(model)
    assert f"{total:,}" in out
    flops = analysis.count_flops(cfg, model, 128, 160)
    assert set(flops) == {
        "backbone",
        "proposal_generator.rpn_head",
        "roi_heads.box_head",
        "roi_heads.box_predictor",
        "roi_heads.mask_head",
    }
    assert f"{sum(flops.values()) / 1e9:.2f}" in out
    # FLOPs scale with the image: 4x the pixels gives ~4x the backbone FLOPs
    bigger = analysis.count_flops(cfg, model, 256, 320)
    assert 3.5 < bigger["backbone"] / flops["backbone"] < 4.5
    assert bigger["roi_heads.box_head"] == flops["roi_heads.box_head"]  # fixed ROI count
