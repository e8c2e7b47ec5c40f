"""hrnet_d2://<name>: published weights by name (hrnet_d2/checkpoint/catalog.py) and the table behind it (hrnet_d2/checkpoint/zoo.py).

No network here: an HTTP server on 127.0.0.1 serves generated checkpoints under the official URL
paths, and $HRNET_D2_ZOO_BASE_URL points the handler at it.  The table itself is checked against
the independent sources it copies: mmdetection 3.3.0's metafile (a copy in tests/data, checked
against the mmdet wheel, a test dependency, where installed) and timm's pretrained configs.
"""

import dataclasses
import hashlib
import http.server
import os
import re
import shlex
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import timm
import torch
import yaml
from conftest import make_cfg, oracle_missing

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

import hrnet_d2  # noqa: F401  (registers hrnet_d2://)
from hrnet_d2 import HRNet
from hrnet_d2.checkpoint import AtomicCheckpointer, catalog, zoo
from hrnet_d2.checkpoint.convert import ConversionError
from hrnet_d2.checkpoint.pretrained import IMAGENET_CHECKPOINTS
from hrnet_d2.config import CONFIG_DIR
from hrnet_d2.convert import main as convert_main
from hrnet_d2.modeling.arch import ARCHITECTURES

SMALL = "w18_small_v1"
FASTER = "COCO-Detection/faster_rcnn_hrnetv2p_w18_1x.yaml"


# ---------------------------------------------------------------- a local "internet"
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        server = self.server
        server.requests.append(self.path)
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in server.truncated:  # the connection drops half-way
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 in a thread; stops at the end of the test (or after 5 min)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.truncated = {}, [], set()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(300, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    yield httpd
    watchdog.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture
def cache(tmp_path, monkeypatch, server):
    root = tmp_path / "cache"
    monkeypatch.setenv("HRNET_D2_CACHE", str(root))
    monkeypatch.setenv("HRNET_D2_ZOO_BASE_URL", server.base)
    return root


def _files_in(root):
    """Every file under ``root`` except iopath's (empty) lock files."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialized(state_dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- generated checkpoints
def body_state_dict(timm_model, keep_num_batches_tracked=True):
    """The tensors of a timm / official state dict that our HRNet body holds."""
    with torch.device("meta"):
        ours = HRNet(ARCHITECTURES[SMALL], norm="BN").state_dict()
    return {
        k: v
        for k, v in timm_model.state_dict().items()
        if k in ours and (keep_num_batches_tracked or not k.endswith("num_batches_tracked"))
    }


@pytest.fixture(scope="module")
def imagenet_bytes(timm_small):
    """An official-layout ImageNet checkpoint (a plain state dict with the classifier)."""
    return _serialized(timm_small.state_dict())


def _imagenet_entry(data: bytes):
    """The real imagenet/w18_small_v1 entry, with its release file renamed after the generated file's hash."""
    real = zoo.ZOO[f"imagenet/{SMALL}"]
    primary, alt = real.downloads
    folder = primary.url.rsplit("/", 1)[0]
    sha = _sha256(data)[:8]
    return dataclasses.replace(real, downloads=(zoo.Download(f"{folder}/hrnet_w18_small_v1-{sha}.pth", sha), alt))


def _path(url):
    return urlsplit(url).path


@pytest.fixture(scope="module")
def small_detector_config(tmp_path_factory):
    """A Faster R-CNN config with the w18_small_v1 body and small heads (what a 'published' test model is for)."""
    path = tmp_path_factory.mktemp("cfg") / "faster_rcnn_hrnetv2p_w18_small_test.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "_BASE_": str(CONFIG_DIR / FASTER),
                "MODEL": {"HRNET": {"ARCH": SMALL}, "ROI_HEADS": {"NUM_CLASSES": 3}, "ROI_BOX_HEAD": {"FC_DIM": 32}},
            }
        )
    )
    return path


# Detectron2 name -> mmdetection 2.x/3.x name of the Faster R-CNN head layers
MMDET_FASTER_RCNN_HEADS = {
    "proposal_generator.rpn_head.conv": "rpn_head.rpn_conv",
    "proposal_generator.rpn_head.objectness_logits": "rpn_head.rpn_cls",
    "proposal_generator.rpn_head.anchor_deltas": "rpn_head.rpn_reg",
    "roi_heads.box_head.fc1": "roi_head.bbox_head.shared_fcs.0",
    "roi_heads.box_head.fc2": "roi_head.bbox_head.shared_fcs.1",
    "roi_heads.box_predictor.cls_score": "roi_head.bbox_head.fc_cls",
    "roi_heads.box_predictor.bbox_pred": "roi_head.bbox_head.fc_reg",
}


def mmdet_faster_rcnn_state_dict(timm_model, ours, reduction_std=1.0, neck_biases=True):
    """An mmdetection-layout Faster R-CNN state dict: ``timm_model``'s body, random HRFPN neck and heads shaped
    like ``ours`` (a Detectron2 model's state dict); ``neck_biases=False`` leaves the neck's biases at zero."""
    sd = {f"backbone.{k}": v for k, v in body_state_dict(timm_model).items()}
    sd["neck.reduction_conv.conv.weight"] = torch.randn_like(ours["backbone.reduction_conv.weight"]) * reduction_std
    bias = ours["backbone.reduction_conv.bias"]
    sd["neck.reduction_conv.conv.bias"] = torch.randn_like(bias) if neck_biases else torch.zeros_like(bias)
    for i in range(5):
        sd[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(256, 256, 3, 3) * 0.02
        sd[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(256) if neck_biases else torch.zeros(256)
    for d2, mm in MMDET_FASTER_RCNN_HEADS.items():
        for p in ("weight", "bias"):
            sd[f"{mm}.{p}"] = torch.randn_like(ours[f"{d2}.{p}"]) * 0.01
    return sd


@pytest.fixture(scope="module")
def mmdet_checkpoint(timm_small, small_detector_config):
    """An mmdetection-layout Faster R-CNN checkpoint: HRNet backbone, HRFPN neck, RPN and 2-fc box heads
    (mmdetection 2.x/3.x names; heads sized for the config), in mmdetection's container."""
    torch.manual_seed(1)
    cfg = make_cfg(str(small_detector_config))
    ours = build_model(cfg).state_dict()
    sd = mmdet_faster_rcnn_state_dict(timm_small, ours)
    return sd, _serialized({"meta": {"epoch": 12}, "state_dict": sd})


def _coco_entry(data: bytes, config):
    real = zoo.ZOO["coco/faster_rcnn_hrnetv2p_w18_1x"]
    folder = real.url.rsplit("/", 1)[0]
    sha = _sha256(data)[:8]
    return dataclasses.replace(
        real,
        downloads=(zoo.Download(f"{folder}/faster_rcnn_hrnetv2p_w18_1x_coco_20200130-{sha}.pth", sha),),
        config=str(config),
        arch=SMALL,
    )


class _Recording(DetectionCheckpointer):
    def _load_model(self, checkpoint):
        self.report = super()._load_model(checkpoint)
        return self.report


class _RecordingAtomic(AtomicCheckpointer):  # what train_net.py loads MODEL.WEIGHTS with
    def _load_model(self, checkpoint):
        self.report = super()._load_model(checkpoint)
        return self.report


# ---------------------------------------------------------------- downloads, checks, conversion, cache
def test_imagenet_body_by_name_downloads_checks_converts_and_caches(
    server, cache, monkeypatch, timm_small, imagenet_bytes
):
    entry = _imagenet_entry(imagenet_bytes)
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    server.files[_path(entry.url)] = imagenet_bytes

    cfg = make_cfg(FASTER, "MODEL.HRNET.ARCH", SMALL, "MODEL.WEIGHTS", f"hrnet_d2://imagenet/{SMALL}")
    model = build_model(cfg).eval()
    checkpointer = _Recording(model)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    assert server.requests == [_path(entry.url)]
    assert not checkpointer.report.unexpected_keys and not checkpointer.report.incorrect_shapes
    assert not [k for k in checkpointer.report.missing_keys if k.startswith("backbone.bottom_up.")]
    ref = body_state_dict(timm_small, keep_num_batches_tracked=False)
    body = model.backbone.bottom_up.state_dict()
    for k, v in ref.items():
        assert torch.equal(body[k], v), k

    # cached: the converted file under its name, the checked download under the URL's path; no partial files
    converted = cache / "imagenet" / f"{SMALL}.pth"
    assert PathManager.get_local_path(f"hrnet_d2://imagenet/{SMALL}") == str(converted)
    with PathManager.open(f"hrnet_d2://imagenet/{SMALL}", "rb") as f:
        assert f.read() == converted.read_bytes()
    assert _files_in(cache) == sorted([f"imagenet/{SMALL}.pth", "downloads" + _path(entry.url)])
    # a second resolve (and a second model load) makes no request
    DetectionCheckpointer(build_model(cfg)).load(cfg.MODEL.WEIGHTS)
    assert len(server.requests) == 1
    # a converted file that is gone is made again from the kept download, still without a request
    converted.unlink()
    assert PathManager.get_local_path(f"hrnet_d2://imagenet/{SMALL}") == str(converted)
    assert len(server.requests) == 1 and converted.is_file()
    # the converted file alone is enough (the download is not even looked at)
    (cache / "downloads" / _path(entry.url).lstrip("/")).unlink()
    assert PathManager.get_local_path(f"hrnet_d2://imagenet/{SMALL}") == str(converted)
    assert len(server.requests) == 1


def test_concurrent_resolves_download_and_convert_once(server, cache, monkeypatch, imagenet_bytes):
    """One process per GPU resolves the same name at the same time: one download, one conversion."""
    entry = _imagenet_entry(imagenet_bytes)
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    server.files[_path(entry.url)] = imagenet_bytes
    results, errors = [], []

    def resolve():
        try:
            results.append(PathManager.get_local_path(f"hrnet_d2://{entry.name}"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == [str(cache / "imagenet" / f"{SMALL}.pth")] * 3
    assert len(server.requests) == 1


def test_imagenet_body_falls_back_to_the_hub_safetensors(server, cache, monkeypatch, timm_small):
    """The release file is gone (404): the unhashed hub safetensors is used, checked by conversion."""
    from safetensors.torch import save

    entry = _imagenet_entry(b"not served")
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    hub = entry.downloads[1]
    assert hub.sha256 is None and urlsplit(hub.url).netloc == "huggingface.co"
    server.files[_path(hub.url)] = save({k: v.contiguous() for k, v in timm_small.state_dict().items()})
    path = PathManager.get_local_path(f"hrnet_d2://imagenet/{SMALL}")
    assert server.requests == [_path(entry.url), _path(hub.url)]
    model = torch.load(path, weights_only=True)["model"]
    ref = body_state_dict(timm_small, keep_num_batches_tracked=False)
    assert all(torch.equal(model[f"backbone.bottom_up.{k}"], v) for k, v in ref.items())

    # an unhashed download that does not convert is not kept: the error names it
    other = dataclasses.replace(entry, name="imagenet/w32", arch="w32")
    monkeypatch.setitem(zoo.ZOO, other.name, other)
    with pytest.raises(
        ConversionError,
        match=r"hrnet_d2://imagenet/w32: the downloaded file .*model\.safetensors "
        r"does not convert \(deleted.*found HRNet w18_small_v1.*expected w32",
    ):
        PathManager.get_local_path("hrnet_d2://imagenet/w32")
    assert not (cache / "imagenet" / "w32.pth").exists()
    assert not (cache / "downloads" / _path(hub.url).lstrip("/")).exists()


def test_coco_detector_by_name(server, cache, monkeypatch, mmdet_checkpoint, small_detector_config):
    sd, data = mmdet_checkpoint
    entry = _coco_entry(data, small_detector_config)
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    server.files[_path(entry.url)] = data
    assert re.search(r"_coco_\d{8}-[0-9a-f]{8}\.pth$", entry.url)  # mmdetection's file-name convention

    cfg = make_cfg(str(small_detector_config), "MODEL.WEIGHTS", f"hrnet_d2://{entry.name}")
    model = build_model(cfg).eval()
    checkpointer = _RecordingAtomic(model, cfg=cfg, complete=True)  # as train_net.py --eval-only loads it
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    report = checkpointer.report
    assert not report.unexpected_keys and not report.incorrect_shapes
    assert report.missing_keys == []  # body, pyramid and every head tensor come from the download
    pairs = [
        (model.backbone.bottom_up.stage4[0].branches[3][1].conv2.weight, "backbone.stage4.0.branches.3.1.conv2.weight"),
        (model.backbone.reduction_conv.weight, "neck.reduction_conv.conv.weight"),
        (model.backbone.fpn_convs[4].bias, "neck.fpn_convs.4.conv.bias"),
        (model.proposal_generator.rpn_head.anchor_deltas.weight, "rpn_head.rpn_reg.weight"),
        (model.proposal_generator.rpn_head.objectness_logits.bias, "rpn_head.rpn_cls.bias"),
        (model.roi_heads.box_head.fc1.weight, "roi_head.bbox_head.shared_fcs.0.weight"),
        (model.roi_heads.box_predictor.cls_score.weight, "roi_head.bbox_head.fc_cls.weight"),
        (model.roi_heads.box_predictor.bbox_pred.bias, "roi_head.bbox_head.fc_reg.bias"),
    ]
    for ours, key in pairs:
        assert torch.equal(ours, sd[key]), key
    assert server.requests == [_path(entry.url)]
    assert _files_in(cache) == sorted(["coco/faster_rcnn_hrnetv2p_w18_1x.pth", "downloads" + _path(entry.url)])
    PathManager.get_local_path(f"hrnet_d2://{entry.name}")
    assert len(server.requests) == 1


def test_a_checked_download_that_does_not_fit_the_config_is_kept_and_nothing_converted(
    server, cache, monkeypatch, mmdet_checkpoint
):
    _, data = mmdet_checkpoint
    entry = dataclasses.replace(_coco_entry(data, CONFIG_DIR / FASTER), arch="w18")  # expects W18, file holds W18-small
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    server.files[_path(entry.url)] = data
    with pytest.raises(
        ConversionError,
        match=r"hrnet_d2://coco/faster_rcnn_hrnetv2p_w18_1x: the downloaded file .* does "
        r"not convert: .*w18_small_v1.*w18",
    ):
        PathManager.get_local_path(f"hrnet_d2://{entry.name}")
    # the download matched its published hash: kept (converting with a fixed config needs no download)
    assert _files_in(cache) == ["downloads" + _path(entry.url)]


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "short_without_length"])
def test_bad_download_is_refused_and_nothing_is_left(server, cache, monkeypatch, imagenet_bytes, fault):
    entry = _imagenet_entry(imagenet_bytes)
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    url_path = _path(entry.url)
    if fault == "corrupt":  # same length, one byte changed
        bad = bytearray(imagenet_bytes)
        bad[len(bad) // 2] ^= 0xFF
        server.files[url_path] = bytes(bad)
    elif fault == "truncated":  # Content-Length announced, the connection drops half-way
        server.files[url_path] = imagenet_bytes
        server.truncated.add(url_path)
    else:  # half the file, honestly announced: only the hash can tell
        server.files[url_path] = imagenet_bytes[: len(imagenet_bytes) // 2]
    with pytest.raises(catalog.ZooDownloadError) as e:
        PathManager.get_local_path(f"hrnet_d2://imagenet/{SMALL}")
    msg = str(e.value)
    cached = str(cache / "downloads" / url_path.lstrip("/"))
    assert f"{server.base}{url_path}" in msg and cached in msg, msg
    assert ("cut short" if fault == "truncated" else "is not the published one") in msg
    assert "\n\n" not in msg
    assert _files_in(cache) == []
    assert len(server.requests) == 1  # a bad download is not retried with the unhashed mirror


def test_no_network_gives_the_manual_commands_and_they_work(
    tmp_path, monkeypatch, mmdet_checkpoint, small_detector_config, request
):
    closed = socket.socket()  # a port bound (kept, so no other process takes it) where nothing listens: refused
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    request.addfinalizer(closed.close)
    root = tmp_path / "cache"
    monkeypatch.setenv("HRNET_D2_CACHE", str(root))
    monkeypatch.setenv("HRNET_D2_ZOO_BASE_URL", f"http://127.0.0.1:{port}")
    sd, data = mmdet_checkpoint
    entry = _coco_entry(data, small_detector_config)
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    with pytest.raises(catalog.ZooDownloadError) as e:
        PathManager.get_local_path(f"hrnet_d2://{entry.name}")
    msg = str(e.value)
    file_name = entry.url.rsplit("/", 1)[1]
    assert f"http://127.0.0.1:{port}{_path(entry.url)}" in msg and "Connection refused" in msg
    assert f"curl -L -o {file_name} {entry.url} (its sha256 starts with {entry.downloads[0].sha256})" in msg
    assert _files_in(root) == []

    # the commands of the message, run by hand with the file fetched "elsewhere", give the model
    (tmp_path / file_name).write_bytes(data)
    command = next(line.strip() for line in msg.splitlines() if line.strip().startswith("python -m hrnet_d2.convert"))
    args = shlex.split(command)[3:]
    assert args[0] == file_name and args[2:] == ["--config-file", str(small_detector_config)]
    monkeypatch.chdir(tmp_path)
    assert convert_main(args) == 0
    assert os.path.isfile(args[1]) and f"MODEL.WEIGHTS {args[1]}" in msg
    # ... and the handler now uses that file, with no network
    assert PathManager.get_local_path(f"hrnet_d2://{entry.name}") == args[1]

    # an ImageNet body: both official places are named
    entry = _imagenet_entry(b"x")
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    with pytest.raises(catalog.ZooDownloadError) as e:
        PathManager.get_local_path(f"hrnet_d2://{entry.name}")
    msg = str(e.value)
    assert all(f"http://127.0.0.1:{port}{_path(d.url)}" in msg for d in entry.downloads), msg
    assert f"--arch {SMALL}" in msg


def test_cached_download_is_checked_before_use(server, cache, monkeypatch, imagenet_bytes):
    """A file put in the download cache by hand (as the no-network message suggests) must match the hash."""
    entry = _imagenet_entry(imagenet_bytes)
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    server.files[_path(entry.url)] = imagenet_bytes
    placed = cache / "downloads" / _path(entry.url).lstrip("/")
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"something else")
    PathManager.get_local_path(f"hrnet_d2://{entry.name}")
    assert server.requests == [_path(entry.url)]  # replaced by a download
    assert placed.read_bytes() == imagenet_bytes


def test_missing_local_weights_message_offers_the_name(tmp_path):
    from hrnet_d2.checkpoint.pretrained import PretrainedWeightsMissing, check_pretrained_weights

    cfg = make_cfg(FASTER, "MODEL.WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(PretrainedWeightsMissing, match="(?m)MODEL.WEIGHTS hrnet_d2://imagenet/w18$"):
        check_pretrained_weights(cfg)
    cfg.MODEL.WEIGHTS = "hrnet_d2://imagenet/w18"  # resolved by Detectron2's PathManager, not checked here
    check_pretrained_weights(cfg)


def test_unknown_name():
    with pytest.raises(catalog.UnknownZooName) as e:
        PathManager.get_local_path("hrnet_d2://coco/faster_rcnn_hrnetv2p_w32")
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "Did you mean coco/faster_rcnn_hrnetv2p_w32_" in msg
    assert all(name in msg for name in zoo.ZOO)


# ---------------------------------------------------------------- the table
NAME = re.compile(
    r"^(coco/((?:faster|mask|cascade|cascade_mask)_rcnn|fcos|htc)_hrnetv2p_(w\d+)_(1x|2x|20e|ms_2x)|imagenet/(w\d+(_small_v[12])?))$"
)
HOSTS = {"coco": {"download.openmmlab.com"}, "imagenet": {"github.com", "huggingface.co"}}


def test_table_entries_are_well_formed():
    assert len(zoo.coco_models()) == 28 and set(zoo.imagenet_bodies()) == set(ARCHITECTURES)
    for name, e in zoo.ZOO.items():
        m = NAME.match(name)
        assert m and e.name == name, name
        assert e.arch in ARCHITECTURES and e.arch == (m.group(3) or m.group(5)), name
        for d in e.downloads:
            parts = urlsplit(d.url)
            assert parts.scheme == "https" and parts.netloc in HOSTS[e.kind], d.url
            if d.sha256 is not None:  # the published prefix is the one in the file name
                assert re.fullmatch(r"[0-9a-f]{8}", d.sha256) and parts.path.endswith(f"-{d.sha256}.pth"), d.url
        assert e.downloads[0].sha256, f"{name}: the first download must be hash-checked"
        if e.kind == "coco":
            segm = "mask_rcnn" in name or m.group(2) == "htc"
            assert e.box_ap and (e.mask_ap is not None) == segm, name
            assert e.config == f"{'COCO-InstanceSegmentation' if segm else 'COCO-Detection'}/{name[5:]}_mmdet.yaml"
        else:
            assert e.config is None and e.official_file and e.timm_name


def test_every_coco_model_has_its_config():
    """The inference configs come with the whole-detector conversion (issue 10, items 1-2)."""
    missing = [e.config for e in zoo.coco_models() if not (CONFIG_DIR / e.config).is_file()]
    assert not missing, f"configs named by hrnet_d2.checkpoint.zoo are missing: {missing}"


def _metafile_mismatches(table, metafile_text):
    """Differences between our COCO entries and mmdetection's metafile (Faster/Mask/Cascade R-CNN, HTC, FCOS)."""
    published = {}
    for m in yaml.safe_load(metafile_text)["Models"]:
        if m["In Collection"] in ("Faster R-CNN", "Mask R-CNN", "Cascade R-CNN", "HTC", "FCOS"):
            metrics = {k: v for r in m["Results"] for k, v in r["Metrics"].items()}
            published[m["Name"]] = (m["Weights"], metrics.get("box AP"), metrics.get("mask AP"))
    ours = {e.source_name: (e.url, e.box_ap, e.mask_ap) for e in table if e.kind == "coco"}
    return sorted(set(published.items()) ^ set(ours.items()))


METAFILE_COPY = Path(__file__).parent / "data" / "mmdet-3.3.0_configs_hrnet_metafile.yml"


def _copy_body_and_recorded_sha256():
    """The checked-in metafile without its header comment, and the sha256 the header records for it."""
    lines = METAFILE_COPY.read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    assert lines[: len(header)] == header  # the added comments are the header, nothing else
    (sha,) = re.findall(r"sha256 ([0-9a-f]{64})", "".join(header))
    return "".join(lines[len(header) :]), sha


def _assert_table_is(metafile_text):
    assert _metafile_mismatches(zoo.ZOO.values(), metafile_text) == []
    # negative controls: one AP or one URL off, one model missing
    e = zoo.ZOO["coco/mask_rcnn_hrnetv2p_w32_2x"]
    for wrong in (
        dataclasses.replace(e, mask_ap=37.9),
        dataclasses.replace(e, downloads=(zoo.Download(e.url[:-5] + "0.pth", "0"),)),
    ):
        table = [wrong if x is e else x for x in zoo.ZOO.values()]
        assert len(_metafile_mismatches(table, metafile_text)) == 2
    assert len(_metafile_mismatches([x for x in zoo.ZOO.values() if x is not e], metafile_text)) == 1


def test_coco_entries_are_mmdetections_metafile():
    """Against the checked-in copy of mmdetection 3.3.0's metafile (tests/data; always run)."""
    body, sha = _copy_body_and_recorded_sha256()
    assert hashlib.sha256(body.encode()).hexdigest() == sha  # verbatim, as the header says
    assert "mmdetection 3.3.0" in METAFILE_COPY.read_text().splitlines()[0]
    _assert_table_is(body)


def test_coco_entries_are_the_installed_mmdetections_metafile():
    """Against the metafile in the installed mmdet wheel (the test dependency), which is the copy."""
    import importlib.util

    spec = importlib.util.find_spec("mmdet")  # the package is not imported (it needs mmcv's compiled ops)
    if spec is None:
        oracle_missing("mmdet (a test dependency, the oracle for the table) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], ".mim", "configs", "hrnet", "metafile.yml")
    with open(path, "rb") as f:
        installed = f.read()
    body, sha = _copy_body_and_recorded_sha256()
    assert hashlib.sha256(installed).hexdigest() == sha and installed.decode() == body
    _assert_table_is(installed.decode())


def test_imagenet_entries_are_timms_weights():
    for arch, e in zoo.imagenet_bodies().items():
        cfg = timm.models.get_pretrained_cfg(f"{e.timm_name}.ms_in1k")
        assert cfg is not None and cfg.hf_hub_id == f"timm/{e.timm_name}.ms_in1k", arch
        assert e.downloads[1].url == f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
    # the derived table is this one
    assert IMAGENET_CHECKPOINTS == {a: (e.official_file, e.timm_name) for a, e in zoo.imagenet_bodies().items()}


def test_readme_zoo_blocks_are_generated_from_the_table():
    import model_zoo

    text = model_zoo.README.read_text()
    assert model_zoo.current_block(text, *model_zoo.COCO_ZOO_MARKERS) == model_zoo.coco_zoo_block()
    weights_doc = model_zoo.WEIGHTS_DOC.read_text()
    assert model_zoo.current_block(weights_doc, *model_zoo.IMAGENET_MARKERS) == model_zoo.imagenet_block()
    assert model_zoo.current_block(weights_doc, *model_zoo.EVAL_MARKERS) == model_zoo.eval_block()
    assert model_zoo.main(["--zoo-only", "--check"]) == 0
    for e in zoo.coco_models():  # every model in the README's table, with its one evaluation command in docs/weights.md
        assert f"| `{e.name}` | [{Path(e.config).name}](configs/{e.config}) |" in text
        assert (
            f"python train_net.py --config-file configs/{e.config} --eval-only MODEL.WEIGHTS hrnet_d2://{e.name}"
        ) in weights_doc
