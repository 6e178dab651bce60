"""MPS core files: HDF5 written atomically in batches, read lazily per process (format in docs/format.md).

Layout of a core file (format version 1; version 2 when the cores are int8; 3 when they are int4 or hold DCT
or luma/chroma planes)::

    /                 attrs: format, format_version, settings (JSON), meta (JSON), layout (JSON), bond_dims,
                      num_samples, image_mode, content_sha256, mpsdata_version; optional domain, colour,
                      search (JSON)
    /cores/site_K     (N, G, d_{K-1}, j_K, d_K) one dataset per core site, chunked along samples
                      (G = channels * terms with channel_mode="separate", else terms); float16, float32 or int8;
                      int4: uint8 (N, G, d_{K-1}, ceil(j_K / 2), d_K), two codes per byte along j, low nibble first
    /scales           (N, G, n - 1) float16, int8/int4 files only: scale of cores 0 .. n-2
                      (value = code * scale / 127 for int8, / 7 for int4)
    /norms            (N, G) float32, int8/int4 files only: scale of the last core (it carries the image norm)
    /ranks            (N, G, n - 1) int16 bonds each image actually uses
    /mse              (N,) float32 mean squared error of the stored uint8 image against the original
    /targets          (N,) int64

Every dataset is stored with the file's HDF5 filter (byte shuffle + gzip by default; lzf, zstd through
hdf5plugin, or none). Every dataset carries a ``sha256`` attribute over its C-order bytes; ``content_sha256``
hashes those digests in order. Readers never keep a file handle across ``fork``: metadata is read and the file
closed at open time, and each process reopens lazily (GUIDE trap: h5py handles shared across fork corrupt reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from . import _engine, _kernels, _quant
from ._budget import max_bonds
from ._errors import MPSDataError
from ._layout import Layout
from ._mps import COLOURS, DOMAINS, decompose, inverse_transform, to_uint8
from ._shared import COLOUR_YCC
from ._signal import dct_matrix
from ._version import __version__ as _version

__all__ = [
    "FORMAT_VERSION",
    "INT4_FORMAT_VERSION",
    "INT8_FORMAT_VERSION",
    "MAX_FORMAT_VERSION",
    "TRANSFORM_FORMAT_VERSION",
    "CoreFile",
    "ProcessLocalFile",
    "check_header",
    "check_settings",
    "check_written",
    "open_core_file",
    "write_core_file",
    "settings_key",
    "temporary_path",
]

FORMAT = "mpsdata-cores"
FORMAT_VERSION = 1  # files with float cores (filtered or not: h5py decodes gzip and lzf by itself)
INT8_FORMAT_VERSION = 2  # files with int8 cores: a version-1 reader would read the codes as values
INT4_FORMAT_VERSION = 3  # files with int4 cores: uint8 bytes of two codes, which a version-2 reader cannot decode
#: files whose cores hold DCT or luma/chroma planes (``domain``/``colour`` attributes): an older reader would decode
#: the planes as pixels
TRANSFORM_FORMAT_VERSION = 3
MAX_FORMAT_VERSION = 3  # the newest version this module reads
CORE_DTYPES = ("float16", "float32", "int8", "int4")
#: numpy dtype of the stored cores and the format version a file of each core dtype declares.
_STORE_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8, "int4": np.uint8}
_FORMAT_VERSIONS = {"float16": FORMAT_VERSION, "float32": FORMAT_VERSION, "int8": INT8_FORMAT_VERSION,
                    "int4": INT4_FORMAT_VERSION}  # fmt: skip
_INT4_ZERO = 0x88  # a byte holding two int4 codes 0 (nibble = code + 8): the fill of unused bond slots
#: HDF5 filters of a core file; "gzip" (with byte shuffle) is the default by measurement (docs/bytes.md):
#: within 3 % of zstd's bytes on stored cores, and every HDF5 reader decodes it without a plugin.
COMPRESSIONS = ("gzip", "lzf", "zstd", "none")
DEFAULT_COMPRESSION = "gzip"
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks along the sample axis without a filter
_FILTERED_CHUNK_BYTES = 1 << 16  # 64 KiB with a filter: a random item decompresses one small chunk
_HASH_BLOCK = 4096  # samples per block when hashing or verifying
IN_MEMORY_LIMIT = 2 << 30  # cores up to 2 GiB are loaded whole on first use; larger files are read per item
#: A temporary file of an atomic write untouched this long is left by a killed build (a live one writes every batch).
_STALE_SECONDS = 24 * 3600


def settings_key(settings: dict[str, Any]) -> str:
    """Short stable key of build settings, used in core file names."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _layout_to_json(layout: Layout) -> dict[str, Any]:
    return {
        "height": layout.height,
        "width": layout.width,
        "channels": layout.channels,
        "site_dims": list(layout.site_dims),
        "rows": None if layout.rows is None else list(layout.rows),
        "cols": None if layout.cols is None else list(layout.cols),
        "padded_height": layout.padded_height,
        "padded_width": layout.padded_width,
        "channel_site": layout.channel_site,
    }


def _layout_from_json(data: dict[str, Any]) -> Layout:
    return Layout(
        height=int(data["height"]),
        width=int(data["width"]),
        channels=int(data["channels"]),
        site_dims=tuple(int(v) for v in data["site_dims"]),
        rows=None if data["rows"] is None else tuple(int(v) for v in data["rows"]),
        cols=None if data["cols"] is None else tuple(int(v) for v in data["cols"]),
        padded_height=int(data["padded_height"]),
        padded_width=int(data["padded_width"]),
        channel_site=bool(data.get("channel_site", False)),
    )


# ---------------------------------------------------------------------------------------------------
# Writing
def write_core_file(
    path: str | os.PathLike,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | np.ndarray]],
    *,
    num_samples: int,
    image_shape: tuple[int, int, int],
    image_mode: str,
    options: dict[str, Any],
    core_dtype: str,
    settings: dict[str, Any],
    meta: dict[str, Any],
    progress: bool = True,
    compression: str | None = DEFAULT_COMPRESSION,
    search: dict[str, Any] | None = None,
) -> Path:
    """Compress batches of images into a core file, atomically.

    Args:
        path: Final file path; the file appears only once complete (written to a temporary name first).
        batches: ``(images, targets)`` with images uint8 ``(B, C, H, W)`` and integer targets ``(B,)``.
        num_samples: Total number of images the batches yield.
        image_shape: ``(C, H, W)`` of every image.
        image_mode: PIL mode of the items (``"L"`` or ``"RGB"``).
        options: Keyword arguments of :func:`mpsdata.decompose` (budget, layout).
        core_dtype: Storage of the cores, ``"float16"``, ``"float32"``, ``"int8"`` or ``"int4"`` (per-core
            scales in the left-canonical gauge; int4 cores come from the quantisation-aware fit, as in
            :func:`mpsdata.decompose`; see :mod:`mpsdata._quant`).
        settings: Everything the file must match to be reused (stored as JSON, checked on open).
        meta: Source identity and class names (stored as JSON).
        progress: Show a tqdm progress bar.
        compression: HDF5 filter of every dataset, one of :data:`COMPRESSIONS` (``None`` is ``"none"``):
            ``"gzip"`` (byte shuffle + gzip level 6), ``"lzf"``, ``"zstd"`` (needs ``hdf5plugin`` to write and read).
        search: What a ``site_dims="auto"`` search measured (best candidate and all candidates), stored as the JSON
            attribute ``search``; ``options`` then hold the resolved layout, domain and colour.

    Returns:
        The path of the written file.
    """
    if core_dtype not in CORE_DTYPES:
        raise ValueError(f"core_dtype must be one of {CORE_DTYPES}, got {core_dtype!r}")
    filters = filter_options(compression)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110"), locking=False, track_order=True) as f:
            _write_batches(f, batches, num_samples, image_shape, options, core_dtype, filters, progress)
            f.attrs["format"] = FORMAT
            version = _FORMAT_VERSIONS[core_dtype]
            f.attrs["format_version"] = max(version, TRANSFORM_FORMAT_VERSION) if transform_attrs(options) else version
            f.attrs["mpsdata_version"] = _version
            f.attrs["image_mode"] = image_mode
            f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            f.attrs["meta"] = json.dumps(meta, sort_keys=True)
            f.attrs["content_sha256"] = _hash_datasets(f, write=True)
            for name, value in transform_attrs(options).items():
                f.attrs[name] = value
            if search is not None:
                f.attrs["search"] = json.dumps(search, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def temporary_path(path: Path) -> Path:
    """A fresh name ``.NAME.tmp-PID-TOKEN`` to write ``path`` under before ``os.replace`` renames it.

    In the same folder, so the rename is atomic. The random token keeps two builds of one file apart when they share
    a PID: threads of one process, or containers whose processes are all PID 1 writing to one volume. Temporary files
    of ``path`` left by a killed build (``SIGKILL`` runs no cleanup) are removed once untouched for a day: by mtime, as
    a PID cannot tell whether a build on another host or container is alive.
    """
    prefix = f".{path.name}.tmp-"
    cutoff = time.time() - _STALE_SECONDS
    with contextlib.suppress(OSError):  # an unlistable folder: the write itself reports the problem
        for entry in os.scandir(path.parent):
            rest = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
            if re.fullmatch(r"\d+(-[0-9a-f]+)?", rest) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):  # another build may be removing it too
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
    return path.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")


def transform_attrs(options: dict[str, Any]) -> dict[str, str]:
    """Root attributes naming the domain and colour planes the cores hold; none for pixels and RGB (older files)."""
    domain, colour = options.get("domain") or "pixels", options.get("colour") or "rgb"
    return {} if (domain, colour) == ("pixels", "rgb") else {"domain": domain, "colour": colour}


def filter_options(compression: str | None) -> dict[str, Any]:
    """h5py ``create_dataset`` keywords of a compression name (see :data:`COMPRESSIONS`)."""
    if compression is None or compression == "none":
        return {}
    if not isinstance(compression, str):
        kind = type(compression).__name__
        raise TypeError(f"compression must be a string, one of {COMPRESSIONS}, or None; got {kind}")
    if compression == "gzip":
        # Level 6: 4x faster to write than 9 for 0.1 % more bytes on Fashion-MNIST cores (docs/bytes.md).
        return {"compression": "gzip", "compression_opts": 6, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "zstd":
        try:
            import hdf5plugin
        except ImportError:
            raise ValueError(
                "compression='zstd' needs the hdf5plugin package (pip install hdf5plugin), also to read the file; "
                "'gzip' needs nothing"
            ) from None
        return {**hdf5plugin.Zstd(clevel=19), "shuffle": True}
    raise ValueError(f"compression must be one of {COMPRESSIONS} or None, got {compression!r}")


def _load_plugins() -> None:
    """Register hdf5plugin's filters (zstd...) when installed; files with gzip, lzf or no filter need none."""
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401


def _write_batches(f, batches, num_samples, image_shape, options, core_dtype, filters, progress) -> None:
    from tqdm.auto import tqdm

    store_dtype = np.dtype(_STORE_DTYPES[core_dtype])

    channels, height, width = image_shape
    separate = options.get("channel_mode", "separate") == "separate"
    written = 0
    cores_ds: list[h5py.Dataset] = []
    bar = tqdm(total=num_samples, desc="compressing", unit="img", disable=not progress or None)
    try:
        for images, targets in batches:
            images = torch.as_tensor(images)
            if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (channels, height, width):
                raise ValueError(
                    f"every batch must be uint8 (B, {channels}, {height}, {width}), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            n = images.shape[0]
            if written + n > num_samples:
                raise ValueError(f"the batches yield more than the announced {num_samples} images")
            x = images if (channels > 1 or not separate) else images[:, 0]
            m = decompose(x, compute_bound=False, core_dtype=core_dtype, **options)
            if not cores_ds:
                growable = options.get("tol") is not None
                cores_ds = _create_datasets(f, m, num_samples, store_dtype, growable, filters)
            stored = _store_batch(f, cores_ds, m, written, store_dtype)
            recon = _decode_stored(stored, m, images.shape[0], f, written)
            mse = (recon.float() - images.float()).square().flatten(1).mean(1)
            f["mse"][written : written + n] = mse.numpy()
            f["targets"][written : written + n] = np.asarray(targets, dtype=np.int64)
            written += n
            bar.update(n)
    finally:
        bar.close()
    check_written(written, num_samples)


def check_written(written: int, num_samples: int) -> None:
    """A writer's batches must hold exactly the announced images, and at least one."""
    if written != num_samples:
        raise ValueError(f"the batches yielded {written} images, {num_samples} were announced")
    if written == 0:
        raise ValueError("cannot build a core file from an empty dataset")


def _groups(m) -> int:
    """MPS per image in the file: channels * terms (separate channels) or terms."""
    return math.prod(m.ranks.shape[1:-1])


def _create_datasets(f, m, num_samples: int, store_dtype: np.dtype, growable: bool, filters) -> list[h5py.Dataset]:
    """One dataset per site. With ``growable`` (a tolerance budget) the bond axes may grow up to their caps
    as later batches need; otherwise every batch has the same bonds and chunks hold exactly one core each."""
    layout = m.layout
    groups = _groups(m)
    full = [1, *m.bond_dims, 1]
    limit = [1, *max_bonds(layout.site_dims), 1] if growable else full
    int4 = store_dtype == np.uint8
    stored_sites = [(j + 1) // 2 if int4 else j for j in layout.site_dims]  # int4: two codes per byte along j
    per_image = sum(limit[k] * j * limit[k + 1] for k, j in enumerate(stored_sites)) * groups
    chunk_bytes = _FILTERED_CHUNK_BYTES if filters else _CHUNK_BYTES
    target = max(1, min(num_samples, chunk_bytes // max(1, per_image * store_dtype.itemsize)))
    chunk = math.ceil(num_samples / math.ceil(num_samples / target))  # equal chunks: the last is not mostly empty
    grp = f.create_group("cores", track_order=True)
    datasets = []
    for k, j in enumerate(stored_sites):
        datasets.append(
            grp.create_dataset(
                f"site_{k}",
                shape=(num_samples, groups, full[k], j, full[k + 1]),
                maxshape=(num_samples, groups, limit[k], j, limit[k + 1]),
                dtype=store_dtype,
                chunks=(chunk, groups, limit[k], j, limit[k + 1]),
                fillvalue=_INT4_ZERO if int4 else 0,
                track_times=False,
                **filters,
            )
        )
    n_bonds = len(layout.site_dims) - 1
    small = {"chunks": (chunk, groups), **filters} if filters else {}
    if store_dtype.kind in "iu":  # integer codes: int8, or int4 packed in uint8
        f.create_dataset("scales", shape=(num_samples, groups, n_bonds), dtype=np.float16, track_times=False,
                         **({**small, "chunks": (chunk, groups, n_bonds)} if filters else {}))  # fmt: skip
        f.create_dataset("norms", shape=(num_samples, groups), dtype=np.float32, track_times=False, **small)
    f.create_dataset("ranks", shape=(num_samples, groups, n_bonds), dtype=np.int16, track_times=False,
                     **({**small, "chunks": (chunk, groups, n_bonds)} if filters else {}))  # fmt: skip
    one = {"chunks": (chunk,), **filters} if filters else {}
    f.create_dataset("mse", shape=(num_samples,), dtype=np.float32, track_times=False, **one)
    f.create_dataset("targets", shape=(num_samples,), dtype=np.int64, track_times=False, **one)
    f.attrs["layout"] = json.dumps(_layout_to_json(layout), sort_keys=True)
    return datasets


def _store_batch(f, datasets: list[h5py.Dataset], m, start: int, store_dtype: np.dtype) -> list[np.ndarray]:
    """Write one batch's cores (growing bond axes if needed) and return them as stored."""
    groups = _groups(m)
    n = m.ranks.shape[0]
    stored = []
    int4 = store_dtype == np.uint8
    if store_dtype.kind in "iu":
        q = m._quantized
        codes = q.values.cpu().reshape(n, groups, -1)
        if int4:  # decompose packs a whole term; the file packs each core along its site axis
            codes = _quant._unpack_int4(codes, int(_engine.core_offsets(m.site_dims, m.bond_dims)[-1]))
        cores = _engine.unpack(codes, m.site_dims, m.bond_dims)
        scales = q.scales.cpu().reshape(n, groups, -1).numpy()
        f["scales"][start : start + n] = scales[..., :-1].astype(np.float16)
        f["norms"][start : start + n] = scales[..., -1].astype(np.float32)
    else:
        cores = m.cores
    for ds, core in zip(datasets, cores):
        site = core.reshape(n, groups, *core.shape[-3:])
        if int4:
            site = _quant._pack_int4(site.movedim(3, -1)).movedim(-1, 3)
        block = site.numpy().astype(store_dtype)
        left, right = max(ds.shape[2], block.shape[2]), max(ds.shape[4], block.shape[4])
        if (left, right) != (ds.shape[2], ds.shape[4]):
            ds.resize((ds.shape[0], groups, left, ds.shape[3], right))
        ds[start : start + n, :, : block.shape[2], :, : block.shape[4]] = block
        stored.append(block)
    f["ranks"][start : start + n] = m.ranks.reshape(n, groups, -1).numpy().astype(np.int16)
    return stored


def _dequantize(
    parts: list[np.ndarray], scales: np.ndarray | None, norms: np.ndarray | None, site_dims: tuple[int, ...]
) -> np.ndarray:
    """Float32 packed cores ``(n, G, P)`` from stored per-site arrays ``(n, G, d, j, d')`` (and integer scales).

    int4 sites are uint8 ``(n, G, d, ceil(j / 2), d')``; ``site_dims`` drops the padding nibble of an odd ``j``.
    The writer checks its images through this same function, so the stored ``mse`` is what readers decode.
    """
    n, groups = parts[0].shape[:2]
    if scales is None:
        return np.concatenate([p.reshape(n, groups, -1) for p in parts], axis=2).astype(np.float32)
    assert norms is not None
    int4 = parts[0].dtype == np.uint8
    levels = _quant._LEVELS["int4" if int4 else "int8"]
    out = []
    for k, p in enumerate(parts):
        if int4:
            p = _quant._unpack_int4(torch.from_numpy(p).movedim(3, -1), site_dims[k]).movedim(-1, 3).numpy()
        scale = scales[:, :, k] if k < len(parts) - 1 else norms
        step = scale.astype(np.float32) / np.float32(levels)
        out.append(p.reshape(n, groups, -1).astype(np.float32) * step[..., None])
    return np.concatenate(out, axis=2)


def _decode_stored(stored: list[np.ndarray], m, n: int, f=None, start: int = 0) -> torch.Tensor:
    """uint8 images ``(n, C, H, W)`` exactly as a reader will decode the stored cores."""
    groups = stored[0].shape[1]
    scales = norms = None
    if stored[0].dtype.kind in "iu":
        scales, norms = f["scales"][start : start + n], f["norms"][start : start + n]
    packed = torch.from_numpy(_dequantize(stored, scales, norms, m.site_dims))
    return _decode_packed(packed, m.layout, m.bond_dims, groups, m.terms, m.domain, m.colour)


def _decode_packed(packed: torch.Tensor, layout: Layout, bonds, groups: int, terms: int, domain: str, colour: str):
    """uint8 images ``(n, C, H, W)`` from packed float cores ``(n, groups, P)``: the one decode of writer and reader.

    Cores of pixels and RGB round to uint8 inside the contraction; transformed planes (DCT, luma/chroma) are
    contracted to float64, transformed back (:func:`mpsdata._mps.inverse_transform`), then rounded.
    """
    n = packed.shape[0]
    flat = packed.reshape(n * groups // terms, terms, packed.shape[-1])
    plain = (domain, colour) == ("pixels", "rgb")
    if not plain:  # float64 throughout, as CoreFile.decode_one: the two round the same values to the same bytes
        flat = flat.double()
    images = _engine.decode(flat, layout.scatter_index, layout.site_dims, bonds, quantize=plain)
    channels = layout.num_values * groups // terms // (layout.height * layout.width)
    images = images.reshape(n, channels, layout.height, layout.width)
    return images if plain else to_uint8(inverse_transform(images, domain, colour))


def _hash_datasets(f: h5py.File, write: bool, names: list[str] | None = None) -> str:
    """sha256 of every dataset (stored as its attribute when ``write``) and of all of them in order; ``names``
    lists them for a file that is not of MPS cores (default: :func:`_dataset_names`)."""
    total = hashlib.sha256()
    for name in _dataset_names(f) if names is None else names:
        ds = f[name]
        digest = hashlib.sha256()
        for start in range(0, ds.shape[0], _HASH_BLOCK):
            digest.update(np.ascontiguousarray(_read(f, name, slice(start, start + _HASH_BLOCK))).tobytes())
        hexdigest = digest.hexdigest()
        if write:
            ds.attrs["sha256"] = hexdigest
        elif ds.attrs.get("sha256") != hexdigest:
            raise MPSDataError(f"dataset {name!r} of {f.filename} fails its checksum: the file is corrupted")
        total.update(f"{name}:{hexdigest};".encode())
    return total.hexdigest()


def _read(f: h5py.File, name: str, selection: Any = slice(None)) -> np.ndarray:
    """``f[name][selection]``; a chunk whose filter fails to decode (flipped compressed bytes) is corruption."""
    try:
        return f[name][selection]
    except OSError as error:
        raise MPSDataError(
            f"dataset {name!r} of core file {f.filename} fails its checksum: its compressed data do not decode "
            f"({_short(str(error))}), the file is corrupted; delete it to rebuild it"
        ) from None


def _checked(f: h5py.File, name: str) -> np.ndarray:
    """A dataset read whole, after its sha256 attribute matched."""
    data = _read(f, name)
    if hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() != f[name].attrs.get("sha256"):
        raise MPSDataError(
            f"core file {f.filename}: {name} fails its checksum, the file is corrupted; delete it to rebuild it"
        )
    return data


def _dataset_names(f: h5py.File) -> list[str]:
    names = list(f["cores"].keys())
    if any(re.fullmatch(r"site_\d{1,4}", name) is None for name in names):
        raise MPSDataError(f"{f.filename}: /cores holds {_short(names)}; expected site_0, site_1, ...")
    sites = sorted(names, key=lambda s: int(s.split("_")[1]))
    scales = [name for name in ("scales", "norms") if name in f]
    return [f"cores/{s}" for s in sites] + scales + ["ranks", "mse", "targets"]


# ---------------------------------------------------------------------------------------------------
# Reading
_MAX_VALUES = 1 << 28  # values per image when the settings give no image shape (16k x 16k)
_MAX_OBJECTS = 100_000  # HDF5 groups and datasets walked when checking a file
# What a filtered dataset may declare against the file's bytes. Data of any size may shrink 64-fold. Constant data
# shrinks far more: deflate up to its format's 1032:1 and zstd about 2,700:1 on 64 KiB chunks of zeros, chunk index
# included (measured; an all-black split has zero cores and zero MSE), so up to _MAX_RATIO while the declared bytes
# stay within _MAX_SHRUNK_BYTES. A tiny file still cannot declare a terabyte of fill values: from a file of s bytes a
# reader allocates at most max(64 s, min(_MAX_RATIO s, 2 GiB)), and 2 GiB is what it holds anyway for the cores of a
# legitimate file (IN_MEMORY_LIMIT).
_MAX_RATIO = 1 << 14
_MAX_SHRUNK_BYTES = 2 << 30
#: What h5py raises on a damaged file: OSError when the file cannot be opened, KeyError when an object's header
#: fails its checksum (the root group's too), the others on malformed attributes and layouts.
_DAMAGE = (OSError, ValueError, TypeError, KeyError, OverflowError, RecursionError)


def _short(value: Any, limit: int = 80) -> str:
    """repr of an untrusted value, cut so that a hostile file cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _damaged(path: Path, error: BaseException, kind: str = "core file") -> MPSDataError:
    """The error of a file h5py cannot read as a ``kind``: what was seen, and how to fix it."""
    return MPSDataError(
        f"core file {path} is truncated, corrupted or not a {kind} ({_short(str(error), 200)}); "
        "delete it to rebuild it, or check it with `mpsdata verify`"
    )


def check_header(path: Path, settings: dict[str, Any] | None = None) -> None:
    """Validate an untrusted file before reading anything large from it.

    Only hard links and plain numeric datasets inside the file, no dataset declaring more bytes than the file
    could hold, and a layout whose index arrays stay bounded: a small hostile file cannot make a reader
    allocate gigabytes.
    """
    size = path.stat().st_size
    _load_plugins()
    try:
        with h5py.File(path, "r", locking=False) as f:
            _check_objects(f, size)
            if "layout" in f.attrs:
                _check_layout(f.attrs["layout"], settings)
    except MPSDataError:
        raise
    except _DAMAGE as error:
        raise _damaged(path, error) from None


def _check_objects(f: h5py.File, file_size: int) -> None:
    """Only hard links, no virtual or external data, and no dataset declaring more bytes than the file could hold
    (datasets are read whole by CoreFile: a tiny file may declare a terabyte of fill values)."""
    stack = [f]
    seen = 0
    while stack:
        group = stack.pop()
        for key in group:
            seen += 1
            if seen > _MAX_OBJECTS:
                raise MPSDataError(f"{f.filename} holds more than {_MAX_OBJECTS} HDF5 objects")
            link = group.get(key, getlink=True)
            where = f"{group.name.rstrip('/')}/{key}"
            if not isinstance(link, h5py.HardLink):
                raise MPSDataError(f"{f.filename}: {where} is a {type(link).__name__}; core files hold no links")
            obj = group[key]
            if isinstance(obj, h5py.Group):
                stack.append(obj)
                continue
            if obj.is_virtual or obj.external:
                raise MPSDataError(f"{f.filename}: {where} reads data outside the file")
            if obj.dtype.kind not in "biuf" or obj.dtype.itemsize > 16:
                raise MPSDataError(f"{f.filename}: {where} has dtype {obj.dtype}; core files hold plain numbers")
            nbytes = math.prod(obj.shape) * obj.dtype.itemsize
            filtered = obj.id.get_create_plist().get_nfilters() > 0
            limit = max(file_size * 64, min(file_size * _MAX_RATIO, _MAX_SHRUNK_BYTES)) if filtered else file_size
            limit += 1 << 16
            if nbytes > limit:
                raise MPSDataError(
                    f"{f.filename}: {where} declares shape {_short(obj.shape)} ({nbytes} bytes) in a file of "
                    f"{file_size} bytes; the file is hostile or corrupted"
                )


def _check_layout(text: Any, settings: dict[str, Any] | None) -> None:
    """The per-image index arrays CoreFile builds are as large as the layout's padded image: bound it."""
    layout = json.loads(text)
    try:
        sites = [int(v) for v in layout["site_dims"]]
        dims = [int(layout[k]) for k in ("channels", "height", "width", "padded_height", "padded_width")]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise MPSDataError("the core file's layout attribute is malformed") from None
    channels, height, width, padded_height, padded_width = dims
    values = channels * padded_height * padded_width
    cap = _MAX_VALUES
    shape = (settings or {}).get("image_shape")
    if isinstance(shape, list) and shape and all(type(v) is int and v > 0 for v in shape):
        cap = 16 * math.prod(shape)  # padding to a smooth size at most doubles each side
    if min(dims) < 1 or min(sites, default=0) < 1 or padded_height < height or padded_width < width:
        raise MPSDataError(f"the core file's layout has non-positive or shrinking sizes: {_short(layout)}")
    if math.prod(sites) != values or values > cap:
        raise MPSDataError(
            f"the core file's layout places {values} values on sites {_short(sites)} (product "
            f"{math.prod(sites)}); expected equal and at most {cap}"
        )


def check_settings(path: Path, found: dict[str, Any], expected: dict[str, Any] | None) -> None:
    """Refuse a file built with other settings than requested, naming every difference."""
    if expected is not None and expected != found:
        differences = {
            key: (found.get(key), expected.get(key))
            for key in sorted(set(found) | set(expected))
            if found.get(key) != expected.get(key)
        }
        raise MPSDataError(
            f"core file {path} was built with other settings than requested "
            f"(setting: (in file, requested)) {differences}; delete it to rebuild, or ask for its settings"
        )


def open_core_file(path: str | os.PathLike, expected_settings: dict[str, Any] | None = None) -> Any:
    """Open a core file of either kind: MPS cores (:class:`CoreFile`) or the shared codec
    (:class:`mpsdata._shared_file.SharedCoreFile`), told apart by the root attribute ``codec``."""
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            codec = f.attrs.get("codec", "mps")
    except FileNotFoundError:
        codec = "mps"  # CoreFile raises its own message
    except _DAMAGE as error:  # not HDF5, truncated, or a root group that fails its checksum
        raise _damaged(path, error) from None
    if not isinstance(codec, str):  # every writer stores a string; an array would not even compare
        raise _damaged(path, TypeError(f"its codec attribute is a {type(codec).__name__}, not a string"))
    if codec == "shared":
        from ._shared_file import SharedCoreFile

        return SharedCoreFile(path, expected_settings)
    if codec != "mps":
        raise MPSDataError(f"core file {path} holds codec {_short(codec)}, unknown to this mpsdata; upgrade mpsdata")
    return CoreFile(path, expected_settings)


@dataclass(frozen=True)
class _Geometry:
    layout: Layout
    bond_dims: tuple[int, ...]
    groups: int  # MPS per image in the file
    terms: int
    sites: np.ndarray
    caps: np.ndarray
    offsets: np.ndarray


class ProcessLocalFile:
    """An HDF5 file opened lazily once per process: a handle is never kept across ``fork`` nor pickled (GUIDE
    trap: h5py handles shared across fork corrupt reads). ``__init__`` reads the metadata (``_read_metadata``) and
    closes the file; ``_PROCESS_LOCAL`` names the attributes that hold data loaded later, which a pickled copy
    drops and reloads."""

    path: Path
    settings: dict[str, Any]
    _h5: h5py.File | None = None
    _pid: int | None = None
    _PROCESS_LOCAL: tuple[str, ...] = ()
    _KIND = "core file"  # what the file should be, for error messages
    _ERRORS: tuple[type[Exception], ...] = (OSError, KeyError, json.JSONDecodeError)  # what a damaged file raises

    def __init__(self, path: str | os.PathLike, expected_settings: dict[str, Any] | None = None) -> None:
        self.path = Path(path).absolute()  # each process opens it lazily, maybe after the caller changed directory
        try:
            check_header(self.path, expected_settings)
            with h5py.File(self.path, "r", locking=False) as f:
                self._read_metadata(f)
        except MPSDataError:
            raise
        except self._ERRORS as error:
            raise _damaged(self.path, error, self._KIND) from None
        check_settings(self.path, self.settings, expected_settings)
        for name in self._PROCESS_LOCAL:
            setattr(self, name, None)

    def _read_metadata(self, f: h5py.File) -> None:
        """Read (and check) everything but the process-local data from the open file."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_h5", "_pid", *self._PROCESS_LOCAL):  # never ship a handle or a copy of the data
            state[name] = None
        return state

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            _load_plugins()  # a spawned worker has not imported hdf5plugin yet
            self._h5 = h5py.File(self.path, "r", locking=False)
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None


class CoreFile(ProcessLocalFile):
    """Read-only access to a core file, safe across ``fork`` and ``spawn``.

    Metadata, targets and per-image figures are read once in ``__init__`` and the file is closed. Cores are
    loaded lazily in each process: whole into memory (checksummed) when they fit ``IN_MEMORY_LIMIT``,
    otherwise read per request.

    Args:
        path: The core file.
        expected_settings: Settings the caller asked for; a file built with other settings raises.
    """

    _PROCESS_LOCAL = ("_memory", "_single_memory")
    _memory: np.ndarray | None  # the packed cores, whole (when they fit IN_MEMORY_LIMIT)
    _single_memory: np.ndarray | None  # the same, arranged for the per-item kernel

    def _read_metadata(self, f: h5py.File) -> None:
        if f.attrs.get("format") != FORMAT:
            raise MPSDataError(f"{self.path} is not an mpsdata core file (format attribute {f.attrs.get('format')!r})")
        if "codec" in f.attrs:
            raise MPSDataError(
                f"{self.path} holds codec {_short(f.attrs['codec'])}, not MPS cores; open it with open_core_file"
            )
        version = int(f.attrs["format_version"])
        if version > MAX_FORMAT_VERSION:
            raise MPSDataError(
                f"core file {self.path} has format version {version}, newer than this mpsdata reads "
                f"({MAX_FORMAT_VERSION}); upgrade mpsdata (`pip install -U mpsdata`)"
            )
        self.format_version = version
        self.settings: dict[str, Any] = json.loads(f.attrs["settings"])
        self.meta: dict[str, Any] = json.loads(f.attrs["meta"])
        self.image_mode = str(f.attrs["image_mode"])
        self.content_sha256 = str(f.attrs["content_sha256"])
        # What the cores hold; files without these attributes (all before them) hold pixels in RGB.
        self.domain = str(f.attrs.get("domain", "pixels"))
        self.colour = str(f.attrs.get("colour", "rgb"))
        if self.domain not in DOMAINS or self.colour not in COLOURS:
            raise MPSDataError(
                f"core file {self.path}: domain {self.domain!r} / colour {self.colour!r} unknown to this mpsdata "
                f"(it reads domains {DOMAINS}, colours {COLOURS}); upgrade mpsdata"
            )
        self.search = json.loads(f.attrs["search"]) if "search" in f.attrs else None
        layout = _layout_from_json(json.loads(f.attrs["layout"]))
        sites = [f[name] for name in _dataset_names(f)[: len(layout.site_dims)]]
        num_samples = int(f["targets"].shape[0])
        groups = int(sites[0].shape[1])
        bonds = tuple(int(ds.shape[4]) for ds in sites[:-1])
        int4 = sites[0].dtype == np.uint8  # two codes per byte along the site axis
        for k, ds in enumerate(sites):
            full = [1, *bonds, 1]
            j = layout.site_dims[k]
            expected = (num_samples, groups, full[k], (j + 1) // 2 if int4 else j, full[k + 1])
            if tuple(ds.shape) != expected:
                raise MPSDataError(f"core file {self.path}: site {k} has shape {ds.shape}, expected {expected}")
        # Read whole and checksummed: a flipped byte in the labels must not train a model silently.
        self.targets = torch.from_numpy(_checked(f, "targets"))
        self.ranks = torch.from_numpy(_checked(f, "ranks").astype(np.int64))
        self.mse = torch.from_numpy(_checked(f, "mse"))
        self.core_dtype = "int4" if int4 else str(sites[0].dtype)
        if self.core_dtype not in CORE_DTYPES:
            raise MPSDataError(f"core file {self.path}: cores of dtype {self.core_dtype}, expected {CORE_DTYPES}")
        self._integer = self.core_dtype in ("int8", "int4")
        if self._integer != ("scales" in f) or version < _FORMAT_VERSIONS[self.core_dtype]:
            raise MPSDataError(
                f"core file {self.path}: int8 cores need format version 2 with /scales and /norms, int4 cores "
                f"(uint8) version 3 with them, float cores neither; got version {version} with cores of dtype "
                f"{sites[0].dtype}"
            )
        if self._integer:
            n_bonds = len(layout.site_dims) - 1
            for name, shape in {"scales": (num_samples, groups, n_bonds), "norms": (num_samples, groups)}.items():
                if name not in f or tuple(f[name].shape) != shape:
                    raise MPSDataError(f"core file {self.path}: /{name} is missing or not of shape {shape}")
        terms = int(self.settings.get("residual", 0)) + 1
        sites_arr = np.asarray(layout.site_dims, np.int64)
        caps_arr = np.asarray(bonds, np.int64)
        self.geometry = _Geometry(
            layout, bonds, groups, terms, sites_arr, caps_arr, _kernels._offsets(sites_arr, caps_arr)
        )
        self.num_samples = num_samples
        self.nbytes = self.path.stat().st_size
        self._plan_single()

    def _plan_single(self) -> None:
        """Geometry of the per-item decoder, which contracts the cheaper direction (see _engine.mirror)."""
        g = self.geometry
        sites, bonds, scatter = g.layout.site_dims, g.bond_dims, g.layout.scatter_index
        self._mirrored = _engine.contraction_cost(sites, bonds) > 1.25 * _engine.contraction_cost(
            sites[::-1], bonds[::-1]
        )
        if self._mirrored:
            _, sites, bonds, scatter = _engine.mirror(
                np.zeros((0, int(g.offsets[-1])), np.float32), sites, bonds, scatter
            )
        s, c = np.asarray(sites, np.int64), np.asarray(bonds, np.int64)
        self._single = (np.concatenate([[len(s)], s, c, _kernels._offsets(s, c)]), scatter)
        # Transformed planes: the inverse DCT's matrices (rows^T X cols) and the inverse colour mix, or empty.
        none = np.zeros((0, 0))
        dct = self.domain == "dct"
        self._inverse = (
            np.ascontiguousarray(dct_matrix(g.layout.height).numpy().T) if dct else none,
            dct_matrix(g.layout.width).numpy() if dct else none,
            COLOUR_YCC if self.colour == "ycc" else none,
        )

    @property
    def params_per_image(self) -> int:
        return int(self.geometry.offsets[-1]) * self.geometry.groups

    def load(self) -> np.ndarray:
        """All cores packed as float32 ``(N, groups, P)``, read once per process and checksummed."""
        if self._memory is None:  # arrays inherited through fork stay valid; only handles do not
            f = self._file()
            names = _dataset_names(f)[: len(self.geometry.layout.site_dims)]
            parts = [_checked(f, name) for name in names]  # (N, G, d, j, d') as stored: int4 unpacks along j
            scales, norms = (_checked(f, "scales"), _checked(f, "norms")) if self._integer else (None, None)
            self._memory = _dequantize(parts, scales, norms, self.geometry.layout.site_dims)
            self._single_memory = None
        return self._memory

    def _single_cores(self) -> np.ndarray:
        """In-memory cores in the orientation the per-item decoder reads."""
        memory = self.load()
        if self._single_memory is None:
            g = self.geometry
            if self._mirrored:
                self._single_memory = _engine.mirror_cores(memory, g.layout.site_dims, g.bond_dims)
            else:
                self._single_memory = memory
        return self._single_memory

    def _held_whole(self) -> bool:
        """Whether the cores are, or are to be, held in memory: loaded already, or within ``IN_MEMORY_LIMIT``."""
        return self._memory is not None or self.num_samples * self.params_per_image * 4 <= IN_MEMORY_LIMIT

    def _read_rows(self, rows: np.ndarray | slice) -> np.ndarray:
        """Cores of some images read from the file (increasing ``rows``), packed float32 ``(n, groups, P)``."""
        f = self._file()
        names = _dataset_names(f)[: len(self.geometry.layout.site_dims)]
        parts = [_read(f, name, rows) for name in names]
        scales, norms = (_read(f, "scales", rows), _read(f, "norms", rows)) if self._integer else (None, None)
        return _dequantize(parts, scales, norms, self.geometry.layout.site_dims)

    def packed(self, indices: np.ndarray) -> np.ndarray:
        """Cores of some images, packed float32 ``(len(indices), groups, P)``."""
        if self._held_whole():
            return self.load()[indices]
        order = np.argsort(indices)
        sorted_idx = np.asarray(indices)[order]
        unique, inverse = np.unique(sorted_idx, return_inverse=True)
        packed = self._read_rows(unique)[inverse]
        out = np.empty_like(packed)
        out[order] = packed
        return out

    def _indices(self, indices) -> np.ndarray:
        """Indices as int64 in ``[0, N)``; negatives count from the end, others raise ``IndexError``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.num_samples or idx.max() >= self.num_samples):
            raise IndexError(f"index out of range for {self.num_samples} images")
        return idx % max(self.num_samples, 1)

    def _read_single(self, index: int) -> np.ndarray:
        """One image's cores read from the file, in the orientation the per-item decoder reads."""
        (row,) = self._indices(operator.index(index))
        packed = self._read_rows(slice(row, row + 1))
        if self._mirrored:
            g = self.geometry
            packed = _engine.mirror_cores(packed, g.layout.site_dims, g.bond_dims)
        return packed[0]

    def decode(self, indices, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 images ``(len(indices), C, H, W)`` on ``device`` (default CPU)."""
        idx = self._indices(indices)
        g = self.geometry
        packed = torch.from_numpy(self.packed(idx))
        if device is not None:
            packed = packed.to(device)
        return _decode_packed(packed, g.layout, g.bond_dims, g.groups, g.terms, self.domain, self.colour)

    def decode_one(self, index: int) -> np.ndarray:
        """One uint8 image as ``(H, W)`` or ``(H, W, C)``, the fast path behind ``__getitem__``."""
        g = self.geometry
        if self._single_memory is not None:
            cores = self._single_memory[index]
        elif self._held_whole():
            cores = self._single_cores()[index]
        else:  # too large to hold (as in `packed`): a worker reads just this image, never the whole file
            cores = self._read_single(index)
        cores = cores.reshape(g.groups // g.terms, g.terms, -1)
        layout = g.layout
        if (self.domain, self.colour) != ("pixels", "rgb"):  # planes: contract and transform back in float64
            channels = cores.shape[0] * layout.num_values // (layout.height * layout.width)
            image = np.empty((layout.height, layout.width, channels), np.uint8)
            _kernels._decode_single_planes(cores, self._single[0], self._single[1], *self._inverse, image)
            return image[:, :, 0] if channels == 1 else image
        out = np.empty((cores.shape[0], layout.num_values), np.uint8)
        _kernels._decode_single(cores, self._single[0], self._single[1], out)
        if out.shape[0] * layout.num_values == layout.height * layout.width:
            return out.reshape(layout.height, layout.width)
        return out.reshape(-1, layout.height, layout.width).transpose(1, 2, 0)

    def verify(self) -> dict[str, Any]:
        """Check every checksum and decode every image; returns a small report."""
        with h5py.File(self.path, "r", locking=False) as f:
            total = _hash_datasets(f, write=False)
        if total != self.content_sha256:
            raise MPSDataError(f"core file {self.path}: content checksum mismatch, the file is corrupted")
        from .distill import load_bias

        load_bias(self.path)  # a stored residual bias is checked against its own checksums too
        decoded = 0
        for start in range(0, self.num_samples, _HASH_BLOCK):
            images = self.decode(np.arange(start, min(start + _HASH_BLOCK, self.num_samples)))
            decoded += images.shape[0]
        return {"path": str(self.path), "images": decoded, "content_sha256": total}


def iterate_batches(
    images: np.ndarray, targets: np.ndarray, batch_size: int
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Batches ``(uint8 (B, C, H, W), targets)`` from in-memory arrays ``(N, H, W)`` or ``(N, H, W, C)``."""
    for start in range(0, len(images), batch_size):
        block = np.asarray(images[start : start + batch_size])
        chw = block[:, None] if block.ndim == 3 else block.transpose(0, 3, 1, 2)
        yield torch.from_numpy(np.ascontiguousarray(chw)), np.asarray(targets[start : start + batch_size])
