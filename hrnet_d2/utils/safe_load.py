"""Reading the files users are handed (weights, YAML configs) without running code in them.

Weights and configs are what people download from issue threads, model-zoo mirrors and
forks; plain ``pickle.load`` and ``yaml.unsafe_load`` run whatever such a file holds.

* ``.pth`` / ``.pyth``: :func:`torch_load` (``torch.load(weights_only=True)``: tensors and
  plain containers only).
* ``.pkl`` (Detectron2 / Caffe2 model-zoo files): :func:`load_pickle`, an unpickler that
  only rebuilds dicts, lists, tuples, sets, strings, bytes, numbers, booleans, None,
  ``collections.OrderedDict`` and numeric NumPy arrays, dtypes and scalars.  NumPy objects
  are rebuilt by our own code from their raw bytes (never through NumPy's ``__setstate__``
  on untrusted state), and object / structured dtypes are refused.
* YAML: :func:`merge_yaml_file` reads with ``yaml.safe_load`` (also every ``_BASE_``);
  ``HRNET_D2_ALLOW_UNSAFE_YAML=1`` opts back into Detectron2's ``yaml.unsafe_load``.

Anything else stops with :class:`UnsafeFileError` naming the file and the refused global / tag.
"""

import math
import os
import pickle
import re

import numpy as np

from .errors import UserError

__all__ = [
    "ALLOW_UNSAFE_YAML_ENV",
    "PICKLE_ALLOWED_GLOBALS",
    "UnsafeFileError",
    "load_pickle",
    "merge_yaml_file",
    "torch_load",
    "unsafe_yaml_allowed",
]

ALLOW_UNSAFE_YAML_ENV = "HRNET_D2_ALLOW_UNSAFE_YAML"


class UnsafeFileError(UserError):
    """A weights or config file holds something whose loading could run code; refused."""

    def __init__(self, message, path=None, refused=None):
        super().__init__(message)
        self.path = path
        self.refused = refused  # "module.name" of a pickle global, or a YAML tag


def _name(file):
    return getattr(file, "name", None) or "<pickle>"


# ---------------------------------------------------------------------------------------------
# .pkl: restricted unpickler
# ---------------------------------------------------------------------------------------------
_KINDS = "biufcSU"  # bool, int, uint, float, complex, bytes, str: no objects, no raw void/records


class _Refused(Exception):
    """An allowed global called with arguments or state that are not plain numeric data (-> UnsafeFileError)."""


def _plain_dtype(code, byteorder=None):
    """A NumPy dtype from a type code such as ``"f4"``, if it is a plain numeric/string one."""
    if isinstance(code, bytes):
        code = code.decode("latin1")
    if not isinstance(code, str) or not re.fullmatch(r"[<>|=]?[a-zA-Z?]\d{0,3}", code):
        raise _Refused(f"dtype {code!r}")
    try:
        dtype = np.dtype(code)
    except TypeError:
        raise _Refused(f"dtype {code!r}") from None
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise _Refused(f"dtype {code!r}")
    if byteorder in ("<", ">"):
        dtype = dtype.newbyteorder(byteorder)
    elif byteorder not in (None, "|", "="):
        raise _Refused(f"byte order {byteorder!r}")
    return dtype


class _DtypeState:
    """Stands in for ``numpy.dtype(code, align, copy)`` until its pickled state arrives."""

    def __init__(self, code, *_ignored):
        self.code, self.byteorder, self.elsize = code, None, -1
        self._dtype = None

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) not in (8, 9) or any(x is not None for x in state[2:5]):
            raise _Refused("dtype state with fields or sub-arrays")
        self.byteorder, self.elsize = state[1], state[5]
        self._dtype = None

    def resolve(self):
        if self._dtype is None:
            dtype = _plain_dtype(self.code, self.byteorder)
            if dtype.kind in "SU" and isinstance(self.elsize, int) and self.elsize > 0:  # 'S' / 'U' + size in state
                n = self.elsize // (4 if dtype.kind == "U" else 1)
                dtype = _plain_dtype(f"{dtype.kind}{n}", self.byteorder)
            self._dtype = dtype
        return self._dtype


def _as_dtype(obj):
    if isinstance(obj, _DtypeState):
        return obj.resolve()
    return _plain_dtype(obj)


def _raw_bytes(data):
    if isinstance(data, str):  # Python 2 pickles read with encoding="latin1"
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, pickle.PickleBuffer):
        return bytes(data.raw())
    raise _Refused(f"array data of type {type(data).__name__}")


def _array_from_bytes(data, dtype, shape, fortran):
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _Refused(f"array shape {shape!r}")
    raw = _raw_bytes(data)
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise _Refused(f"{len(raw)} bytes of array data for shape {shape} and dtype {dtype}")
    flat = np.frombuffer(raw, dtype=dtype, count=count).copy()  # writable, like numpy's own unpickling
    return flat.reshape(shape, order="F" if fortran else "C")


class _ArrayState:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, ...)`` until its state arrives."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        # (version, shape, dtype, is_fortran, rawdata), or without the version (old pickles)
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _Refused("ndarray state")
        shape, dtype, fortran, data = state
        array = _array_from_bytes(data, _as_dtype(dtype), shape, bool(fortran))
        # numpy's own __setstate__ turns non-native byte order into native
        self.array = array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


class _NdarrayType:
    """``numpy.ndarray`` in a pickle: only usable as the type argument of ``_reconstruct``."""

    def __init__(self, *args, **kwargs):
        raise _Refused("numpy.ndarray called directly")


def _reconstruct(subtype, shape, code):
    if subtype is not _NdarrayType:
        raise _Refused("_reconstruct of a type other than numpy.ndarray")
    return _ArrayState()


def _scalar(dtype, data):
    return _array_from_bytes(data, _as_dtype(dtype), (), False)[()]


def _frombuffer(buf, dtype, shape, order):
    return _array_from_bytes(buf, _as_dtype(dtype), tuple(shape), order == "F")


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode``, which protocol-0/2 pickles use for bytes; only its latin-1 use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()``, which protocol-0/2 pickles use for ``b""``."""
    if args:
        raise _Refused("bytes() with arguments")
    return b""


def _numpy_globals():
    out = {"numpy.ndarray": _NdarrayType, "numpy.dtype": _DtypeState}
    for core in ("numpy.core", "numpy._core"):  # NumPy 1.x and 2.x spellings
        out[f"{core}.multiarray._reconstruct"] = _reconstruct
        out[f"{core}.multiarray.scalar"] = _scalar
        out[f"{core}.numeric._frombuffer"] = _frombuffer
    return out


# "module.name" -> what the unpickler gets instead of importing it.
PICKLE_ALLOWED_GLOBALS = {
    "collections.OrderedDict": __import__("collections").OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "builtins.bytes": _empty_bytes,
    "_codecs.encode": _latin1_encode,
    **_numpy_globals(),
}
_PY2_MODULES = {"__builtin__": "builtins"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source):
        super().__init__(file, encoding="latin1")  # as Detectron2 reads its (Python 2 era) files
        self.source = source

    def find_class(self, module, name):
        key = f"{_PY2_MODULES.get(module, module)}.{name}"
        if key in PICKLE_ALLOWED_GLOBALS:
            return PICKLE_ALLOWED_GLOBALS[key]
        raise _refused_global(self.source, key)

    def persistent_load(self, pid):
        raise _Refused("a persistent id (only torch.save files use them: name the file .pth)")


_PKL_ALLOWS = (
    "A weights .pkl may hold only dicts, lists, tuples, strings, numbers and numeric NumPy arrays; if you trust "
    "the file, re-save its arrays (e.g. as a .pth state dict) in a trusted Python session."
)
_PTH_ALLOWS = (
    "A .pth is read with torch.load(weights_only=True): tensors, numbers, strings and plain containers only; "
    "if you trust the file, re-save only its state dict (torch.save(model.state_dict(), ...)) or use safetensors."
)


def _refused_global(source, name, allows=_PKL_ALLOWS):
    return UnsafeFileError(
        f"{source}: refusing to load {name} from this pickle: unpickling it could run code. {allows}",
        path=source,
        refused=name,
    )


def _replace_placeholders(obj, seen):
    """Swap the NumPy stand-ins for the arrays/dtypes they built, through any container."""
    if isinstance(obj, _ArrayState):
        if obj.array is None:
            raise _Refused("ndarray without state")
        return obj.array
    if isinstance(obj, _DtypeState):
        return obj.resolve()
    if isinstance(obj, (dict, list, tuple, set, frozenset)):
        if id(obj) in seen:
            return seen[id(obj)]
        if isinstance(obj, dict):
            seen[id(obj)] = obj
            items = [(_replace_placeholders(k, seen), _replace_placeholders(v, seen)) for k, v in obj.items()]
            obj.clear()
            obj.update(items)
        elif isinstance(obj, list):
            seen[id(obj)] = obj
            obj[:] = [_replace_placeholders(x, seen) for x in obj]
        else:
            seen[id(obj)] = new = type(obj)(_replace_placeholders(x, seen) for x in obj)
            return new
    if obj is _NdarrayType:
        return np.ndarray
    return obj


def load_pickle(file, source=None):
    """Unpickle ``file`` (a path or a binary file object) allowing only plain data and NumPy arrays.

    Raises :class:`UnsafeFileError` naming the file and the first refused global
    (``module.name``); nothing the file references is imported or called.
    """
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return load_pickle(f, source or os.fspath(file))
    source = source or _name(file)
    try:
        data = _RestrictedUnpickler(file, source).load()
        return _replace_placeholders(data, {})
    except _Refused as e:
        raise UnsafeFileError(
            f"{source}: refusing to load this pickle: {e} is not plain numeric data. {_PKL_ALLOWS}",
            path=source,
            refused=str(e),
        ) from None


# ---------------------------------------------------------------------------------------------
# .pth: torch's weights_only unpickler
# ---------------------------------------------------------------------------------------------
def torch_load(file, source=None):
    """``torch.load(file, map_location="cpu", weights_only=True)``; a refused global raises
    :class:`UnsafeFileError` naming the file and the global (other failures propagate)."""
    import torch

    source = source or (os.fspath(file) if isinstance(file, (str, os.PathLike)) else _name(file))
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        match = re.search(r"GLOBAL ([\w.]+)", str(e))
        if match:  # weights_only refused a class/function reference: code would have run
            raise _refused_global(source, match.group(1), _PTH_ALLOWS) from None
        raise


# ---------------------------------------------------------------------------------------------
# YAML configs
# ---------------------------------------------------------------------------------------------
def unsafe_yaml_allowed() -> bool:
    """True when the user opted into ``yaml.unsafe_load`` (``HRNET_D2_ALLOW_UNSAFE_YAML=1``)."""
    return os.environ.get(ALLOW_UNSAFE_YAML_ENV, "") not in ("", "0")


def merge_yaml_file(cfg, path, allow_unsafe=None):
    """``cfg.merge_from_file(path)`` with ``yaml.safe_load`` for the file and all its ``_BASE_`` files.

    Detectron2's ``CfgNode.merge_from_file`` falls back to ``yaml.unsafe_load`` (logging a
    warning) when a file has python tags; here such a file raises :class:`UnsafeFileError`
    naming the file, line and tag, unless ``allow_unsafe`` (default: :func:`unsafe_yaml_allowed`).
    """
    import yaml

    allow = unsafe_yaml_allowed() if allow_unsafe is None else allow_unsafe
    try:
        cfg.merge_from_file(str(path), allow_unsafe=allow)
    except yaml.constructor.ConstructorError as e:
        if allow:
            raise
        mark = e.problem_mark
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None and mark.name else str(path)
        if mark is not None and mark.name and os.path.abspath(mark.name) != os.path.abspath(str(path)):
            where += f" (a _BASE_ of {path})"
        tag = re.search(r"tag '([^']+)'", str(e.problem))
        tag = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else str(e.problem)
        raise UnsafeFileError(
            f"{where}: YAML tag {tag} is refused: configs are read with yaml.safe_load, which builds only plain "
            f"values (python/* tags can run code). To load a file you trust with yaml.unsafe_load, set "
            f"{ALLOW_UNSAFE_YAML_ENV}=1.",
            path=mark.name if mark is not None and mark.name else str(path),
            refused=tag,
        ) from None
