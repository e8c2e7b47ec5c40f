"""No file a user is handed runs code: weights (.pkl, .pth, .pyth) and YAML configs.

Every payload below creates a marker file when executed; each refusal test first shows
(negative control) that plain pickle / torch.load(weights_only=False) / yaml.unsafe_load
do run it, then that our loaders refuse it with the file and the global / tag named and
that the marker never appears.  Legitimate files of each kind still load, and model-zoo
.pkl layouts give exactly what Detectron2's own (unrestricted) loader gives.
"""

import collections
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, make_cfg, run_train_net
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d

from hrnet_d2 import get_hrnet_cfg
from hrnet_d2.checkpoint import AtomicCheckpointer
from hrnet_d2.checkpoint.convert import ConversionError, load_state_dict
from hrnet_d2.convert import main as convert_main
from hrnet_d2.engine.resume import capture_rng_state, restore_rng_state
from hrnet_d2.utils.errors import UserError
from hrnet_d2.utils.safe_load import ALLOW_UNSAFE_YAML_ENV, UnsafeFileError, load_pickle


# --------------------------------------------------------------------------------------------
# payloads
# --------------------------------------------------------------------------------------------
class _OpenMarker:
    """Unpickling calls open(marker, "w"): creates the marker (no shell, no eval)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemMarker:
    """Unpickling calls os.system("touch marker")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


PAYLOADS = {"io.open": _OpenMarker, f"{os.system.__module__}.system": _SystemMarker}


def _zoo_layout(extra):
    """Detectron2 model-zoo .pkl layout with one extra entry."""
    return {"model": {"w": np.ones(3, np.float32)}, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True,
            "extra": extra}  # fmt: skip


def _write_evil_pkl(path, marker, payload="io.open", protocol=2):
    with open(path, "wb") as f:
        pickle.dump(_zoo_layout(PAYLOADS[payload](marker)), f, protocol=protocol)


class _Tiny(nn.Module):
    """Names Detectron2's Caffe2 conversion maps to (conv1_w -> backbone.stem.conv1.weight, ...)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = nn.Module()
        self.backbone.stem.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.backbone.stem.conv1.norm = FrozenBatchNorm2d(4)
        self.head = nn.Linear(4, 3)


def _refusal(excinfo, path, refused):
    msg = str(excinfo.value)
    assert str(path) in msg and refused in msg, msg
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# .pkl (restricted unpickler) and .pth / .pyth (torch weights_only)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_pkl_payload_refused_by_checkpointer(tmp_path, payload, protocol):
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pkl"
    _write_evil_pkl(path, marker, payload, protocol)
    with open(path, "rb") as f:  # negative control: Detectron2's own pickle.load runs it
        pickle.load(f, encoding="latin1")
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeFileError) as excinfo:
        AtomicCheckpointer(_Tiny()).load(str(path))
    msg = _refusal(excinfo, path, f"refusing to load {payload}")
    assert isinstance(excinfo.value, UserError) and excinfo.value.refused == payload, msg
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pyth"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_torch_payload_refused_by_checkpointer(tmp_path, suffix, payload):
    marker, path = tmp_path / "MARKER", tmp_path / f"evil{suffix}"
    torch.save({"model": {"w": torch.ones(3)}, "model_state": {}, "extra": PAYLOADS[payload](marker)}, path)
    torch.load(path, weights_only=False)  # negative control: a plain torch.load runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeFileError) as excinfo:
        AtomicCheckpointer(_Tiny()).load(str(path))
    _refusal(excinfo, path, f"refusing to load {payload}")
    assert not marker.exists()


def test_torch_load_is_weights_only_whatever_the_default(tmp_path, monkeypatch):
    """Our checkpointer passes weights_only=True itself (torch's default may be changed by env)."""
    path = tmp_path / "ok.pth"
    torch.save({"model": _Tiny().state_dict()}, path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    AtomicCheckpointer(_Tiny()).load(str(path))
    assert calls and all(k.get("weights_only") is True for k in calls), calls


def test_resume_refuses_pkl_named_by_last_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    _write_evil_pkl(tmp_path / "model_0000009.pkl", marker)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pkl")
    with pytest.raises(UnsafeFileError) as excinfo:
        AtomicCheckpointer(_Tiny(), save_dir=str(tmp_path)).resume_or_load("", resume=True)
    msg = _refusal(excinfo, tmp_path / "model_0000009.pkl", "refusing to load io.open")
    assert f"It is named by {tmp_path / 'last_checkpoint'}" in msg, msg
    assert not marker.exists()


def test_convert_refuses_pkl_payload(tmp_path, capsys):
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pkl"
    _write_evil_pkl(path, marker, f"{os.system.__module__}.system")
    with pytest.raises(ConversionError) as excinfo:
        load_state_dict(str(path))
    _refusal(excinfo, path, f"refusing to load {os.system.__module__}.system")
    assert convert_main([str(path), str(tmp_path / "out.pth")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_convert_reads_plain_pkl_state_dict(tmp_path):
    arrays = {"conv1.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bn1.running_var": np.ones(2)}
    with open(tmp_path / "w.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "someone"}, f)
    sd = load_state_dict(str(tmp_path / "w.pkl"))
    assert sd.keys() == arrays.keys()
    for k, v in arrays.items():
        assert torch.equal(sd[k], torch.from_numpy(v))


@pytest.mark.parametrize(
    "bad, refused",
    [
        (np.array(["a", 1], dtype=object), "dtype 'O"),
        (np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), "fields"),
        (np.zeros(2, dtype="M8[s]"), "dtype 'M8'"),
        (collections.Counter(a=1), "collections.Counter"),
        (np.float32, "numpy.float32"),
    ],
)
def test_non_numeric_pickle_contents_refused(bad, refused):
    raw = pickle.dumps({"model": {"x": bad}}, protocol=2)
    pickle.loads(raw)  # negative control: plain pickle reads it
    with pytest.raises(UnsafeFileError) as excinfo:
        load_pickle(io.BytesIO(raw), "bad.pkl")
    _refusal(excinfo, "bad.pkl", refused)


def _proposal_dataset(tmp_path):
    from detectron2.data import DatasetCatalog

    name = f"security_proposals_{tmp_path.name}"
    image = tmp_path / "img.png"
    image.write_bytes(b"")  # existence is all the record check needs
    records = [{"file_name": str(image), "image_id": i, "height": 8, "width": 8} for i in (1, 2)]
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    return name


def test_proposal_pkl_payload_refused(tmp_path):
    """Precomputed proposals (DATASETS.PROPOSAL_FILES_*) are .pkl files Detectron2 reads with pickle.load."""
    from detectron2.data import DatasetCatalog

    from hrnet_d2.data.checks import load_dataset_dicts

    name = _proposal_dataset(tmp_path)
    boxes = [np.array([[0, 0, 4, 4], [1, 1, 5, 5]], np.float32), np.array([[2, 2, 6, 6]], np.float32)]
    good = {"ids": [1, 2], "boxes": boxes, "objectness_logits": [np.array([0.1, 0.9]), np.array([0.5])], "bbox_mode": 0}
    marker = tmp_path / "MARKER"
    try:
        with open(tmp_path / "good.pkl", "wb") as f:
            pickle.dump(good, f)
        dicts = load_dataset_dicts([name], proposal_files=[str(tmp_path / "good.pkl")])
        assert np.array_equal(dicts[0]["proposal_boxes"], boxes[0][::-1])  # sorted by objectness, as Detectron2 does
        with open(tmp_path / "evil.pkl", "wb") as f:
            pickle.dump({**good, "extra": _OpenMarker(marker)}, f)
        with pytest.raises(UnsafeFileError) as excinfo:
            load_dataset_dicts([name], proposal_files=[str(tmp_path / "evil.pkl")])
        _refusal(excinfo, tmp_path / "evil.pkl", "refusing to load io.open")
        assert not marker.exists()
    finally:
        DatasetCatalog.remove(name)


# --------------------------------------------------------------------------------------------
# legitimate .pkl / .pth files load exactly as before
# --------------------------------------------------------------------------------------------
class _Py2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as Caffe2-era pickles hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj, protocol):
    if protocol == "py2":
        buf = io.BytesIO()
        _Py2StylePickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    if protocol == "numpy2":  # NumPy 2 spells numpy.core as numpy._core
        raw = pickle.dumps(obj, protocol=0).replace(b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n")
        assert b"numpy._core" in raw and b"numpy.core" not in raw
        return raw
    return pickle.dumps(obj, protocol=protocol)


def _same(a, b):
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return (type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
                and a.flags.f_contiguous == b.flags.f_contiguous and b.flags.writeable)  # fmt: skip
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5, "py2", "numpy2"])
def test_restricted_unpickler_matches_pickle(protocol):
    """Everything a model file holds comes back exactly as plain pickle.load(encoding="latin1") gives it."""
    rng = np.random.default_rng(0)
    data = {
        "model": collections.OrderedDict(
            w=rng.standard_normal((3, 4)).astype(np.float32),
            fortran=np.asfortranarray(rng.standard_normal((3, 4))),
            strided=rng.standard_normal((4, 4))[::2],
            big_endian=np.arange(3, dtype=">i4"),
            i8=np.arange(5, dtype=np.int64),
            u1=np.arange(3, dtype=np.uint8),
            f16=np.ones((2, 2), np.float16),
            b=np.array([True, False]),
            c=np.array([1 + 2j]),
            s=np.array([b"ab", b"c"]),
            u=np.array(["xy", "z"]),
            empty=np.zeros((0, 3), np.float32),
            scalar_array=np.array(2.5),
        ),
        "scalars": [np.float32(1.5), np.int64(7), np.bool_(True)],
        "plain": (1, 2.0, None, True, "text", b"raw", b"", bytearray(b"ba"), 1 + 1j, {1, 2}, frozenset([3])),
        "dtype": np.dtype("f8"),
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
    }
    if protocol == "py2":  # Python 2 had no bytearray pickling; its bytes were str
        data["plain"] = tuple(x for x in data["plain"] if not isinstance(x, bytearray))
    raw = _dump(data, protocol)
    expected = pickle.loads(raw, encoding="latin1")
    got = load_pickle(io.BytesIO(raw), "mem.pkl")
    assert _same(expected, got)
    assert not _same(expected, load_pickle(io.BytesIO(_dump({**data, "matching_heuristics": False}, 2))))  # control


def _numpy2_fixture_data():
    """What tests/data/numpy2.1.3_protocol{2,5}.pkl hold: written by
    ``pickle.dump(_numpy2_fixture_data(), f, protocol=p)`` under NumPy 2.1.3 (``numpy._core`` names,
    and ``numpy._core.numeric._frombuffer`` at protocol 5)."""
    rng = np.random.default_rng(0)
    model = collections.OrderedDict(
        w=rng.standard_normal((3, 4)).astype(np.float32),
        fortran=np.asfortranarray(rng.standard_normal((3, 4))),
        big_endian=np.arange(3, dtype=">i4"),
        b=np.array([True, False]),
        s=np.array([b"ab"]),
        u=np.array(["xy"]),
        empty=np.zeros((0, 2)),
    )
    return {"model": model, "scalars": [np.float32(1.5), np.int64(7)], "dtype": np.dtype("f8"), "__author__": "numpy"}


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy2_pickles_load(protocol):
    path = Path(__file__).parent / f"data/numpy2.1.3_protocol{protocol}.pkl"
    assert b"numpy._core" in path.read_bytes() and b"numpy.core" not in path.read_bytes()
    expected, got = _numpy2_fixture_data(), load_pickle(path)
    assert list(got) == list(expected) and list(got["model"]) == list(expected["model"])
    for k, a in expected["model"].items():
        b = got["model"][k]
        # NumPy turns non-native byte order native in _reconstruct (protocol < 5), keeps it in _frombuffer
        dtype = a.dtype if protocol == 5 else a.dtype.newbyteorder("=")
        assert b.dtype == dtype and b.shape == a.shape and np.array_equal(a, b), k
        assert b.flags.f_contiguous == a.flags.f_contiguous and b.flags.writeable, k
    assert _same(expected["scalars"], got["scalars"]) and got["dtype"] == expected["dtype"]


@pytest.mark.parametrize("protocol", [2, 4])
def test_model_zoo_pkl_loads_as_with_detectron2(tmp_path, protocol):
    """{"model": {name: ndarray}, "__author__", "matching_heuristics"} through Detectron2's conversion path."""
    torch.manual_seed(0)
    arrays = {
        k: np.random.default_rng(1).standard_normal(v.shape).astype(np.float32) for k, v in _Tiny().state_dict().items()
    }
    path = tmp_path / "model_final_abc.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f, protocol=protocol
        )
    ours, theirs = _Tiny(), _Tiny()
    AtomicCheckpointer(ours).load(str(path))
    DetectionCheckpointer(theirs).load(str(path))  # Detectron2's plain pickle.load: the reference
    for k, v in ours.state_dict().items():
        assert np.array_equal(v.numpy(), arrays[k]), k
        assert torch.equal(v, theirs.state_dict()[k]), k


def test_caffe2_blobs_pkl_loads_as_with_detectron2(tmp_path):
    rng = np.random.default_rng(2)
    blobs = {
        "conv1_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "res_conv1_bn_s": rng.random(4).astype(np.float32),
        "res_conv1_bn_b": rng.random(4).astype(np.float32),
        "conv1_w_momentum": np.full((4, 3, 3, 3), 7, np.float32),
    }
    path = tmp_path / "R-tiny.pkl"
    with open(path, "wb") as f:
        f.write(_dump({"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"}, "py2"))
    ours, theirs = torch.manual_seed(0) and _Tiny(), torch.manual_seed(0) and _Tiny()  # same init of `head`
    AtomicCheckpointer(ours).load(str(path))
    DetectionCheckpointer(theirs).load(str(path))
    sd = ours.state_dict()
    assert np.array_equal(sd["backbone.stem.conv1.weight"].numpy(), blobs["conv1_w"])
    assert np.array_equal(sd["backbone.stem.conv1.norm.weight"].numpy(), blobs["res_conv1_bn_s"])
    assert np.array_equal(sd["backbone.stem.conv1.norm.bias"].numpy(), blobs["res_conv1_bn_b"])
    for k, v in sd.items():
        assert torch.equal(v, theirs.state_dict()[k]), k


class _RngHolder:
    def __init__(self):
        self.state = None

    def state_dict(self):
        return {"rng": capture_rng_state(), "iteration": 5}

    def load_state_dict(self, state):
        self.state = state


def test_our_pth_checkpoint_with_rng_state_loads(tmp_path):
    model = _Tiny()
    torch.manual_seed(3)
    np.random.seed(3)
    AtomicCheckpointer(model, save_dir=str(tmp_path), trainer=_RngHolder()).save("model_0000004")
    expected = (torch.rand(3), np.random.rand(3))
    holder, loaded = _RngHolder(), _Tiny()
    AtomicCheckpointer(loaded, save_dir=str(tmp_path), trainer=holder).resume_or_load("", resume=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert holder.state["iteration"] == 5
    restore_rng_state(holder.state["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


# --------------------------------------------------------------------------------------------
# YAML configs
# --------------------------------------------------------------------------------------------
def _evil_yaml(tmp_path, marker):
    base = CONFIGS / "quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
    path = tmp_path / "evil.yaml"
    path.write_text(f'_BASE_: "{base}"\nSOLVER:\n  MAX_ITER: !!python/object/apply:os.system ["touch \'{marker}\'"]\n')
    return path


def test_yaml_python_tag_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_UNSAFE_YAML_ENV, raising=False)
    marker = tmp_path / "MARKER"
    path = _evil_yaml(tmp_path, marker)
    with pytest.raises(UnsafeFileError) as excinfo:
        get_hrnet_cfg(path)
    msg = _refusal(excinfo, path, "YAML tag !!python/object/apply:os.system is refused")
    assert f"{path}, line 3" in msg and ALLOW_UNSAFE_YAML_ENV in msg, msg
    assert not marker.exists()

    # the documented opt-in restores Detectron2's behaviour (and runs the payload: the negative control)
    monkeypatch.setenv(ALLOW_UNSAFE_YAML_ENV, "1")
    assert get_hrnet_cfg(path).SOLVER.MAX_ITER == 0
    assert marker.exists()


def test_yaml_python_tag_in_base_refused(tmp_path):
    marker = tmp_path / "MARKER"
    base = _evil_yaml(tmp_path, marker)
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "evil.yaml"\nSOLVER:\n  BASE_LR: 0.01\n')
    with pytest.raises(UnsafeFileError) as excinfo:
        get_hrnet_cfg(child, allow_unsafe_yaml=False)
    msg = _refusal(excinfo, base, "!!python/object/apply:os.system")
    assert f"(a _BASE_ of {child})" in msg, msg
    assert not marker.exists()


def test_allow_unsafe_yaml_argument(tmp_path):
    path = tmp_path / "tagged.yaml"
    path.write_text("SOLVER:\n  MAX_ITER: !!python/object/apply:builtins.max [[3, 7]]\n")
    with pytest.raises(UnsafeFileError):
        get_hrnet_cfg(path, allow_unsafe_yaml=False)
    assert get_hrnet_cfg(path, allow_unsafe_yaml=True).SOLVER.MAX_ITER == 7


SHIPPED_YAML = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_YAML)
def test_shipped_yaml_configs_load_with_safe_yaml(name):
    """Every shipped config merges under yaml.safe_load, into the same config Detectron2's loader builds."""
    safe = get_hrnet_cfg(CONFIGS / name, allow_unsafe_yaml=False)
    reference = make_cfg(name)  # Detectron2's merge_from_file (unsafe fallback allowed)
    reference.MODEL.WEIGHTS, reference.MODEL.DEVICE = safe.MODEL.WEIGHTS, safe.MODEL.DEVICE
    assert safe.dump() == reference.dump()


def test_shipped_yaml_list_is_complete():
    assert len(SHIPPED_YAML) >= 30 and "quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml" in SHIPPED_YAML


# --------------------------------------------------------------------------------------------
# through train_net.py, as a user runs it
# --------------------------------------------------------------------------------------------
QUICKSTART = CONFIGS / "quickstart/mask_rcnn_hrnetv2p_w18_small_shapes.yaml"
TINY = ["DATASETS.TRAIN", '("shapes_tiny_train",)', "DATASETS.TEST", '("shapes_tiny_val",)',
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]  # fmt: skip


def _env(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "HRNET_D2_DATASETS": str(tmp_path / "datasets")}
    return {k: v for k, v in {**os.environ, **env}.items() if k != ALLOW_UNSAFE_YAML_ENV}


def _assert_refused_before_training(result, out_dir, marker, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Starting training" not in result.stdout + result.stderr
    assert not (out_dir / "model_final.pth").exists()
    assert not (out_dir / "metrics.json").exists() or (out_dir / "metrics.json").read_text() == ""  # no iteration
    assert not marker.exists()


@pytest.mark.e2e
def test_train_net_refuses_yaml_python_tag(tmp_path):
    marker = tmp_path / "MARKER"
    path = _evil_yaml(tmp_path, marker)
    out = tmp_path / "out"
    result = run_train_net(["--config-file", path, *TINY, "OUTPUT_DIR", out], env=_env(tmp_path), timeout=300)
    _assert_refused_before_training(result, out, marker, str(path), "!!python/object/apply:os.system")


@pytest.mark.e2e
def test_train_net_allow_unsafe_yaml_flag(tmp_path):
    """--allow-unsafe-yaml restores yaml.unsafe_load: the tag's value is used (here: a missing MODEL.WEIGHTS,
    which stops train_net at once with its own message)."""
    path = tmp_path / "tagged.yaml"
    path.write_text(
        f'_BASE_: "{QUICKSTART}"\nMODEL:\n  WEIGHTS: !!python/object/apply:builtins.str ["/nonexistent/from_tag.pth"]\n'
    )
    args = ["--config-file", path, *TINY, "OUTPUT_DIR", tmp_path / "out"]
    refused = run_train_net(args, env=_env(tmp_path), timeout=300)
    assert refused.returncode == 2 and "YAML tag !!python/object/apply:builtins.str is refused" in refused.stderr
    allowed = run_train_net(["--allow-unsafe-yaml", *args], env=_env(tmp_path), timeout=300)
    assert allowed.returncode == 2 and "MODEL.WEIGHTS = '/nonexistent/from_tag.pth' does not exist" in allowed.stderr, (
        allowed.stderr[-3000:]
    )


@pytest.mark.e2e
def test_train_net_refuses_pkl_weights_and_resume(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pkl"
    _write_evil_pkl(evil, marker, f"{os.system.__module__}.system")
    out = tmp_path / "out"
    result = run_train_net(
        ["--config-file", QUICKSTART, *TINY, "MODEL.WEIGHTS", evil, "OUTPUT_DIR", out], env=_env(tmp_path), timeout=600
    )
    _assert_refused_before_training(result, out, marker, str(evil), f"refusing to load {os.system.__module__}.system")

    # --resume from an OUTPUT_DIR whose last_checkpoint names a .pkl
    _write_evil_pkl(out / "model_0000001.pkl", marker)
    (out / "last_checkpoint").write_text("model_0000001.pkl")
    result = run_train_net(
        ["--config-file", QUICKSTART, "--resume", *TINY, "OUTPUT_DIR", out], env=_env(tmp_path), timeout=600
    )
    _assert_refused_before_training(
        result, out, marker, str(out / "model_0000001.pkl"), "refusing to load io.open", "last_checkpoint"
    )
