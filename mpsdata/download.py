"""Published core files: a manifest of archives, mirrors, and verified, resumable, locked downloads.

Compressing ImageNet takes hours; a core file compressed once can be published and fetched by everyone who asks
for the same settings. A *manifest* lists published core files (``manifest.json``, format below); one ships with
the package and every mirror may serve its own at ``<base URL>/manifest.json``. The datasets' ``download=True``
asks :func:`fetch_published` first and builds from the raw data only when nothing is published for its settings.
Publishing is ``mpsdata pack`` (:func:`pack`) plus any static file server (``docs/hosting.md``).

Manifest (format version 1)::

    {"format": "mpsdata-manifest", "version": 1, "archives": [
        {"name": "mpscifar10-train-3fa2c1d0e9b1-5e2a91c0.h5",  # file name on the server: [A-Za-z0-9._-]
         "dataset": "MPSCIFAR10", "split": "train",
         "settings": {...}, "settings_key": "3fa2c1d0e9b1",   # exactly the dataset's build settings
         "size": 12345678, "sha256": "<64 hex>",              # of the whole file, checked before it is placed
         "content_sha256": "<64 hex>", "num_samples": 50000, "format_version": 1, "mpsdata_version": "0.1.0",
         "urls": ["https://example.org/mps/mpscifar10-train-3fa2c1d0e9b1-5e2a91c0.h5"]}]}

Where a file is fetched from, in order: the ``mirrors=`` argument, the ``MPSDATA_MIRROR`` environment variable
(base URLs separated by spaces or commas), then the entry's own ``urls``; a base URL gets ``/<name>`` appended.
``http://``, ``https://`` and ``file://`` bases work, and so does a plain folder path.

Manifests and servers are untrusted: nothing is unpickled, names cannot leave the target folder, sizes are capped
and checked against what the server announces and sends (reading stops at the announced size), the file's size
and sha256 are checked, and its HDF5 header is validated (no links out of the file, no dataset larger than the
file, a sane image size) before its reader opens it (:class:`mpsdata._archive.CoreFile`, or
:class:`mpsdata._shared_file.SharedCoreFile` for a shared-codec file), all before the atomic rename.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ._archive import MAX_FORMAT_VERSION, _short, check_header, open_core_file, settings_key, temporary_path
from ._errors import MPSDataError
from ._version import __version__

try:  # POSIX; Windows falls back to msvcrt in _lock
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MIRROR_ENV",
    "fetch",
    "fetch_published",
    "find_published",
    "list_published",
    "load_manifest",
    "local_name",
    "pack",
    "register_commands",
]

MIRROR_ENV = "MPSDATA_MIRROR"
MANIFEST_FORMAT = "mpsdata-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_TIMEOUT = 30.0  # seconds per connection attempt and per read
DEFAULT_RETRIES = 3  # further attempts per URL after a transient failure
MANIFEST_TIMEOUT = 10.0  # a mirror's manifest is small: do not let a dead mirror stall a dataset for long
MAX_ARCHIVE_BYTES = 1 << 40  # 1 TiB: far above ImageNet at any ratio, far below what would fill a disk by surprise
MAX_MANIFEST_BYTES = 16 << 20
MAX_URLS = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CHUNK = 1 << 20  # bytes asked of the socket per read
_PROGRESS_RESET = 1 << 20  # an attempt that gained this much before failing does not use up a retry
_MAX_BACKOFF = 30.0
_RETRY_STATUS = frozenset({408, 425, 429})  # plus every 5xx


class _Transient(Exception):
    """A failure worth retrying on the same URL (timeouts, cuts, 5xx)."""


class _Permanent(Exception):
    """A failure that retrying the same URL will not fix (404, wrong size): go to the next mirror."""


# ---------------------------------------------------------------------------------------------------
# Manifest entries
def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and ".." not in name


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists), the form manifests hold."""
    return json.loads(json.dumps(settings, sort_keys=True))


def _check_url(url: Any, allow_file: bool, where: str) -> str:
    if not isinstance(url, str) or len(url) > 2048:
        raise MPSDataError(f"{where}: a URL must be a string of at most 2048 characters, got {_short(url)}")
    parts = urllib.parse.urlsplit(url)
    schemes = ("http", "https", "file") if allow_file else ("http", "https")
    if parts.scheme not in schemes or (parts.scheme != "file" and not parts.netloc):
        raise MPSDataError(f"{where}: URLs must be {', '.join(s + '://' for s in schemes)} URLs, got {_short(url)}")
    return url


def _validate_entry(entry: Any, *, allow_file_urls: bool = True, where: str = "manifest entry") -> dict[str, Any]:
    """A checked copy of one manifest entry; every rule is enforced before anything touches the network."""
    if not isinstance(entry, dict):
        raise MPSDataError(f"{where} must be a JSON object, got {type(entry).__name__}")
    name = entry.get("name")
    if not _valid_name(name):
        raise MPSDataError(
            f"{where}: name must be a plain file name of at most 200 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit and without '..', got {_short(name)}"
        )
    where = f"{where} {name!r}"
    size = entry.get("size")
    if type(size) is not int or not 0 < size <= MAX_ARCHIVE_BYTES:
        raise MPSDataError(f"{where}: size must be an int in [1, {MAX_ARCHIVE_BYTES}] bytes, got {_short(size)}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
        raise MPSDataError(f"{where}: sha256 must be 64 hexadecimal digits, got {_short(sha)}")
    settings = entry.get("settings")
    if not isinstance(settings, dict):
        raise MPSDataError(f"{where}: settings must be a JSON object, got {type(settings).__name__}")
    key = settings_key(settings)
    if entry.get("settings_key", key) != key:
        raise MPSDataError(f"{where}: settings_key {_short(entry['settings_key'])} does not match its settings ({key})")
    for field in ("dataset", "split"):
        if field in entry and field in settings and entry[field] != settings[field]:
            raise MPSDataError(
                f"{where}: {field} {_short(entry[field])} differs from the settings' {_short(settings[field])}"
            )
    version = entry.get("format_version", 1)
    if type(version) is not int or version < 1:
        raise MPSDataError(f"{where}: format_version must be a positive int, got {_short(version)}")
    urls = entry.get("urls", [])
    if not isinstance(urls, list) or len(urls) > MAX_URLS:
        raise MPSDataError(f"{where}: urls must be a list of at most {MAX_URLS} URLs, got {_short(urls)}")
    urls = [_check_url(url, allow_file_urls, where) for url in urls]
    # Settings as JSON holds them: a hand-written entry's tuples compare equal to a manifest's lists.
    return {**entry, "sha256": sha.lower(), "settings": _canonical(settings), "settings_key": key, "urls": urls}


def local_name(entry: dict[str, Any]) -> str:
    """File name a dataset looks for: ``<split>-<settings key>.h5`` (the entry's name when that is not valid)."""
    split = entry["settings"].get("split")
    name = f"{split}-{settings_key(entry['settings'])}.h5"
    return name if isinstance(split, str) and _valid_name(name) else entry["name"]


# ---------------------------------------------------------------------------------------------------
# Manifests
def _parse_manifest(data: bytes, source: str, allow_file_urls: bool) -> list[dict[str, Any]]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise MPSDataError(f"manifest {source} is not valid JSON ({_short(str(error))})") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise MPSDataError(f'manifest {source} is not an mpsdata manifest (needs "format": "{MANIFEST_FORMAT}")')
    version = document.get("version")
    if type(version) is not int or version < 1:
        raise MPSDataError(f"manifest {source}: version must be a positive int, got {_short(version)}")
    if version > MANIFEST_VERSION:
        raise MPSDataError(
            f"manifest {source} has version {version}, newer than this mpsdata reads ({MANIFEST_VERSION}); "
            "upgrade mpsdata (`pip install -U mpsdata`)"
        )
    archives = document.get("archives")
    if not isinstance(archives, list):
        raise MPSDataError(f"manifest {source}: archives must be a list, got {type(archives).__name__}")
    entries = []
    names: set[str] = set()
    for i, raw in enumerate(archives):
        entry = _validate_entry(raw, allow_file_urls=allow_file_urls, where=f"manifest {source}, archive {i}")
        if entry["name"] in names:
            raise MPSDataError(f"manifest {source} lists {entry['name']!r} twice")
        names.add(entry["name"])
        entries.append(entry)
    return entries


def _file_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MPSDataError(f"file URLs must name a local path (file:///path), got {_short(url)}")
    return Path(urllib.request.url2pathname(parts.path))


def _read_limited(url: str, timeout: float, limit: int) -> bytes:
    """The body of a small remote file, refusing more than ``limit`` bytes whatever the server claims."""
    request = urllib.request.Request(url, headers={"User-Agent": f"mpsdata/{__version__}"})
    with _opener().open(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise MPSDataError(f"{url} announces {int(length)} bytes, more than a manifest may hold ({limit})")
        data = response.read(limit + 1)
    if len(data) > limit:
        raise MPSDataError(f"{url} sends more than a manifest may hold ({limit} bytes)")
    return data


def load_manifest(
    path_or_url: str | os.PathLike | None = None, *, timeout: float = MANIFEST_TIMEOUT
) -> list[dict[str, Any]]:
    """Read and validate a manifest of published core files.

    Args:
        path_or_url: A ``manifest.json`` path, or an ``http(s)://`` / ``file://`` URL; ``None`` reads the manifest
            shipped with mpsdata.
        timeout: Seconds to wait for a remote manifest.

    Returns:
        The validated entries (each a dict, see the module docstring).

    Raises:
        MPSDataError: The manifest is unreadable, too large, of a newer version, or an entry breaks a rule.
            Entries of a remote manifest may not point at ``file://`` URLs.

    Example:
        >>> entries = load_manifest()  # the shipped registry
        >>> all(len(e["sha256"]) == 64 for e in entries)
        True
    """
    try:
        return _load_manifest(path_or_url, timeout)
    except (OSError, http.client.HTTPException) as error:  # unreachable, missing, a folder, an HTTP error
        where = "shipped with mpsdata" if path_or_url is None else _short(os.fspath(path_or_url))
        raise MPSDataError(f"manifest {where} could not be read: {_describe(error)}") from None


def _load_manifest(path_or_url: str | os.PathLike | None, timeout: float) -> list[dict[str, Any]]:
    """:func:`load_manifest` with the I/O errors as they are (a mirror without a manifest is skipped on them)."""
    if path_or_url is None:
        data = resources.files("mpsdata").joinpath(MANIFEST_NAME).read_bytes()
        return _parse_manifest(data, "shipped with mpsdata", allow_file_urls=False)
    text = os.fspath(path_or_url)
    remote = "://" in text and not text.startswith("file:")
    if remote:
        _check_url(text, allow_file=False, where="manifest URL")
        return _parse_manifest(_read_limited(text, timeout, MAX_MANIFEST_BYTES), text, allow_file_urls=False)
    path = _file_path(text) if text.startswith("file:") else Path(text)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise MPSDataError(f"manifest {path} is larger than a manifest may be ({MAX_MANIFEST_BYTES} bytes)")
    return _parse_manifest(path.read_bytes(), str(path), allow_file_urls=True)


def _mirrors(mirrors: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[str]:
    """Base URLs in the order they are tried: the argument, then ``MPSDATA_MIRROR``."""
    given: list[str] = []
    if isinstance(mirrors, (str, os.PathLike)):
        given.append(os.fspath(mirrors))
    elif mirrors is not None:
        given.extend(os.fspath(m) for m in mirrors)
    given.extend(v for v in re.split(r"[\s,]+", os.environ.get(MIRROR_ENV, "")) if v)
    return list(dict.fromkeys(_base_url(base) for base in given))


def _base_url(base: str) -> str:
    """A mirror's base URL without its trailing slash; a plain path becomes a file:// URL."""
    if "://" not in base:  # a folder on this machine
        base = Path(base).expanduser().resolve().as_uri()
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise ValueError(f"a mirror must be an http://, https:// or file:// URL or a folder, got {base!r}")
    return base.rstrip("/")


def list_published(
    manifest: str | os.PathLike | Sequence[dict[str, Any]] | None = None,
    *,
    mirrors: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    timeout: float = MANIFEST_TIMEOUT,
) -> list[dict[str, Any]]:
    """Every published entry: the mirrors' manifests first (in mirror order), then the shipped one.

    Args:
        manifest: Read only this manifest instead (a path, a URL or a list of entries).
        mirrors: Base URLs whose ``manifest.json`` is read, before those of ``MPSDATA_MIRROR``.
        timeout: Seconds to wait for each mirror's manifest.

    Returns:
        Validated entries; a name listed by an earlier manifest hides later ones.

    A mirror without a manifest (HTTP 404, no file) is a plain mirror and is skipped silently; one that cannot be
    read or holds an invalid manifest is skipped with a ``RuntimeWarning``.
    """
    if manifest is not None:
        if isinstance(manifest, (str, os.PathLike)):
            return load_manifest(manifest, timeout=timeout)
        return [_validate_entry(e) for e in manifest]
    found: list[dict[str, Any]] = []
    for base in _mirrors(mirrors):
        url = f"{base}/{MANIFEST_NAME}"
        try:
            found.extend(_load_manifest(url, timeout))
        except FileNotFoundError:
            continue
        except urllib.error.HTTPError as error:
            error.close()
            if error.code != 404:
                warnings.warn(f"mirror manifest {url} could not be read (HTTP {error.code})", RuntimeWarning, 2)
        except (MPSDataError, OSError, http.client.HTTPException) as error:
            warnings.warn(f"mirror manifest {url} skipped: {error}", RuntimeWarning, 2)
    found.extend(load_manifest())
    unique: dict[str, dict[str, Any]] = {}
    for entry in found:
        unique.setdefault(entry["name"], entry)
    return list(unique.values())


def find_published(
    settings: dict[str, Any],
    manifest: str | os.PathLike | Sequence[dict[str, Any]] | None = None,
    *,
    mirrors: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    timeout: float = MANIFEST_TIMEOUT,
) -> dict[str, Any] | None:
    """The published entry built with exactly these settings, or ``None``.

    Args:
        settings: A dataset's build settings (``MPSVisionDataset._settings``), compared as JSON.
        manifest, mirrors, timeout: Where to look, as in :func:`list_published`.

    Returns:
        The first matching entry this mpsdata can read (its ``format_version`` is not newer), else ``None``.

    Example:
        >>> find_published({"dataset": "MPSNothing", "split": "train"}, manifest=[]) is None
        True
    """
    wanted = _canonical(settings)
    for entry in list_published(manifest, mirrors=mirrors, timeout=timeout):
        if entry["settings"] == wanted and _readable(entry):
            return entry
    return None


def _readable(entry: dict[str, Any]) -> bool:
    """Whether this mpsdata reads the entry's file: MPS cores up to ``MAX_FORMAT_VERSION``, or shared-codec files
    (settings with ``codec="shared"``) of the shared format's version."""
    version = entry.get("format_version", 1)
    if entry["settings"].get("codec") == "shared":
        from ._shared_file import SHARED_FORMAT_VERSION

        return version == SHARED_FORMAT_VERSION
    return version <= MAX_FORMAT_VERSION


# ---------------------------------------------------------------------------------------------------
# Downloading
class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects between http and https only (never to ftp:// or file://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {_short(newurl)} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_RedirectHandler)


class _FileResponse:
    """A local file read like an HTTP response that honours Range."""

    def __init__(self, path: Path, offset: int) -> None:
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _Permanent(f"no such file {path}") from None
        total = os.fstat(self._file.fileno()).st_size
        offset = min(offset, total)
        self._file.seek(offset)
        self.status = 206 if offset else 200
        self.headers = {"Content-Length": str(total - offset)}
        if offset:
            self.headers["Content-Range"] = f"bytes {offset}-{total - 1}/{total}"

    def read1(self, n: int) -> bytes:
        return self._file.read1(n)

    def close(self) -> None:
        self._file.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, (TimeoutError, OSError)) and "timed out" in str(error):
        return "timed out"
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return _describe(error.reason) if isinstance(error.reason, BaseException) else str(error.reason)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _sha256_file(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while remaining is None or remaining > 0:
            block = f.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


class _Download:
    """One entry fetched into ``final``: mirrors in order, retries with backoff, resume, verification."""

    def __init__(self, entry, final: Path, urls, timeout, retries, progress, backoff) -> None:
        self.entry, self.final, self.urls = entry, final, urls
        self.size, self.sha = entry["size"], entry["sha256"]
        self.timeout, self.retries, self.progress, self.backoff = timeout, retries, progress, backoff
        # Named by content so that a partial file only ever resumes the same bytes.
        self.part = final.with_name(f".{final.name}.{self.sha[:16]}.part")
        self.tried: list[str] = []
        self._digest: Any = None
        self._hashed = 0

    def run(self) -> Path:
        if self._have() > self.size:
            self._discard()
        for url in self.urls:
            # Bytes already in the partial file came from an earlier run or another mirror: if the whole fails
            # its checksum they may be the bad part, so this URL gets one more try from the first byte.
            stale, verified = self._have() > 0, False
            while not verified and self._from(url):
                digest = self._final_digest()
                verified = digest == self.sha
                if not verified:
                    self._discard()
                    again = "; the partial file held earlier bytes: restarting from the first byte" if stale else ""
                    self.tried.append(
                        f"{url}: sha256 {digest[:16]}... differs from the manifest's {self.sha[:16]}...{again}"
                    )
                    if not stale:
                        break
                    stale = False
            if not verified:
                continue
            try:
                _check_core(self.part, self.entry["settings"])
            except MPSDataError as error:
                self._discard()  # the published bytes themselves are wrong: other mirrors hold the same bytes
                raise MPSDataError(
                    f"the published file {self.entry['name']} matches its checksum but is not a usable core file "
                    f"for its settings, so nothing was kept: {error}"
                ) from None
            os.replace(self.part, self.final)
            return self.final
        raise MPSDataError(self._failure_message())

    # -- one URL ----------------------------------------------------------------------------------------
    def _from(self, url: str) -> bool:
        """Try one URL until the partial file is complete (True) or the URL is given up (False)."""
        failures = attempts = 0
        while True:
            attempts += 1
            before = self._have()
            try:
                self._attempt(url)
                return True
            except _Permanent as error:
                self.tried.append(f"{url}: {error}")
                return False
            except _Transient as error:
                if self._have() - before < _PROGRESS_RESET:
                    failures += 1
                if failures > self.retries:
                    self.tried.append(f"{url}: {error} ({attempts} attempt{'s' * (attempts > 1)})")
                    return False
                time.sleep(min(_MAX_BACKOFF, self.backoff * 2 ** max(failures - 1, 0)))

    def _attempt(self, url: str) -> None:
        offset = self._have()
        if offset == self.size:
            return
        try:
            response = self._open(url, offset)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416:  # our partial file does not fit the server's file: start again
                self._discard()
                raise _Transient("HTTP 416 for the partial download; restarting from the first byte") from None
            message = f"HTTP {error.code} {error.reason}"
            if error.code in _RETRY_STATUS or error.code >= 500:
                raise _Transient(message) from None
            raise _Permanent(message) from None
        except (OSError, http.client.HTTPException) as error:
            raise _Transient(_describe(error)) from None
        try:
            start = self._start(response, offset)
            self._receive(response, start)
        finally:
            response.close()

    def _open(self, url: str, offset: int):
        if url.startswith("file:"):
            try:
                return _FileResponse(_file_path(url), offset)
            except MPSDataError as error:
                raise _Permanent(str(error)) from None
        headers = {"User-Agent": f"mpsdata/{__version__}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        return _opener().open(urllib.request.Request(url, headers=headers), timeout=self.timeout)

    def _start(self, response, offset: int) -> int:
        """Byte where the response body starts, after checking what the server announces."""
        status = response.status
        if status == 206:
            text = (response.headers.get("Content-Range") or "").strip()
            match = _CONTENT_RANGE.fullmatch(text)
            if match is None or int(match[1]) != offset:
                self._discard()
                raise _Transient(f"the server answered range {_short(text)} to a request from byte {offset}")
            if match[3] != "*" and int(match[3]) != self.size:
                raise _Permanent(f"the server's file has {int(match[3])} bytes, the manifest says {self.size}")
            start = offset
        elif status == 200:
            start = 0  # the whole file: Range was not asked for, or the server ignores it
        else:
            raise _Permanent(f"unexpected HTTP status {status}")
        length = response.headers.get("Content-Length")
        if length is not None:
            if not length.strip().isdigit():
                raise _Permanent(f"the server sent Content-Length {_short(length)}")
            if int(length) != self.size - start:
                raise _Permanent(
                    f"the server announces {int(length)} bytes from byte {start}, but the manifest's file has "
                    f"{self.size}: the mirror holds another file"
                )
        return start

    def _receive(self, response, start: int) -> None:
        from tqdm.auto import tqdm

        if start == 0 or self._digest is None or self._hashed != start:
            self._digest = hashlib.sha256()
            self._hashed = 0
            if start:  # resume: the digest must cover the bytes already on disk
                with open(self.part, "rb") as f:
                    while block := f.read(min(_CHUNK, start - self._hashed)):
                        self._digest.update(block)
                        self._hashed += len(block)
        remaining = self.size - start
        bar = tqdm(
            total=self.size,
            initial=start,
            desc=self.entry["name"],
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not self.progress or None,
        )
        with bar, open(self.part, "ab" if start else "wb") as out:
            while remaining > 0:
                try:
                    data = response.read1(min(_CHUNK, remaining))  # never more than announced
                except (OSError, http.client.HTTPException) as error:
                    raise _Transient(f"{_describe(error)} after {self.size - remaining} of {self.size} bytes") from None
                if not data:
                    raise _Transient(f"connection closed after {self.size - remaining} of {self.size} bytes")
                out.write(data)
                self._digest.update(data)
                self._hashed += len(data)
                remaining -= len(data)
                bar.update(len(data))
            out.flush()
            os.fsync(out.fileno())

    # -- the partial file -----------------------------------------------------------------------------
    def _have(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self._digest = None
        self._hashed = 0

    def _final_digest(self) -> str:
        if self._digest is not None and self._hashed == self.size == self._have():
            return self._digest.hexdigest()
        return _sha256_file(self.part)

    def _failure_message(self) -> str:
        entry = self.entry
        what = f"{entry['settings'].get('dataset', 'core file')} {entry['settings'].get('split', '')}".strip()
        lines = "\n".join(f"  {line}" for line in self.tried)
        kept = (
            f"\nThe {self._have()} bytes received so far are kept in {self.part} and the next try resumes there."
            if self._have()
            else ""
        )
        return (
            f"could not download the published core file {entry['name']} ({entry['size']} bytes, {what}); "
            f"tried:\n{lines}{kept}\n"
            f"Check the network, or set {MIRROR_ENV} (or pass mirrors=) to a server or folder holding "
            f"{entry['name']}. To build it locally instead, put the raw dataset under the dataset root and "
            "construct the dataset with download=False (which never looks for published files), "
            "or run `mpsdata build`."
        )


@contextlib.contextmanager
def _lock(path: Path, progress: bool) -> Iterator[None]:
    """Exclusive lock on ``path`` across processes and threads; the lock file is removed on release."""
    if fcntl is None:  # pragma: no cover - Windows
        import msvcrt

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                break
            except OSError:
                time.sleep(0.1)
        try:
            yield
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress and not told:
                    print(f"waiting for another download of {path.name[1:-5]} to finish", file=sys.stderr)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The previous holder unlinks the file on release: only a lock on the file still at `path` counts.
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def _entry_urls(entry: dict[str, Any], mirrors) -> list[str]:
    urls = [f"{base}/{entry['name']}" for base in _mirrors(mirrors)]
    return list(dict.fromkeys([*urls, *entry["urls"]]))


def fetch(
    entry: dict[str, Any],
    dest_dir: str | os.PathLike,
    mirrors: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    progress: bool = True,
    *,
    filename: str | None = None,
    backoff: float = 1.0,
) -> Path:
    """Download a published core file, verify it and place it atomically (or reuse the copy already there).

    URLs are tried in order: each base of ``mirrors``, of ``MPSDATA_MIRROR``, then the entry's ``urls``. Each URL
    gets ``retries`` more attempts after transient failures (timeouts, cut connections, 5xx), waiting
    ``backoff * 2**k`` seconds; a cut download resumes with an HTTP Range request (from scratch when the server
    ignores Range); 4xx answers and size mismatches move on to the next URL. The partial file
    (``.<filename>.<sha>.part``) is checked for size and sha256, and its HDF5 header and settings are validated,
    before it is renamed into place. A lock file serialises processes fetching the same file into the same folder.

    Args:
        entry: A manifest entry (validated again here).
        dest_dir: Folder of the result (created if missing).
        mirrors: Base URLs (or folders) tried first.
        timeout: Seconds allowed to connect and for each read.
        retries: Further attempts per URL after a transient failure.
        progress: Show a tqdm progress bar.
        filename: Name of the result; default ``<split>-<settings key>.h5``, the name datasets look for.
        backoff: First wait between attempts, in seconds.

    Returns:
        The path of the verified core file.

    Raises:
        MPSDataError: The entry breaks a manifest rule (before any network access), every URL failed (the message
            lists each URL with its error and how to build locally), or the published file is not a valid core
            file for its settings. A checksum mismatch keeps nothing; a cut download keeps its partial file.
    """
    if not isinstance(entry, dict):
        raise TypeError(f"entry must be a manifest entry (dict), got {type(entry).__name__}")
    entry = _validate_entry(entry)
    if type(retries) is not int or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    name = local_name(entry) if filename is None else filename
    if not _valid_name(name):
        raise ValueError(f"filename must be a plain file name (letters, digits, '.', '_', '-'), got {_short(name)}")
    urls = _entry_urls(entry, mirrors)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / name
    with _lock(dest / f".{name}.lock", progress):
        if final.exists():
            return _reuse(final, entry)
        if not urls:
            raise MPSDataError(
                f"no URL to download {entry['name']} from: its manifest entry lists none and no mirror is set; "
                f"pass mirrors= or set {MIRROR_ENV} to the base URL of a server holding it"
            )
        return _Download(entry, final, urls, timeout, retries, progress, backoff).run()


def _reuse(path: Path, entry: dict[str, Any]) -> Path:
    """An existing file is kept when it is the published one or a valid core file of the same settings."""
    if path.stat().st_size == entry["size"] and _sha256_file(path) == entry["sha256"]:
        return path
    try:
        _check_core(path, entry["settings"])
    except MPSDataError as error:
        raise MPSDataError(
            f"{path} exists but is neither the published file nor a valid core file for its settings ({error}); "
            "delete it to download it again"
        ) from None
    return path


def fetch_published(
    settings: dict[str, Any],
    path: str | os.PathLike,
    mirrors: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    *,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> bool:
    """Put the published core file for ``settings`` at ``path`` if one is published (the datasets' download).

    Args:
        settings: The dataset's build settings.
        path: Where the dataset expects its core file.
        mirrors, progress, timeout, retries: As in :func:`fetch`.

    Returns:
        True when the file was fetched (or was already there), False when nothing is published for these settings.

    Raises:
        MPSDataError: Something is published but could not be downloaded (see :func:`fetch`).
    """
    entry = find_published(settings, mirrors=mirrors)
    if entry is None:
        return False
    path = Path(path)
    fetch(entry, path.parent, mirrors, timeout, retries, progress, filename=path.name)
    return True


# ---------------------------------------------------------------------------------------------------
# Validating a downloaded file before CoreFile reads it
def _check_core(path: Path, settings: dict[str, Any] | None) -> Any:
    """Open an untrusted core file: its HDF5 header first (bounded sizes, no links out), then its reader
    (``CoreFile``, or ``SharedCoreFile`` for a shared-codec file)."""
    check_header(path, settings)
    try:
        return open_core_file(path, expected_settings=settings)
    except (ValueError, TypeError, IndexError, AttributeError) as error:  # malformed metadata CoreFile trusts
        raise MPSDataError(f"{path} has malformed metadata ({type(error).__name__}: {_short(str(error))})") from None


# ---------------------------------------------------------------------------------------------------
# Publishing
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "cores"


def pack(
    files: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    base_url: str | None = None,
    *,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """Copy core files under publishable names into ``out_dir`` and add them to ``out_dir/manifest.json``.

    Names are ``<dataset>-<split>-<settings key>-<first 8 hex of sha256>.h5``: a rebuilt file gets a new name,
    so caches and CDNs never serve stale bytes under an old name. An entry with the same settings or name
    already in the manifest is replaced (its old file is left in ``out_dir``). Serve ``out_dir`` from any static
    file server; users point ``MPSDATA_MIRROR`` (or ``mirrors=``) at its URL, or the entries are copied into the
    manifest shipped with mpsdata.

    Args:
        files: Core files written by mpsdata (datasets or ``mpsdata build``).
        out_dir: Folder to publish (created if missing).
        base_url: URL at which ``out_dir`` will be served; written into each entry's ``urls``. Without it entries
            list no URL and are fetched through mirrors only.
        verify: Check every checksum and decode every image before publishing.

    Returns:
        The new manifest entries, in the order of ``files``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = _base_url(base_url) if base_url is not None else None
    manifest_path = out / MANIFEST_NAME
    existing = load_manifest(manifest_path) if manifest_path.exists() else []
    new: list[dict[str, Any]] = []
    for file in files:
        path = Path(file)
        core = open_core_file(path)
        if verify:
            core.verify()
        sha, size = _sha256_file(path), path.stat().st_size
        settings = _canonical(core.settings)
        key = settings_key(settings)
        dataset, split = str(settings.get("dataset", "cores")), str(settings.get("split", "all"))
        name = f"{_slug(dataset)}-{_slug(split)}-{key}-{sha[:8]}.h5"
        target = out / name
        if not (target.exists() and target.stat().st_size == size and _sha256_file(target) == sha):
            tmp = temporary_path(out / name)
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        entry = {
            "name": name,
            "settings": settings,
            "settings_key": key,
            "size": size,
            "sha256": sha,
            "content_sha256": core.content_sha256,
            "num_samples": core.num_samples,
            "format_version": _file_format_version(path),
            "mpsdata_version": __version__,
            "urls": [f"{base}/{name}"] if base else [],
        }
        for field in ("dataset", "split"):
            if field in settings:
                entry[field] = settings[field]
        new = [e for e in new if e["settings_key"] != key] + [_validate_entry(entry)]
    replaced = {e["name"] for e in new} | {e["settings_key"] for e in new}
    kept = [e for e in existing if e["name"] not in replaced and e["settings_key"] not in replaced]
    document = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "archives": sorted(kept + new, key=lambda e: e["name"]),
    }
    tmp = temporary_path(out / MANIFEST_NAME)
    try:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, manifest_path)
    finally:
        tmp.unlink(missing_ok=True)
    return new


def _file_format_version(path: Path) -> int:
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        return int(f.attrs["format_version"])


# ---------------------------------------------------------------------------------------------------
# Command line
def register_commands(subparsers: Any) -> None:
    """Add ``pack`` and ``download`` to the ``mpsdata`` command's subparsers (handlers return an exit status)."""
    pack_cmd = subparsers.add_parser(
        "pack", help="copy core files under publishable names and write the manifest to host them"
    )
    pack_cmd.add_argument("files", nargs="+", type=Path, metavar="FILE", help="core files to publish")
    pack_cmd.add_argument("--out", required=True, type=Path, help="folder to serve (gets the files + manifest.json)")
    pack_cmd.add_argument("--base-url", help="URL at which --out will be served, written into every entry")
    pack_cmd.add_argument("--no-verify", action="store_true", help="skip checking and decoding every image first")
    pack_cmd.set_defaults(handler=_pack_command)

    download = subparsers.add_parser("download", help="fetch a published core file (`--list` shows them)")
    download.add_argument("name", nargs="?", help="archive name, a unique prefix of it, or its settings key")
    where = download.add_mutually_exclusive_group()
    where.add_argument("--root", type=Path, help="dataset root: the file goes where the dataset class looks for it")
    where.add_argument("--archive-dir", type=Path, help="folder to put the core file in")
    download.add_argument(
        "--mirror", action="append", metavar="URL", help=f"base URL or folder tried first (repeatable, {MIRROR_ENV})"
    )
    download.add_argument("--manifest", help="read only this manifest (path or URL)")
    download.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per connection and read")
    download.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="further attempts per URL")
    download.add_argument("--list", action="store_true", help="list the published core files and exit")
    download.set_defaults(handler=_download_command)


def _pack_command(args: argparse.Namespace) -> int:
    entries = pack(args.files, args.out, args.base_url, verify=not args.no_verify)
    for entry in entries:
        print(f"{entry['name']}  {entry['size']} bytes  sha256 {entry['sha256']}")
    print(f"wrote {args.out / MANIFEST_NAME}; serve {args.out} and set {MIRROR_ENV} to its URL (docs/hosting.md)")
    return 0


def _download_command(args: argparse.Namespace) -> int:
    entries = list_published(args.manifest, mirrors=args.mirror)
    if args.list:
        for e in entries:
            shown = ("codec", "ratio", "bytes_ratio", "bond_dims", "max_bond", "tol")
            budget = {k: v for k, v in e["settings"].items() if k in shown and v}
            print(f"{e['name']}  {e['settings'].get('dataset', '?')} {e['settings'].get('split', '?')}  "
                  f"{e['size'] / 2**20:.1f} MiB  {budget}")  # fmt: skip
        if not entries:
            print(f"no published core files (shipped manifest, {MIRROR_ENV} and --mirror manifests)")
        return 0
    if args.name is None:
        raise ValueError("give the NAME of a published core file (see `mpsdata download --list`)")
    if args.root is None and args.archive_dir is None:
        raise ValueError("give --root (the dataset root) or --archive-dir (a folder) to download into")
    entry = _resolve(entries, args.name)
    dest = args.archive_dir if args.archive_dir is not None else _dataset_archive_dir(entry["settings"], args.root)
    path = fetch(entry, dest, args.mirror, args.timeout, args.retries)
    print(f"saved {path}")
    return 0


def _resolve(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    exact = [e for e in entries if name in (e["name"], e["settings_key"])]
    matches = exact or [e for e in entries if e["name"].startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(e["name"] for e in entries[:20]) or "none"
        raise ValueError(f"no published core file is named {name!r}; published: {known}")
    raise ValueError(f"{name!r} matches several published files: {', '.join(e['name'] for e in matches)}")


def _dataset_archive_dir(settings: dict[str, Any], root: Path) -> Path:
    """The folder the dataset class named in the settings reads its core files from (``root/mps`` otherwise)."""
    from . import datasets

    cls = getattr(datasets, str(settings.get("dataset")), None)
    if not (isinstance(cls, type) and issubclass(cls, datasets.MPSVisionDataset)):
        return root / "mps"
    probe = cls.__new__(cls)  # the class's own rule, without building or opening anything
    probe.root = os.fspath(root)
    try:
        return Path(probe._default_archive_dir())
    except AttributeError:
        return root / "mps"
