"""``hrnet_d2://<name>``: published weights by name, for ``MODEL.WEIGHTS`` (Detectron2's PathManager).

``MODEL.WEIGHTS hrnet_d2://coco/faster_rcnn_hrnetv2p_w32_1x`` (or ``hrnet_d2://imagenet/w32``)
downloads the checkpoint named in ``hrnet_d2.checkpoint.zoo.ZOO`` from its official URL, checks its SHA-256
prefix, converts it with ``hrnet_d2.checkpoint.convert.convert_file`` and returns the converted file, cached:

    <cache>/downloads/<URL path>      the downloaded file (kept: converting again needs no download)
    <cache>/<name>.pth                the Detectron2 checkpoint

``<cache>`` is ``$HRNET_D2_CACHE``, else ``hrnet_d2/`` in iopath's cache directory
(``$FVCORE_CACHE``, else ``~/.torch/iopath_cache``).  ``$HRNET_D2_ZOO_BASE_URL`` replaces the
scheme and host of every URL (a mirror that keeps the official paths; the tests use it).

Nothing partial is ever under a final name: the download goes to a temporary name (iopath's
``download``), is checked, then renamed; the conversion is written to a temporary name, then
renamed.  A failed check deletes the download.  Concurrent processes (one per GPU) wait on a
file lock and reuse what the first one made.

``import hrnet_d2`` registers the handler.
"""

import difflib
import hashlib
import logging
import os
import shlex
import urllib.error
from urllib.parse import urlsplit

from detectron2.utils.file_io import PathHandler, PathManager

from ..utils.errors import UserError
from ..utils.file_io import atomic_path
from .zoo import ZOO, ZooEntry

__all__ = [
    "PREFIX",
    "ZooHandler",
    "UnknownZooName",
    "ZooDownloadError",
    "cache_dir",
    "converted_path",
    "download_path",
    "resolve",
]

PREFIX = "hrnet_d2://"
logger = logging.getLogger(__name__)


class UnknownZooName(UserError, ValueError):
    """``hrnet_d2://<name>`` with a name that is not in the table."""


class ZooDownloadError(UserError, RuntimeError):
    """A published checkpoint could not be downloaded, or what came is not the published file."""


def cache_dir() -> str:
    """``$HRNET_D2_CACHE``, else ``<iopath cache>/hrnet_d2``."""
    if os.environ.get("HRNET_D2_CACHE"):
        return os.path.expanduser(os.environ["HRNET_D2_CACHE"])
    from iopath.common.file_io import get_cache_dir

    return os.path.join(get_cache_dir(), "hrnet_d2")


def _mirrored(url: str) -> str:
    base = os.environ.get("HRNET_D2_ZOO_BASE_URL")
    if not base:
        return url
    parts = urlsplit(url)
    return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def download_path(url: str) -> str:
    """Where the file of an official ``url`` is cached (same path whatever the mirror)."""
    return os.path.join(cache_dir(), "downloads", *urlsplit(url).path.lstrip("/").split("/"))


def converted_path(entry: ZooEntry) -> str:
    return os.path.join(cache_dir(), *entry.name.split("/")) + ".pth"


def lookup(name: str) -> ZooEntry:
    if name in ZOO:
        return ZOO[name]
    close = difflib.get_close_matches(name, ZOO, n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise UnknownZooName(
        f"{PREFIX}{name} is not a published hrnet_d2 model.{hint} Known names: "
        + ", ".join(ZOO)
        + ' (README, "COCO model zoo" and "Pretrained weights").'
    )


def _sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _convert_command(entry: ZooEntry, src: str) -> str:
    from ..config import CONFIG_DIR

    target = f"--config-file {shlex.quote(str(CONFIG_DIR / entry.config))}" if entry.config else f"--arch {entry.arch}"
    return f"python -m hrnet_d2.convert {shlex.quote(src)} {shlex.quote(converted_path(entry))} {target}"


def _manual_steps(entry: ZooEntry) -> str:
    d = entry.downloads[0]
    name = os.path.basename(urlsplit(d.url).path)
    check = f" (its sha256 starts with {d.sha256})" if d.sha256 else ""
    others = "".join(f", or {o.url}" for o in entry.downloads[1:])
    return (
        f"If this machine has no network access, download it elsewhere (from the URL below{others}) and convert it by hand:\n"
        f"  curl -L -o {name} {d.url}{check}\n"
        f"  {_convert_command(entry, name)}\n"
        f"then use MODEL.WEIGHTS {converted_path(entry)}; or copy the downloaded file to "
        f"{download_path(d.url)} and use {PREFIX}{entry.name} again."
    )


def _fetch(entry: ZooEntry, url: str, sha256, dst: str) -> None:
    """Download ``url`` to ``dst``: complete and checked, or not at all."""
    from iopath.common.download import download

    folder, final = os.path.split(dst)
    logger.info(f"{PREFIX}{entry.name}: downloading {url} to {dst}")
    with atomic_path(dst, tmp_name=f".{final}.download") as staging:
        got = download(url, folder, filename=os.path.basename(staging))  # via <staging>.tmp, renamed to <staging>
        if sha256:
            digest = _sha256(got)
            if not digest.startswith(sha256):
                raise ZooDownloadError(
                    f"{PREFIX}{entry.name}: the file downloaded from {url} is not the published one: its sha256 "
                    f"starts with {digest[: len(sha256)]}, the published file's with {sha256} (a truncated or "
                    f"corrupted download, or the file changed at its source). Nothing was kept in the cache "
                    f"({dst}); try again."
                )


def _download(entry: ZooEntry):
    """The downloaded, checked file of ``entry`` (from the cache when there) and its ``Download``."""
    failures = []
    for d in entry.downloads:
        dst = download_path(d.url)
        if os.path.isfile(dst):
            if not d.sha256 or _sha256(dst).startswith(d.sha256):
                return dst, d
            logger.warning(f"{dst} does not have the published sha256 prefix {d.sha256}: downloading it again")
            _unlink(dst)
        url = _mirrored(d.url)
        try:
            _fetch(entry, url, d.sha256, dst)
            return dst, d
        except urllib.error.ContentTooShortError as e:
            raise ZooDownloadError(
                f"{PREFIX}{entry.name}: the download from {url} was cut short ({e}). Nothing was kept in the "
                f"cache ({dst}); try again."
            ) from e
        except OSError as e:  # no network, DNS, HTTP error, ...
            failures.append(f"{url} ({type(e).__name__}: {e})")
    raise ZooDownloadError(f"{PREFIX}{entry.name}: cannot download {'; nor '.join(failures)}. " + _manual_steps(entry))


def resolve(name: str) -> str:
    """Local path of the converted checkpoint ``hrnet_d2://<name>`` (downloading and converting once)."""
    from iopath.common.file_io import file_lock

    entry = lookup(name)
    out = converted_path(entry)
    if os.path.isfile(out):
        return out
    with file_lock(out):
        if os.path.isfile(out):  # another process made it while we waited
            return out
        src, download = _download(entry)
        _convert(entry, src, out, checked=bool(download.sha256))  # convert_file writes it atomically
    logger.info(f"{PREFIX}{name}: converted {src} -> {out}")
    return out


def _convert(entry: ZooEntry, src: str, dst: str, checked: bool) -> None:
    from ..config import CONFIG_DIR
    from .convert import convert_file
    from .layouts import ConversionError

    try:
        if entry.config:
            convert_file(src, dst, config_file=str(CONFIG_DIR / entry.config))
        else:
            convert_file(src, dst, arch=entry.arch)
    except ConversionError as e:
        if not checked:  # no published hash: the conversion was the check, and it failed
            _unlink(src)
        raise ConversionError(
            f"{PREFIX}{entry.name}: the downloaded file {src} does not convert"
            + ("" if checked else " (deleted: with no published hash to check, it may be a broken download; try again)")
            + f": {e}"
        ) from e


class ZooHandler(PathHandler):
    """Resolve ``hrnet_d2://coco/<detector>`` and ``hrnet_d2://imagenet/<arch>`` (see the module docstring)."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path, force=False, **kwargs):
        """``force`` is accepted for iopath's API; a converted file in the cache is always reused."""
        self._check_kwargs(kwargs)
        return resolve(path[len(PREFIX) :])

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(ZooHandler())
