"""Core files of the shared representation (:mod:`mpsdata._shared`): the shared part once, a byte string per image.

Layout (format version 4, ``codec="shared"``; docs/format.md)::

    /                 attrs: format ("mpsdata-cores"), format_version (4), codec ("shared"), codec_settings (JSON),
                      settings (JSON), meta (JSON), image_mode, num_samples, content_sha256, mpsdata_version
    /shared/basis     (C, K, b*b) float16, learned basis only
    /shared/mean      (C, b*b) float16
    /shared/group_classes  (G,) uint8 context of every statistic group
    /shared/freq      (contexts, tokens) uint16 rANS frequency tables
    /codes            (total,) uint8 every image's byte string, back to back, unfiltered, 64 KiB chunks
    /offsets          (N + 1,) uint64 image i is codes[offsets[i]:offsets[i + 1]]
    /mse              (N,) float32 mean squared error of what a reader decodes against the original
    /targets          (N,) int64

The byte strings are rANS output, which no HDF5 filter shrinks, so ``/codes`` is stored unfiltered (a filter
would only cost read time); every other dataset takes the file's ``compression``. Checksums, atomic writing and
fork safety follow :mod:`mpsdata._archive`. A file of this kind declares ``format_version`` 4, so a reader that
only knows MPS cores refuses it with its upgrade message.

Example:
    >>> import tempfile, torch
    >>> from mpsdata._shared import fit_shared
    >>> g = torch.Generator().manual_seed(0)
    >>> ramp = torch.arange(8.0)[:, None] + torch.arange(8.0)[None] * 10
    >>> x = (ramp + torch.randn(16, 1, 8, 8, generator=g) * 4).clamp(0, 255).to(torch.uint8)
    >>> codec = fit_shared(x, step=4.0, transform="dct")
    >>> path = write_shared_file(tempfile.mkdtemp() + "/toy.h5", codec, [(x, torch.arange(16))], num_samples=16,
    ...                          image_mode="L", settings={}, meta={"classes": []}, progress=False)
    >>> cores = SharedCoreFile(path)
    >>> len(cores), bool(torch.equal(cores.decode([3, 5]), codec.decode(codec.encode(x[[3, 5]]))))
    (16, True)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ._archive import (
    DEFAULT_COMPRESSION,
    FORMAT,
    IN_MEMORY_LIMIT,
    ProcessLocalFile,
    _checked,
    _hash_datasets,
    _read,
    check_written,
    filter_options,
    temporary_path,
)
from ._errors import MPSDataError
from ._shared import _RANS_L, NUM_TOKENS, PROB_BITS, Encoded, SharedCodec, _decode_images, search_shared
from ._version import __version__ as _version

__all__ = ["CODEC", "SHARED_FORMAT_VERSION", "SharedCoreFile", "fit_for_dataset", "write_shared_file"]

CODEC = "shared"  # the root attribute ``codec`` that tells this kind from MPS core files (which have none)
SHARED_FORMAT_VERSION = 4  # versions 1-3 are MPS cores; a reader of those refuses 4 with its upgrade message
_SHARED_ARRAYS = ("basis", "mean", "group_classes", "freq")
_CODES_CHUNK = 1 << 16  # bytes per /codes chunk: a random item reads one or two small chunks
_INDEX_CHUNK = 1 << 14  # entries per chunk of /offsets, /mse, /targets
#: Raw pixels of the training split read to fit the shared part; larger splits are sampled with a stride.
FIT_SAMPLE_BYTES = 256 << 20


def _names(f: h5py.File) -> list[str]:
    """Datasets in checksum order: the shared part, then the per-image data."""
    shared = [f"shared/{name}" for name in _SHARED_ARRAYS if name in f.get("shared", {})]
    return shared + ["codes", "offsets", "mse", "targets"]


# ---------------------------------------------------------------------------------------------------
# Fitting and writing
def fit_for_dataset(sample: torch.Tensor, bytes_ratio: float, dataset_size: int) -> SharedCodec:
    """The shared part a dataset builds for a byte budget: :func:`mpsdata._shared.search_shared` on the sample
    (transform, block and colour chosen by PSNR on held-out halves), the winner refitted on the whole sample.

    Args:
        sample: uint8 ``(N, C, H, W)`` images of the training split.
        bytes_ratio: Mean stored bytes per image (byte string + 4-byte length) plus the shared part divided by
            ``dataset_size``, over the raw ``C H W`` bytes, on the sample.
        dataset_size: Images of the training split the shared part is amortised over.
    """
    if sample.shape[0] < 2:
        raise ValueError(f"the shared codec is fitted on at least 2 training images, got {sample.shape[0]}")
    return search_shared(sample, bytes_ratio, dataset_size=dataset_size)["codec"]


def write_shared_file(
    path: str | os.PathLike,
    codec: SharedCodec,
    batches: Iterable[tuple[torch.Tensor, Any]],
    *,
    num_samples: int,
    image_mode: str,
    settings: dict[str, Any],
    meta: dict[str, Any],
    progress: bool = True,
    compression: str | None = DEFAULT_COMPRESSION,
) -> Path:
    """Encode batches of images with a fitted shared codec into a core file, atomically.

    Args:
        path: Final file path; the file appears only once complete (written to a temporary name first).
        codec: The shared part (fitted on the training split; encoding only projects onto it).
        batches: ``(images, targets)`` with images uint8 ``(B, C, H, W)`` of the codec's shape.
        num_samples: Total number of images the batches yield.
        image_mode: PIL mode of the items (``"L"`` or ``"RGB"``).
        settings: Everything the file must match to be reused (stored as JSON, checked on open).
        meta: Source identity, class names, where the shared part was fitted (stored as JSON).
        progress: Show a tqdm progress bar.
        compression: HDF5 filter of every dataset but ``/codes``, as in :func:`mpsdata._archive.write_core_file`.

    Returns:
        The path of the written file.
    """
    from tqdm.auto import tqdm

    filters = filter_options(compression)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    shape = tuple(codec.shape)
    index_chunks = {"chunks": (max(1, min(num_samples + 1, _INDEX_CHUNK)),), **filters} if filters else {}
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110"), locking=False, track_order=True) as f:
            arrays, codec_settings = codec.state()
            group = f.create_group("shared", track_order=True)
            for name in _SHARED_ARRAYS:
                if name in arrays:
                    group.create_dataset(name, data=arrays[name], track_times=False, **filters)
            codes = f.create_dataset("codes", shape=(0,), maxshape=(None,), dtype=np.uint8,
                                     chunks=(_CODES_CHUNK,), track_times=False)  # fmt: skip
            offsets = f.create_dataset("offsets", shape=(num_samples + 1,), dtype=np.uint64, track_times=False,
                                       **index_chunks)  # fmt: skip
            one = {**index_chunks, "chunks": (max(1, min(num_samples, _INDEX_CHUNK)),)} if filters else {}
            mse_ds = f.create_dataset("mse", shape=(num_samples,), dtype=np.float32, track_times=False, **one)
            targets_ds = f.create_dataset("targets", shape=(num_samples,), dtype=np.int64, track_times=False, **one)
            offsets[0] = 0
            written = 0
            bar = tqdm(total=num_samples, desc="encoding", unit="img", disable=not progress or None)
            try:
                for images, targets in batches:
                    images = torch.as_tensor(images)
                    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != shape:
                        raise ValueError(f"every batch must be uint8 (B, {', '.join(map(str, shape))}), got "
                                         f"{images.dtype} {tuple(images.shape)}")  # fmt: skip
                    n = images.shape[0]
                    if written + n > num_samples:
                        raise ValueError(f"the batches yield more than the announced {num_samples} images")
                    enc = codec.encode(images)
                    decoded = codec.decode(enc)  # what a reader gets back: the stored MSE is of these
                    mse = (decoded.double() - images.double()).square().flatten(1).mean(1)
                    start = codes.shape[0]
                    codes.resize((start + enc.data.shape[0],))
                    codes[start:] = enc.data
                    offsets[written + 1 : written + n + 1] = (start + enc.offsets[1:]).astype(np.uint64)
                    mse_ds[written : written + n] = mse.numpy().astype(np.float32)
                    targets_ds[written : written + n] = np.asarray(targets, dtype=np.int64)
                    written += n
                    bar.update(n)
            finally:
                bar.close()
            check_written(written, num_samples)
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = SHARED_FORMAT_VERSION
            f.attrs["codec"] = CODEC
            f.attrs["codec_settings"] = json.dumps(codec_settings, sort_keys=True)
            f.attrs["mpsdata_version"] = _version
            f.attrs["image_mode"] = image_mode
            f.attrs["num_samples"] = num_samples
            f.attrs["settings"] = json.dumps(settings, sort_keys=True)
            f.attrs["meta"] = json.dumps(meta, sort_keys=True)
            f.attrs["content_sha256"] = _hash_datasets(f, write=True, names=_names(f))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------------------------------
# Reading
def _codec_from(f: h5py.File, path: Path) -> SharedCodec:
    """The stored shared part, checksummed and checked so that the rANS decoder cannot be steered out of range."""
    settings = json.loads(f.attrs["codec_settings"])
    arrays = {name: _checked(f, f"shared/{name}") for name in _SHARED_ARRAYS if name in f["shared"]}
    freq = arrays["freq"].astype(np.int64)
    classes = arrays["group_classes"].astype(np.int64)
    if freq.ndim != 2 or freq.shape[1] != NUM_TOKENS or (freq < 1).any() or (freq.sum(1) != 1 << PROB_BITS).any():
        raise MPSDataError(f"core file {path}: /shared/freq is not a table of {NUM_TOKENS} positive frequencies "
                           f"per context summing to 2**{PROB_BITS} (shape {freq.shape})")  # fmt: skip
    if classes.size and classes.max() >= freq.shape[0]:
        raise MPSDataError(f"core file {path}: /shared/group_classes names a context beyond the {freq.shape[0]} tables")
    try:
        codec = SharedCodec.from_state(arrays, settings)
        c, h, w = codec.shape
        area = codec.block * codec.block
        k = area if codec.basis is None else codec.basis.shape[1]
        ok = (
            min(c, h, w, codec.block) > 0
            and h % codec.block == 0
            and w % codec.block == 0
            and codec.mean.shape == (c, area)
            and (codec.basis is None or (codec.basis.shape[0] == c and codec.basis.shape[2] == area and k <= area))
            and codec.step > 0
        )
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise MPSDataError(f"core file {path}: the stored shared part is malformed ({error})") from None
    if not ok:
        raise MPSDataError(
            f"core file {path}: the stored shared part does not fit images of shape {codec.shape} (block "
            f"{codec.block}, mean {codec.mean.shape}, basis {None if codec.basis is None else codec.basis.shape})"
        )
    return codec


class SharedCoreFile(ProcessLocalFile):
    """Read-only access to a shared-codec core file, safe across ``fork`` and ``spawn``; the reading interface
    of :class:`mpsdata._archive.CoreFile` (``decode``, ``decode_one``, ``verify``, ``targets``, ``mse``,
    ``meta``, ``settings``, ``nbytes``, ``format_version``).

    Metadata, targets, per-image figures, offsets and the shared part are read (checksummed) in ``__init__`` and
    the file is closed. The byte strings are loaded lazily in each process: whole (checksummed) when they fit
    ``IN_MEMORY_LIMIT``, otherwise read per request.

    Args:
        path: The core file.
        expected_settings: Settings the caller asked for; a file built with other settings raises.
    """

    codec_name = CODEC
    _PROCESS_LOCAL = ("_memory",)
    _memory: np.ndarray | None  # every byte string, back to back (when they fit IN_MEMORY_LIMIT)
    _KIND = "shared-codec core file"
    _ERRORS = (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError)

    def _read_metadata(self, f: h5py.File) -> None:
        if f.attrs.get("format") != FORMAT or f.attrs.get("codec") != CODEC:
            raise MPSDataError(f"{self.path} is not a shared-codec core file (format {f.attrs.get('format')!r}, "
                               f"codec {f.attrs.get('codec')!r})")  # fmt: skip
        version = int(f.attrs["format_version"])
        if version != SHARED_FORMAT_VERSION:
            hint = "upgrade mpsdata (`pip install -U mpsdata`)" if version > SHARED_FORMAT_VERSION else "rebuild it"
            raise MPSDataError(f"shared-codec core file {self.path} has format version {version}; this mpsdata "
                               f"reads version {SHARED_FORMAT_VERSION}: {hint}")  # fmt: skip
        self.format_version = version
        self.settings: dict[str, Any] = json.loads(f.attrs["settings"])
        self.meta: dict[str, Any] = json.loads(f.attrs["meta"])
        self.image_mode = str(f.attrs["image_mode"])
        self.content_sha256 = str(f.attrs["content_sha256"])
        self.codec = _codec_from(f, self.path)
        if list(self.codec.shape) != self.settings.get("image_shape", list(self.codec.shape)):
            raise MPSDataError(f"core file {self.path}: the shared part is for images {self.codec.shape}, the settings "
                               f"say {self.settings.get('image_shape')}")  # fmt: skip
        self.targets = torch.from_numpy(_checked(f, "targets"))
        self.mse = torch.from_numpy(_checked(f, "mse"))
        offsets = _checked(f, "offsets").astype(np.int64)
        n = self.targets.shape[0]
        total = int(f["codes"].shape[0])
        lengths = np.diff(offsets)
        if (
            offsets.shape != (n + 1,)
            or self.mse.shape != (n,)
            or offsets[0] != 0
            or offsets[-1] != total
            or (lengths < 4).any()
        ):
            raise MPSDataError(f"core file {self.path}: /offsets, /mse and /targets do not describe {n} byte strings "
                               f"over the {total} bytes of /codes")  # fmt: skip
        self.offsets = offsets
        self.num_samples = n
        self.nbytes = self.path.stat().st_size
        # A corrupted byte string makes the rANS decoder read on: give it a zero tail it cannot run past (each
        # value consumes at most 5 bytes once the state starts in range, which _check_states enforces).
        self._tail = 5 * self.codec.num_coefficients + 8

    def __len__(self) -> int:
        return self.num_samples

    # -- figures ----------------------------------------------------------------------------------------------
    @property
    def shared_nbytes(self) -> int:
        """Bytes of the shared part as the budget counts them (:attr:`mpsdata._shared.SharedCodec.shared_nbytes`)."""
        return self.codec.shared_nbytes

    @property
    def image_nbytes(self) -> np.ndarray:
        """Bytes per image as the budget counts them, ``int64 (N,)``: its byte string plus a 4-byte length."""
        return Encoded(np.zeros(0, np.uint8), self.offsets).nbytes

    @property
    def amortised_bytes_ratio(self) -> float:
        """Mean :attr:`image_nbytes` plus the shared part divided by the images it was fitted for (the training
        split's size), over the raw uint8 bytes: the budget's accounting. The file's own bytes are :attr:`nbytes`."""
        raw = math.prod(self.codec.shape)
        fit_images = int(self.meta.get("shared_fit", {}).get("images") or max(1, self.num_samples))
        per_image = float(self.image_nbytes.mean()) if self.num_samples else 0.0
        return (per_image + self.shared_nbytes / fit_images) / raw

    # -- the byte strings, loaded per process ------------------------------------------------------------
    def load(self) -> np.ndarray:
        """Every byte string, back to back with a zero tail, read once per process and checksummed."""
        if self._memory is None:  # arrays inherited through fork stay valid; only handles do not
            codes = _checked(self._file(), "codes")
            self._memory = np.concatenate([codes, np.zeros(self._tail, np.uint8)])
            self._check_states(self._memory, self.offsets[:-1])
        return self._memory

    def _check_states(self, data: np.ndarray, starts: np.ndarray) -> None:
        """Every byte string opens with the coder's 32-bit state, which an intact one keeps at or above 2**23."""
        head = data[starts[:, None] + np.arange(4)].astype(np.int64)
        states = (head[:, 0] << 24) | (head[:, 1] << 16) | (head[:, 2] << 8) | head[:, 3]
        if (states < _RANS_L).any():
            raise MPSDataError(f"core file {self.path}: a byte string does not start with a valid coder state; the "
                               "file is corrupted, delete it to rebuild it")  # fmt: skip

    def _encoded(self, idx: np.ndarray) -> tuple[Encoded, np.ndarray]:
        """The byte strings of ``idx``: ``(Encoded, rows of idx in it)``."""
        if self._memory is not None or int(self.offsets[-1]) <= IN_MEMORY_LIMIT:
            return Encoded(self.load(), self.offsets), idx
        # Too large to hold: read each requested string (the checksums are checked by `verify`).
        unique, rows = np.unique(idx, return_inverse=True)
        f = self._file()
        parts = [_read(f, "codes", slice(int(self.offsets[i]), int(self.offsets[i + 1]))) for i in unique]
        offsets = np.zeros(unique.size + 1, np.int64)
        np.cumsum([p.shape[0] for p in parts], out=offsets[1:])
        data = np.concatenate([*parts, np.zeros(self._tail, np.uint8)])
        self._check_states(data, offsets[:-1])
        return Encoded(data, offsets), rows

    # -- decoding ---------------------------------------------------------------------------------------------
    def decode(self, indices, device: torch.device | str | None = None) -> torch.Tensor:
        """uint8 images ``(len(indices), C, H, W)``; the inverse transform runs on ``device`` (default CPU)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.num_samples or idx.max() >= self.num_samples):
            raise IndexError(f"index out of range for {self.num_samples} images")
        idx = idx % max(self.num_samples, 1)
        enc, rows = self._encoded(idx)
        return self.codec.decode(enc, rows, device=device)

    def decode_one(self, index: int) -> np.ndarray:
        """One uint8 image as ``(H, W)`` or ``(H, W, C)``, the path behind ``__getitem__``.

        The kernel of :meth:`decode` on the CPU (so the same pixels), called once without its batch bookkeeping.
        """
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} images")
        index %= self.num_samples  # offsets hold N + 1 entries: offsets[-1] is the end, not image N - 1
        if self._memory is None and int(self.offsets[-1]) > IN_MEMORY_LIMIT:
            image = self.decode([index])[0].numpy()
        else:
            codec = self.codec
            out = np.empty((1, *codec.shape), np.uint8)
            _decode_images(self.load(), self.offsets, np.array([index]), codec.classes, codec.freq, codec._cum,
                           codec._lookup, codec.step, *codec._cpu_constants(), out)  # fmt: skip
            image = out[0]
        return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)

    def verify(self) -> dict[str, Any]:
        """Check every checksum and decode every image (against the stored MSE's count); returns a report."""
        with h5py.File(self.path, "r", locking=False) as f:
            total = _hash_datasets(f, write=False, names=_names(f))
        if total != self.content_sha256:
            raise MPSDataError(f"core file {self.path}: content checksum mismatch, the file is corrupted")
        decoded = 0
        for start in range(0, self.num_samples, 4096):
            decoded += self.decode(np.arange(start, min(start + 4096, self.num_samples))).shape[0]
        return {"path": str(self.path), "images": decoded, "content_sha256": total}
