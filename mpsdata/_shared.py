"""Dataset-level shared representation: shared cores, a small quantised per-image core, a shared entropy model.

A per-image MPS pays for everything an image has in common with the rest of the dataset. Here the dataset
shares the expensive part once:

* a **shared basis** (the "shared cores"): per colour channel, an orthonormal basis of image blocks, either
  learned from a sample (``transform="pca"``: the Karhunen-Loeve basis, which is what a dataset-level tensor
  train with the sample index as its last site becomes at full bonds) or the fixed orthonormal 2-D DCT
  (``transform="dct"``, nothing to store); with blocks, the DC coefficients of all blocks get a second,
  global DCT (``dc_transform``), so smooth regions cost little;
* a **per-image core**: the image's coefficients in that basis, quantised with one uniform step (the
  MSE-optimal quantiser for an orthonormal transform at high rate: the pixel-domain error is the
  coefficient-domain error), optionally after an orthonormal luma/chroma transform of RGB;
* a **shared entropy model**: coefficients are grouped into classes by their typical magnitude on the fit
  sample (four classes per octave of ``mean |c| / step``); each class has one static frequency table, and
  every image's coefficients are coded with rANS (Duda 2013; byte-wise renormalisation as in Giesen's
  ``ryg_rans``) into a byte string of its own, so any image decodes alone.

Bytes per image are the length of its byte string plus a 4-byte length field (the file stores one uint32
length per image); the shared part (basis, mean, class map, tables) is counted separately by
:attr:`SharedCodec.shared_nbytes` and amortised over the dataset by the caller.

Encoding a new image projects it onto the shared basis; nothing is refitted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import torch

from ._signal import dct_matrix, psnr

__all__ = [
    "COLOUR_YCC",
    "Encoded",
    "SharedCodec",
    "colour_transform",
    "fit_shared",
    "search_shared",
]

# Orthonormal luma/chroma transform (rows: luma, blue-red, green-magenta). Orthonormal, so a uniform
# quantiser's error in these channels is the same error in RGB: the PSNR budget is spent where it pays.
COLOUR_YCC = np.array(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
        [1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)],
        [1 / math.sqrt(6), -2 / math.sqrt(6), 1 / math.sqrt(6)],
    ]
)

_YCC = COLOUR_YCC.copy()  # a frozen copy for the numba kernels

PROB_BITS = 15  # frequency tables sum to 2**15
_EXACT = 15  # values -15..15 have a token of their own
_LENGTHS = 24  # escape tokens: sign x bit length of |v| - 15 (1..24 bits), the rest of the bits raw
NUM_TOKENS = 2 * _EXACT + 1 + 2 * _LENGTHS
_CLASSES_PER_OCTAVE = 4
_CLASS_LO, _CLASS_HI = -40, 40  # class = round(4 log2(mean|c| / step)), clipped
_LENGTH_FIELD = 4  # bytes per image for its stored length (uint32)


# ---------------------------------------------------------------------------------------------------
# Transforms
def colour_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Orthonormal RGB <-> luma/chroma (:data:`COLOUR_YCC`) on the channel dim of ``(..., 3, H, W)``.

    Example:
        >>> x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
        >>> bool(torch.allclose(colour_transform(colour_transform(x), inverse=True), x))
        True
    """
    mat = torch.as_tensor(COLOUR_YCC, dtype=x.dtype, device=x.device)
    if inverse:
        mat = mat.T
    return torch.einsum("ij,...jhw->...ihw", mat, x)


# ---------------------------------------------------------------------------------------------------
# rANS with static tables (numba)
_JIT: dict[str, Any] = {"nogil": True, "cache": True}
_RANS_L = 1 << 23


@numba.njit(**_JIT)
def _token(v):
    """Token of a value and its raw part (bits, value)."""
    a = abs(v)
    if a <= _EXACT:
        return v + _EXACT, 0, 0
    e = a - _EXACT  # >= 1
    nb = 0
    t = e
    while t > 0:
        nb += 1
        t >>= 1
    tok = 2 * _EXACT + 1 + 2 * (nb - 1) + (1 if v < 0 else 0)
    return tok, nb - 1, e - (1 << (nb - 1))


@numba.njit(**_JIT)
def _put(x, buf, ptr, cum, freq):
    x_max = ((_RANS_L >> PROB_BITS) << 8) * freq
    while x >= x_max:
        ptr -= 1
        buf[ptr] = x & 0xFF
        x >>= 8
    x = ((x // freq) << PROB_BITS) + (x % freq) + cum
    return x, ptr


@numba.njit(**_JIT)
def _encode_one(q, ctx, freq, cum, buf):
    """rANS-encode one image's values ``q`` (contexts ``ctx``) into the end of ``buf``; returns the start."""
    x = _RANS_L
    ptr = buf.shape[0]
    for i in range(q.shape[0] - 1, -1, -1):
        tok, bits, raw = _token(q[i])
        # raw bits, in chunks of <= 8, pushed high chunk first (the decoder reads low chunk first)
        nchunks = (bits + 7) // 8
        for ch in range(nchunks - 1, -1, -1):
            width = min(8, bits - 8 * ch)
            val = (raw >> (8 * ch)) & ((1 << width) - 1)
            f = 1 << (PROB_BITS - width)
            x, ptr = _put(x, buf, ptr, val * f, f)
        c = ctx[i]
        x, ptr = _put(x, buf, ptr, cum[c, tok], freq[c, tok])
    for _ in range(4):
        ptr -= 1
        buf[ptr] = x & 0xFF
        x >>= 8
    return ptr


@numba.njit(**_JIT)
def _encode_batch(q, ctx, freq, cum, bound, out, lengths):
    """Encode rows of ``q`` back to back into ``out``; returns the bytes used."""
    buf = np.empty(bound, np.uint8)
    pos = 0
    for n in range(q.shape[0]):
        start = _encode_one(q[n], ctx, freq, cum, buf)
        size = bound - start
        out[pos : pos + size] = buf[start:]
        lengths[n] = size
        pos += size
    return pos


@numba.njit(**_JIT)
def _decode_one(data, start, count, ctx, freq, cum, lookup, out):
    """Decode ``count`` values from ``data[start:]`` into ``out`` (the inverse of :func:`_encode_one`)."""
    mask = (1 << PROB_BITS) - 1
    x = 0
    pos = start
    for _ in range(4):
        x = (x << 8) | data[pos]
        pos += 1
    for i in range(count):
        c = ctx[i]
        slot = x & mask
        tok = lookup[c, slot]
        x = freq[c, tok] * (x >> PROB_BITS) + slot - cum[c, tok]
        while x < _RANS_L:
            x = (x << 8) | data[pos]
            pos += 1
        if tok <= 2 * _EXACT:
            out[i] = tok - _EXACT
            continue
        k = tok - (2 * _EXACT + 1)
        bits = k // 2
        raw = 0
        for ch in range((bits + 7) // 8):
            width = min(8, bits - 8 * ch)
            shift = PROB_BITS - width
            slot = x & mask
            val = slot >> shift
            x = (1 << shift) * (x >> PROB_BITS) + slot - (val << shift)
            while x < _RANS_L:
                x = (x << 8) | data[pos]
                pos += 1
            raw |= val << (8 * ch)
        v = _EXACT + (1 << bits) + raw
        out[i] = -v if k % 2 else v


@numba.njit(**_JIT)
def _decode_batch(data, offsets, rows, count, ctx, freq, cum, lookup, out):
    for r in range(rows.shape[0]):
        n = rows[r]
        _decode_one(data, offsets[n], count, ctx, freq, cum, lookup, out[r])


# ---------------------------------------------------------------------------------------------------
# Inverse transform on the CPU (numba, float64). One kernel serves batches and single items, so an item decodes
# to exactly the pixels of its batch decode: every pixel is the same sequence of IEEE float64 operations
# (fixed loop order, no fast-math, so no reassociation or fused multiply-add) whatever the batch.
@numba.njit(**_JIT)
def _inverse_one(coeffs, basis, mean, dct_h, dct_w, ycc, out):
    """Dequantised coefficients ``(V,)`` (storage order: channel, block, basis index) to uint8 ``out (C, H, W)``.

    ``dct_h``/``dct_w``: the DC plane's DCT matrices, empty without ``dc_transform``; ``ycc``: luma/chroma input.
    """
    c, k_num, area = basis.shape
    h, w = out.shape[1], out.shape[2]
    block = int(np.sqrt(area) + 0.5)
    bh, bw = h // block, w // block
    nb = bh * bw
    dc = np.empty((c, nb))
    for ch in range(c):
        for b in range(nb):
            dc[ch, b] = coeffs[(ch * nb + b) * k_num]
    if dct_h.shape[0] > 0:  # the DC plane's second-level DCT, inverted: dct_h.T @ plane @ dct_w
        rows = np.empty((bh, bw))
        for ch in range(c):
            for a in range(bh):
                for j in range(bw):
                    s = 0.0
                    for i in range(bh):
                        s += dct_h[i, a] * coeffs[(ch * nb + i * bw + j) * k_num]
                    rows[a, j] = s
            for a in range(bh):
                for b in range(bw):
                    s = 0.0
                    for j in range(bw):
                        s += rows[a, j] * dct_w[j, b]
                    dc[ch, a * bw + b] = s
    pixels = np.empty((c, h, w))
    acc = np.empty(area)
    for ch in range(c):
        for b in range(nb):
            acc[:] = 0.0
            base = (ch * nb + b) * k_num
            for k in range(k_num):
                v = dc[ch, b] if k == 0 else coeffs[base + k]
                if v != 0.0:  # most quantised coefficients are zero; adding 0.0 would change no sum
                    row = basis[ch, k]
                    for p in range(area):
                        acc[p] += v * np.float64(row[p])
            top, left = (b // bw) * block, (b % bw) * block
            for r in range(block):
                for s in range(block):
                    pixels[ch, top + r, left + s] = acc[r * block + s] + mean[ch, r * block + s]
    if ycc:  # orthonormal inverse: RGB = COLOUR_YCC.T @ (luma, chroma, chroma)
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    v = _YCC[0, ch] * pixels[0, y, x] + _YCC[1, ch] * pixels[1, y, x] + _YCC[2, ch] * pixels[2, y, x]
                    out[ch, y, x] = np.uint8(min(max(np.rint(v), 0.0), 255.0))
    else:
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    out[ch, y, x] = np.uint8(min(max(np.rint(pixels[ch, y, x]), 0.0), 255.0))


@numba.njit(**_JIT)
def _reconstruct_batch(coeffs, basis, mean, dct_h, dct_w, ycc, out):
    for n in range(coeffs.shape[0]):
        _inverse_one(coeffs[n], basis, mean, dct_h, dct_w, ycc, out[n])


@numba.njit(**_JIT)
def _decode_images(data, offsets, rows, ctx, freq, cum, lookup, step, basis, mean, dct_h, dct_w, ycc, out):
    """rANS-decode, dequantise and invert the images ``rows`` of ``data`` into uint8 ``out (n, C, H, W)``."""
    q = np.empty(ctx.shape[0], np.int64)
    coeffs = np.empty(ctx.shape[0])
    for r in range(rows.shape[0]):
        _decode_one(data, offsets[rows[r]], ctx.shape[0], ctx, freq, cum, lookup, q)
        for i in range(q.shape[0]):
            coeffs[i] = q[i] * step
        _inverse_one(coeffs, basis, mean, dct_h, dct_w, ycc, out[r])


def _tokens_of(q: np.ndarray) -> np.ndarray:
    """Vectorised :func:`_token` (token only)."""
    tok = q + _EXACT
    big = np.abs(q) > _EXACT
    if big.any():
        v = q[big]
        nb = np.frexp((np.abs(v) - _EXACT).astype(np.float64))[1]  # bit length of |v| - 15
        tok[big] = 2 * _EXACT + 1 + 2 * (nb - 1) + (v < 0)
    return tok


def _tables(counts: np.ndarray) -> np.ndarray:
    """Frequency tables from token counts: each row sums to ``2**PROB_BITS``, every token gets at least 1."""
    total = 1 << PROB_BITS
    n_ctx, n_tok = counts.shape
    prior = counts.astype(np.float64) + 0.02  # unseen tokens stay codable, at ~15-20 bits
    scaled = prior / prior.sum(1, keepdims=True) * (total - n_tok)
    freq = np.floor(scaled).astype(np.int64) + 1
    short = total - freq.sum(1)
    # hand the rounding remainder to the tokens that lost most to the floor
    order = np.argsort(-(scaled - np.floor(scaled)), axis=1, kind="stable")
    for c in range(n_ctx):
        freq[c, order[c, : short[c]]] += 1
    return freq


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """Entropy-coded images: one byte string per image, back to back.

    Attributes:
        data: All byte strings, ``uint8 (total,)``.
        offsets: ``int64 (N + 1,)``; image ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
    """

    data: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def nbytes(self) -> np.ndarray:
        """Stored bytes per image, ``int64 (N,)``: its byte string plus a 4-byte (uint32) length field."""
        return np.diff(self.offsets) + _LENGTH_FIELD


@dataclass(eq=False)
class SharedCodec:
    """A fitted shared representation (see the module docstring); make one with :func:`fit_shared`.

    Attributes:
        shape: Image shape ``(C, H, W)``.
        colour: ``"rgb"`` or ``"ycc"`` (orthonormal luma/chroma; only for ``C == 3``).
        transform: ``"pca"`` (learned basis) or ``"dct"``.
        block: Block size; blocks tile the image (``block`` divides ``H`` and ``W``).
        step: Quantisation step of the coefficients (pixel units, as the basis is orthonormal).
        basis: ``(C, K, block**2)`` float32 rows of the basis (``K <= block**2``; ``None`` for the DCT).
        mean: ``(C, block**2)`` float32 subtracted before projecting (zeros for the DCT).
        dc_transform: Whether block DCs get a second, global DCT.
        group_classes: ``int64 (G,)`` context of every statistic group: ``(channel, basis index)``, and with
            ``dc_transform`` each DC-plane position; every coefficient of an image takes its group's context.
        freq: ``int64 (contexts, NUM_TOKENS)`` frequency tables.
        rdoq: Rate-distortion optimised quantisation: a coefficient moves one level toward zero when that
            saves more than ``rdoq * step**2`` squared error per bit saved (0: plain rounding).
    """

    shape: tuple[int, int, int]
    colour: str
    transform: str
    block: int
    step: float
    basis: np.ndarray | None
    mean: np.ndarray
    dc_transform: bool
    group_classes: np.ndarray
    freq: np.ndarray
    rdoq: float = 0.0
    classes: np.ndarray = field(init=False, repr=False)  # (V,) context of every coefficient, storage order
    _cum: np.ndarray = field(init=False, repr=False)
    _lookup: np.ndarray = field(init=False, repr=False)
    _constants: dict = field(init=False, repr=False, default_factory=dict)  # device -> inverse's tensors

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_constants": {}}  # rebuilt where used, never shipped (may live on a GPU)

    def __post_init__(self) -> None:
        k = self.block * self.block if self.basis is None else self.basis.shape[1]
        self.classes = np.ascontiguousarray(self.group_classes[_groups(self.shape, self.block, k, self.dc_transform)])
        self._cum, self._lookup = _decoder_tables(self.freq)

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def num_coefficients(self) -> int:
        """Coefficients per image ``V`` (the per-image core)."""
        return int(self.classes.shape[0])

    @property
    def shared_nbytes(self) -> int:
        """Bytes of the shared part: basis and mean as float16, class map as uint8, tables as uint16."""
        basis = 0 if self.basis is None else self.basis.size * 2
        mean = 0 if self.transform == "dct" else self.mean.size * 2
        return basis + mean + self.group_classes.shape[0] + self.freq.size * 2 + 64  # + scalar settings

    # -- transform --------------------------------------------------------------------------------------
    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Unquantised coefficients ``(N, V)`` float64 of images ``(N, C, H, W)`` (or ``(N, H, W)`` gray)."""
        x = _images(x, self.shape).to(torch.float64)
        return _forward(x, self, x.device)

    def _quantize(self, coeffs: torch.Tensor) -> np.ndarray:
        scaled = (coeffs / self.step).cpu().numpy()
        if self.rdoq > 0:
            return _rdoq(scaled, self.classes, self.freq, self.rdoq)
        return np.round(scaled).astype(np.int64)

    # -- coding ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Encoded:
        """Project images onto the shared basis, quantise and entropy-code them.

        Args:
            x: ``(N, C, H, W)`` (or ``(N, H, W)`` for gray) uint8 images (floats are read on the 0..255 scale),
                on any device.

        Returns:
            The byte strings (:class:`Encoded`).
        """
        q = self._quantize(self.coefficients(x))
        return _encode(q, self.classes, self.freq, self._cum)

    def decode(self, enc: Encoded, index: Sequence[int] | np.ndarray | None = None, *, device=None) -> torch.Tensor:
        """Decode images (all, or those at ``index``) to uint8 ``(n, C, H, W)``.

        Args:
            enc: What :meth:`encode` returned (or read back from a file).
            index: Which images; ``None`` for all.
            device: Where to run the inverse transform and return the images (default CPU).
        """
        rows = np.arange(len(enc)) if index is None else np.asarray(index, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(enc)):
            raise IndexError(f"index out of range for {len(enc)} encoded images")
        if torch.device(device or "cpu").type == "cpu":
            out = np.empty((rows.size, *self.shape), np.uint8)
            _decode_images(enc.data, enc.offsets, rows, self.classes, self.freq, self._cum, self._lookup, self.step,
                           *self._cpu_constants(), out)  # fmt: skip
            return torch.from_numpy(out)
        q = np.empty((rows.size, self.num_coefficients), np.int64)
        _decode_batch(enc.data, enc.offsets, rows, self.num_coefficients, self.classes, self.freq, self._cum,
                      self._lookup, q)  # fmt: skip
        return self.reconstruct_coefficients(torch.from_numpy(q).to(device or "cpu").to(torch.float64) * self.step)

    def decode_one(self, data: bytes | np.ndarray, *, device=None) -> torch.Tensor:
        """Decode one image's byte string (as a file's reader has it) to uint8 ``(C, H, W)``."""
        buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
        enc = Encoded(np.ascontiguousarray(buf, np.uint8), np.array([0, buf.shape[0]], np.int64))
        return self.decode(enc, device=device)[0]

    def reconstruct_coefficients(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Inverse transform of (dequantised) coefficients ``(N, V)`` to uint8 images ``(N, C, H, W)``.

        On the CPU a numba kernel does it, the same one behind :meth:`decode` and a file's per-item reads, so all
        three give identical pixels; on another device torch does it, summing in another order, so a pixel whose
        float64 value lies within summation noise of a half level may round the other way there.
        """
        if coeffs.device.type != "cpu":
            return _inverse(coeffs, self).round().clamp_(0, 255).to(torch.uint8)
        out = np.empty((coeffs.shape[0], *self.shape), np.uint8)
        _reconstruct_batch(np.ascontiguousarray(coeffs.numpy(), np.float64), *self._cpu_constants(), out)
        return torch.from_numpy(out)

    def _cpu_constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
        """The numba inverse's constants ``(basis (C, K, b*b), mean, dct_h, dct_w, ycc)``, built once."""
        if "numba" not in self._constants:
            b, mean_t, dct_h, dct_w = _inverse_constants(self, torch.device("cpu"))
            empty = np.zeros((0, 0))
            # A learned basis is float32 (float16-rounded) already: exact in float32, with half float64's memory
            # reads (the inverse is bound by them); the kernel multiplies in float64. The DCT's needs float64.
            basis_dtype = np.float64 if self.basis is None else np.float32
            self._constants["numba"] = (
                np.ascontiguousarray(b.numpy(), basis_dtype),
                np.ascontiguousarray(mean_t[0, :, 0].numpy(), np.float64),
                np.ascontiguousarray(dct_h.numpy()) if self.dc_transform else empty,
                np.ascontiguousarray(dct_w.numpy()) if self.dc_transform else empty,
                self.colour == "ycc",
            )
        return self._constants["numba"]

    def roundtrip(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Encode and decode: ``(uint8 images, bytes per image)`` (quicker than decoding the byte strings)."""
        q = self._quantize(self.coefficients(x))
        enc = _encode(q, self.classes, self.freq, self._cum)
        rec = self.reconstruct_coefficients(torch.from_numpy(q).to(torch.float64).to(x.device) * self.step)
        return rec, enc.nbytes

    # -- storage ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able settings that :meth:`from_state` rebuilds the codec from (for HDF5 files).

        The basis and mean are stored as float16 (what :attr:`shared_nbytes` counts); the codec in memory
        already uses the float16-rounded values, so a reloaded codec decodes identically.
        """
        arrays: dict[str, np.ndarray] = {
            "mean": self.mean.astype(np.float16),
            "group_classes": self.group_classes.astype(np.uint8),
            "freq": self.freq.astype(np.uint16),
        }
        if self.basis is not None:
            arrays["basis"] = self.basis.astype(np.float16)
        settings = {"shape": list(self.shape), "colour": self.colour, "transform": self.transform,
                    "block": self.block, "step": self.step, "dc_transform": self.dc_transform,
                    "rdoq": self.rdoq}  # fmt: skip
        return arrays, json.loads(json.dumps(settings))

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], settings: dict[str, Any]) -> SharedCodec:
        basis = arrays.get("basis")
        return cls(
            tuple(int(v) for v in settings["shape"]),  # type: ignore[arg-type]
            str(settings["colour"]),
            str(settings["transform"]),
            int(settings["block"]),
            float(settings["step"]),
            None if basis is None else np.asarray(basis, np.float32),
            np.asarray(arrays["mean"], np.float32),
            bool(settings["dc_transform"]),
            np.asarray(arrays["group_classes"], np.int64),
            np.asarray(arrays["freq"], np.int64),
            float(settings.get("rdoq", 0.0)),
        )

    def describe(self) -> str:
        """Short description, e.g. ``pca block 28 ycc step 24.0``."""
        text = f"{self.transform} block {self.block}"
        if self.shape[0] == 3:
            text += f" {self.colour}"
        if self.dc_transform:
            text += " +dc-dct"
        return f"{text} step {self.step:.4g}"


def _decoder_tables(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative frequencies and the slot -> token lookup of every context."""
    n_ctx, n_tok = freq.shape
    cum = np.zeros((n_ctx, n_tok + 1), np.int64)
    np.cumsum(freq, 1, out=cum[:, 1:])
    lookup = np.empty((n_ctx, 1 << PROB_BITS), np.uint8)  # NUM_TOKENS < 256: half the cache of int16
    for c in range(n_ctx):
        lookup[c] = np.repeat(np.arange(n_tok, dtype=np.uint8), freq[c])
    return cum, lookup


def _encode(q: np.ndarray, classes: np.ndarray, freq: np.ndarray, cum: np.ndarray) -> Encoded:
    n, v = q.shape
    if q.size and np.abs(q).max() >= _EXACT + (1 << _LENGTHS):
        raise ValueError(
            f"a quantised coefficient reaches {int(np.abs(q).max())}, beyond the coder's range "
            f"{_EXACT + (1 << _LENGTHS) - 1}; use a larger step"
        )
    if n == 0:
        return Encoded(np.zeros(0, np.uint8), np.zeros(1, np.int64))
    bound = v * 7 + 16  # <= 15 bits per token + 23 raw bits + renormalisation, per value
    lengths = np.zeros(n, np.int64)
    parts = []
    chunk = max(1, (64 << 20) // bound)
    for start in range(0, n, chunk):
        rows = q[start : start + chunk]
        out = np.empty(rows.shape[0] * bound, np.uint8)
        used = _encode_batch(np.ascontiguousarray(rows), classes, freq, cum, bound, out, lengths[start:])
        parts.append(out[:used].copy())
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(np.concatenate(parts), offsets)


# ---------------------------------------------------------------------------------------------------
# Forward and inverse transforms
def _images(x: torch.Tensor, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"images must be uint8 or floating point (0..255 scale), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"this codec was fitted on images of shape {tuple(shape)} (C, H, W), got {tuple(x.shape[1:])}")
    return x


def _block_basis(block: int, basis, device) -> torch.Tensor:
    """Rows of the block basis ``(C or 1, K, block**2)``: the stored PCA basis or the 2-D DCT."""
    if basis is not None:
        return torch.as_tensor(basis, dtype=torch.float64, device=device)
    d = dct_matrix(block, device=device)
    return torch.kron(d, d)[None]  # (1, b*b, b*b), the same for every channel


def _forward(x: torch.Tensor, codec: SharedCodec, device) -> torch.Tensor:
    return _forward_parts(x, codec.colour, codec.block, codec.basis, codec.mean, codec.dc_transform, device)


def _forward_parts(x, colour, block, basis, mean, dc_transform, device) -> torch.Tensor:
    n, c, h, w = x.shape
    if colour == "ycc":
        x = colour_transform(x)
    bh, bw = h // block, w // block
    blocks = x.reshape(n, c, bh, block, bw, block).permute(0, 1, 2, 4, 3, 5).reshape(n, c, bh * bw, block * block)
    mean_t = torch.as_tensor(mean, dtype=torch.float64, device=device)[None, :, None]
    b = _block_basis(block, basis, device)  # (C or 1, K, b*b)
    coeffs = (blocks - mean_t) @ b.expand(c, -1, -1).mT  # (N, C, blocks, K)
    if dc_transform:
        dc = coeffs[..., 0].reshape(n, c, bh, bw)
        dc = dct_matrix(bh, device=device) @ dc @ dct_matrix(bw, device=device).T
        coeffs = torch.cat([dc.reshape(n, c, bh * bw, 1), coeffs[..., 1:]], -1)
    return coeffs.reshape(n, -1)


def _inverse_constants(codec: SharedCodec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The inverse transform's constant tensors on ``device``, built once per codec and device: rebuilding them
    on every call took most of a single image's inverse (measured 0.27 ms per image before, 0.07 ms after)."""
    key = str(device)
    if key not in codec._constants:
        c, h, w = codec.shape
        bh, bw = h // codec.block, w // codec.block
        b = _block_basis(codec.block, codec.basis, device).expand(c, -1, -1)
        mean_t = torch.as_tensor(codec.mean, dtype=torch.float64, device=device)[None, :, None]
        codec._constants[key] = (b, mean_t, dct_matrix(bh, device=device), dct_matrix(bw, device=device))
    return codec._constants[key]


def _inverse(coeffs: torch.Tensor, codec: SharedCodec) -> torch.Tensor:
    c, h, w = codec.shape
    n = coeffs.shape[0]
    block = codec.block
    bh, bw = h // block, w // block
    b, mean_t, dct_h, dct_w = _inverse_constants(codec, coeffs.device)
    coeffs = coeffs.reshape(n, c, bh * bw, b.shape[1])
    if codec.dc_transform:
        dc = coeffs[..., 0].reshape(n, c, bh, bw)
        dc = dct_h.T @ dc @ dct_w
        coeffs = torch.cat([dc.reshape(n, c, bh * bw, 1), coeffs[..., 1:]], -1)
    blocks = coeffs @ b + mean_t
    x = blocks.reshape(n, c, bh, bw, block, block).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
    if codec.colour == "ycc":
        x = colour_transform(x, inverse=True)
    return x


# ---------------------------------------------------------------------------------------------------
# Fitting
def _fit_basis(x: torch.Tensor, colour: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA basis per channel over blocks (rows, largest variance first) and the mean, float16-rounded."""
    n, c, h, w = x.shape
    if colour == "ycc":
        x = colour_transform(x)
    bh, bw = h // block, w // block
    blocks = x.reshape(n, c, bh, block, bw, block).permute(1, 0, 2, 4, 3, 5).reshape(c, -1, block * block)
    mean = blocks.mean(1)
    centred = blocks - mean[:, None]
    cov = centred.mT @ centred / max(1, centred.shape[1] - 1)
    if cov.device.type == "cpu":  # LAPACK through numpy: several times faster than torch's on 2 cores here
        evecs = torch.from_numpy(np.linalg.eigh(cov.numpy())[1])
    else:
        evecs = torch.linalg.eigh(cov)[1]
    basis = evecs.flip(-1).mT  # (C, b*b, b*b) rows, largest variance first
    basis = basis.to(torch.float16).to(torch.float64)  # what the file stores
    mean = mean.to(torch.float16).to(torch.float64)
    return basis, mean


def _classes_for(mean_abs: np.ndarray, step: float) -> np.ndarray:
    ratio = np.maximum(mean_abs / step, 2.0**_CLASS_LO)
    cls = np.round(_CLASSES_PER_OCTAVE * np.log2(ratio)).astype(np.int64)
    return np.clip(cls, _CLASS_LO, _CLASS_HI) - _CLASS_LO


def _groups(shape: tuple[int, int, int], block: int, k: int, dc_transform: bool) -> np.ndarray:
    """Statistic group of every coefficient: ``(channel, basis index)``, or the DC-plane position for DCs."""
    c, h, w = shape
    nb = (h // block) * (w // block)
    g = np.broadcast_to(np.arange(c)[:, None, None] * k + np.arange(k)[None, None, :], (c, nb, k)).copy()
    if dc_transform:
        g[:, :, 0] = c * k + np.arange(c)[:, None] * nb + np.arange(nb)[None, :]
    return g.reshape(-1)


def _build(
    coeffs, shape, colour, transform, block, step, dc_transform, basis, mean, min_nonzero, rdoq
) -> tuple[SharedCodec, torch.Tensor]:
    """Codec for a given step from the sample's coefficients ``(N, V)`` in the full basis: truncate the basis,
    fit classes and tables. Returns the codec and the sample's coefficients in its (truncated) basis."""
    n = coeffs.shape[0]
    c = shape[0]
    k_all = block * block
    if transform == "pca":
        # keep the leading components up to the last one that is non-zero in at least `min_nonzero` images
        levels = torch.round(coeffs.reshape(n, c, -1, k_all) / step)
        nonzero = (levels != 0).to(torch.float64).mean((0, 2)).amax(0).cpu().numpy()  # (K,) over channels
        alive = np.flatnonzero(nonzero >= min_nonzero)
        keep = int(alive[-1]) + 1 if alive.size else 1
        basis = basis[:, :keep]
        coeffs = coeffs.reshape(n, c, -1, k_all)[..., :keep].reshape(n, -1)
        k = keep
    else:
        k = k_all
    groups = _groups(shape, block, k, dc_transform)
    mean_abs = np.zeros(groups.max() + 1)
    np.add.at(mean_abs, groups, coeffs.abs().mean(0).cpu().numpy())
    members = np.bincount(groups, minlength=mean_abs.size)
    mean_abs = np.divide(mean_abs, members, out=np.zeros_like(mean_abs), where=members > 0)
    group_classes = _classes_for(mean_abs, step)
    used = np.unique(group_classes[groups])
    remap = np.full(_CLASS_HI - _CLASS_LO + 1, 0, np.int64)
    remap[used] = np.arange(used.size)
    group_classes = remap[group_classes]
    classes = group_classes[groups]
    scaled = (coeffs / step).cpu().numpy()
    q = np.round(scaled).astype(np.int64)
    freq = _count_tables(q, classes, used.size)
    for _ in range(2 if rdoq > 0 else 0):  # decisions and tables settle in two rounds
        q = _rdoq(scaled, classes, freq, rdoq)
        freq = _count_tables(q, classes, used.size)
    basis_np = None if transform == "dct" else basis.cpu().numpy().astype(np.float32)
    mean_np = mean.cpu().numpy().astype(np.float32)
    codec = SharedCodec(
        shape, colour, transform, block, float(step), basis_np, mean_np, dc_transform, group_classes, freq, float(rdoq)
    )
    return codec, coeffs


@numba.njit(**_JIT)
def _count_kernel(q, classes, counts):
    for n in range(q.shape[0]):
        for i in range(q.shape[1]):
            counts[classes[i], _token(q[n, i])[0]] += 1


@numba.njit(**_JIT)
def _rdoq_kernel(scaled, classes, bits, lam, out):
    """Round, then move one level toward zero where squared error (in steps) + ``lam`` x bits drops."""
    for n in range(scaled.shape[0]):
        for i in range(scaled.shape[1]):
            s = scaled[n, i]
            q = np.int64(np.round(s))
            if q != 0:
                t = q - 1 if q > 0 else q + 1
                c = classes[i]
                cost_q = (s - q) ** 2 + lam * bits[c, _token(q)[0]]
                cost_t = (s - t) ** 2 + lam * bits[c, _token(t)[0]]
                if cost_t < cost_q:
                    q = t
            out[n, i] = q


def _count_tables(q: np.ndarray, classes: np.ndarray, n_ctx: int) -> np.ndarray:
    counts = np.zeros((n_ctx, NUM_TOKENS), np.int64)
    _count_kernel(np.ascontiguousarray(q), classes, counts)
    return _tables(counts)


def _code_bits(freq: np.ndarray) -> np.ndarray:
    """Bits each token costs in each context: ``-log2(freq / 2**PROB_BITS)`` plus its raw bits."""
    tokens = np.arange(freq.shape[1])
    raw = np.where(tokens > 2 * _EXACT, (tokens - (2 * _EXACT + 1)) // 2, 0)
    return PROB_BITS - np.log2(freq) + raw


def _rdoq(scaled: np.ndarray, classes: np.ndarray, freq: np.ndarray, lam: float) -> np.ndarray:
    """Rate-distortion optimised rounding of ``scaled`` (coefficients in steps) under the tables ``freq``."""
    out = np.empty(scaled.shape, np.int64)
    _rdoq_kernel(np.ascontiguousarray(scaled, np.float64), classes, _code_bits(freq), float(lam), out)
    return out


def fit_shared(
    sample: torch.Tensor,
    bytes_ratio: float | None = None,
    *,
    step: float | None = None,
    transform: str = "pca",
    block: int | None = None,
    colour: str = "ycc",
    dc_transform: bool | None = None,
    min_nonzero: float = 0.05,
    rdoq: float = 0.1,
    dataset_size: int | None = None,
) -> SharedCodec:
    """Fit a shared representation on a sample of a dataset, for a byte budget or a quantisation step.

    Args:
        sample: ``(N, C, H, W)`` or ``(N, H, W)`` uint8 images (floats on the 0..255 scale), any device.
        bytes_ratio: Mean stored bytes per image over raw uint8 bytes (``C H W``), measured on the sample
            (byte strings + length fields; with ``dataset_size``, plus the shared part divided by it). The
            step is found by bisection.
        step: Instead of ``bytes_ratio``, the quantisation step (pixel units).
        transform: ``"pca"`` (basis learned per channel from the sample's blocks) or ``"dct"``.
        block: Block size dividing ``H`` and ``W``; default the whole image for ``"pca"`` on square images
            up to 32x32, else 8 (or 4, or the whole image, whichever divides the size first).
        colour: ``"ycc"`` or ``"rgb"`` (ignored for gray images).
        dc_transform: Second-level DCT of the block DCs (default: for the DCT with more than one block).
        min_nonzero: PCA components beyond the last one that quantises to non-zero in at least this
            fraction of the sample are dropped: they cost basis bytes and rare, expensive symbols, and hardly
            any error (on Fashion-MNIST, 0.05 to 0.3 beat 0.002 at equal bytes; docs/bytes.md).
        rdoq: Rate-distortion optimised quantisation weight (see :class:`SharedCodec`); 0 rounds plainly.
            The default 0.1 gave +0.3 to +0.7 dB at equal bytes on Fashion-MNIST and 32x32 photo patches
            (0.05 to 0.15 were within 0.2 dB of it; docs/bytes.md).
        dataset_size: Images the shared part is amortised over when meeting ``bytes_ratio``.

    Returns:
        The fitted :class:`SharedCodec`.

    Raises:
        ValueError: bad shapes or options, or a budget no step meets.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> ramp = torch.arange(8.0)[:, None] + torch.arange(8.0)[None] * 10
        >>> x = (ramp + torch.randn(64, 8, 8, generator=g) * 4).clamp(0, 255).to(torch.uint8)
        >>> codec = fit_shared(x, bytes_ratio=0.2, transform="dct")
        >>> enc = codec.encode(x)
        >>> bool(enc.nbytes.mean() <= 0.2 * 64), codec.decode(enc).shape
        (True, torch.Size([64, 1, 8, 8]))
    """
    x = _images(sample)
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("the sample holds no image; fit on at least one")
    if transform not in ("pca", "dct"):
        raise ValueError(f"transform must be 'pca' or 'dct', got {transform!r}")
    if colour not in ("ycc", "rgb"):
        raise ValueError(f"colour must be 'ycc' or 'rgb', got {colour!r}")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    colour = colour if c == 3 else "rgb"
    if block is None:  # measured best: the whole image for PCA up to 32x32, else 8x8 (4x4 for 28x28) blocks
        fits = [b for b in (8, 4) if h % b == 0 and w % b == 0]
        block = h if (transform == "pca" and h == w and h <= 32) or not fits else fits[0]
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or h % block or w % block:
        raise ValueError(f"block must be a positive int dividing the image size {h}x{w}, got {block!r}")
    if dc_transform is None:
        dc_transform = transform == "dct" and (h // block) * (w // block) > 1
    if (bytes_ratio is None) == (step is None):
        raise ValueError(f"give exactly one of bytes_ratio or step; got bytes_ratio={bytes_ratio}, step={step}")
    xf = x.to(torch.float64)
    shape = (c, h, w)
    if transform == "pca":
        basis, mean = _fit_basis(xf, colour, block)
    else:
        basis, mean = None, torch.zeros(c, block * block, dtype=torch.float64, device=x.device)

    coeffs = _forward_parts(xf, colour, block, basis, mean, dc_transform, x.device)  # once: steps only rescale

    def make(s: float) -> tuple[SharedCodec, torch.Tensor]:
        return _build(coeffs, shape, colour, transform, block, s, dc_transform, basis, mean, min_nonzero, rdoq)

    if step is not None:
        if not step > 0:
            raise ValueError(f"step must be positive, got {step}")
        return make(float(step))[0]
    assert bytes_ratio is not None  # exactly one of the two, checked above
    if not 0 < bytes_ratio < math.inf:
        raise ValueError(f"bytes_ratio must be positive and finite, got {bytes_ratio}")
    budget = bytes_ratio * c * h * w
    q_cache: dict[float, SharedCodec] = {}

    def cost(s: float) -> float:
        codec, own = make(s)
        q_cache[s] = codec
        per_image = _encode(codec._quantize(own), codec.classes, codec.freq, codec._cum).nbytes.mean()
        if dataset_size:
            per_image += codec.shared_nbytes / dataset_size
        return float(per_image)

    lo, hi = 0.25, 4096.0  # log-bisection on the step: bytes fall as the step grows
    if cost(hi) > budget:
        raise ValueError(
            f"bytes_ratio {bytes_ratio} is too small: even step {hi} takes {cost(hi) / (c * h * w):.4f} of the raw "
            "bytes per image (length fields and the shared part included)"
        )
    if cost(lo) <= budget:
        return q_cache[lo]
    for _ in range(14):  # the step to within 0.1 %
        mid = math.sqrt(lo * hi)
        if cost(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return q_cache[hi]


def search_shared(
    sample: torch.Tensor,
    bytes_ratio: float,
    *,
    transforms: Sequence[str] = ("pca", "dct"),
    blocks: Sequence[int] | None = None,
    colours: Sequence[str] = ("ycc", "rgb"),
    dataset_size: int | None = None,
    seed: int = 0,
    max_images: int = 2000,
) -> dict[str, Any]:
    """Pick transform, block size and colour handling by PSNR at a byte budget on held-out images.

    The sample is split in half at random: every candidate is fitted on one half for the budget and scored
    on the other (PSNR on the uint8 scale, mean over images, and bytes actually taken), so a learned basis
    gets no credit for memorising. The winner is refitted on the whole sample.

    Args:
        sample: ``(N, C, H, W)`` or ``(N, H, W)`` uint8 images, ``N >= 2``.
        bytes_ratio: As in :func:`fit_shared`.
        transforms: Candidates among ``"pca"`` and ``"dct"``.
        blocks: Candidate block sizes; default the divisors of ``H`` and ``W`` among 4, 7, 8, 14, 16, 28, 32
            and the whole image (when square).
        colours: Candidates among ``"ycc"`` and ``"rgb"`` (colour images only).
        dataset_size: As in :func:`fit_shared`.
        seed: Seed of the split.
        max_images: At most this many images in each half (a random subset) while comparing candidates.

    Returns:
        ``{"codec": SharedCodec fitted on the whole sample, "best": dict, "candidates": [dict, ...]}``; each
        dict holds ``transform, block, colour, step, psnr, bytes_ratio, shared_nbytes``.
    """
    x = _images(sample)
    n, c, h, w = x.shape
    if n < 2:
        raise ValueError(f"search_shared needs at least 2 images to hold some out, got {n}")
    if blocks is None:
        blocks = sorted(
            {b for b in (4, 7, 8, 14, 16, 28, 32) if h % b == 0 and w % b == 0} | ({h} if h == w else set())
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(x.device)
    half = min(n // 2, max_images)
    fit_x, test_x = x[perm[:half]], x[perm[n // 2 : n // 2 + half]]
    results: list[dict[str, Any]] = []
    for transform in transforms:
        for block in blocks:
            if transform == "pca" and block * block > 4096:
                continue  # a 4096-dim covariance per channel is as far as a sample of this size can inform
            for colour in colours if c == 3 else ("rgb",):
                try:
                    codec = fit_shared(fit_x, bytes_ratio, transform=transform, block=block, colour=colour,
                                       dataset_size=dataset_size)  # fmt: skip
                except ValueError:
                    continue
                rec, nbytes = codec.roundtrip(test_x)
                results.append({
                    "transform": transform, "block": block, "colour": colour, "step": codec.step,
                    "psnr": float(psnr(rec, test_x).mean()), "bytes_ratio": float(nbytes.mean() / (c * h * w)),
                    "shared_nbytes": codec.shared_nbytes,
                })  # fmt: skip
    if not results:
        raise ValueError(f"no candidate meets bytes_ratio {bytes_ratio} on images of shape {(c, h, w)}")
    best = max(results, key=lambda r: r["psnr"])
    codec = fit_shared(x, bytes_ratio, transform=best["transform"], block=best["block"], colour=best["colour"],
                       dataset_size=dataset_size)  # fmt: skip
    return {"codec": codec, "best": best, "candidates": results}
