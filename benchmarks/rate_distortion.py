"""Rate-distortion of every representation: PSNR and SSIM against the parameter ratio and against bytes.

Datasets (all uint8):

* ``fashion``: real Fashion-MNIST, the first ``--images`` (2,000) training images are evaluated; shared
  representations are fitted on training images ``2000 .. 2000 + --fit`` (other images), and their shared part
  is amortised over the 60,000 training images;
* ``p32``: 32x32 RGB patches of every RGB photo scikit-image ships (short side resized to 64, 96 and 128, cut
  into non-overlapping patches, as ``benchmarks/layouts.py``), shared part amortised over 50,000 images (the
  size of CIFAR-10's training set);
* ``c224``: 224x224 RGB crops of the same photos (short side 256; centre and four corners; ``--quick``: centre
  only), shared part amortised over 1,281,167 images (ImageNet's training set).

For the photo sets, shared representations are fitted in two folds (by photo for ``c224``), every image being
evaluated by a representation fitted without it.

Methods and their bytes (``bytes_ratio`` = stored bytes per image / raw uint8 bytes ``C H W``):

* per-image factor methods at parameter ratios ``rho``: mpsdata ``decompose`` (one term, and ``residual=1``),
  and ``mpsdata.baselines`` ICE (pixels and DCT), SVD, CP, Tucker: float32, 4 bytes per parameter (the
  ``bytes_ratio`` is ``4 rho``; float16 would halve it); ``downsample_upsample``: uint8, ``rho``;
* quantised per-image MPS (``mpsdata._quant``) at byte budgets, layout/colour/domain chosen per budget by
  ``search_layout`` on a sample: values + scales, exactly as stored;
* the shared representation (``mpsdata._shared``) at byte budgets, transform/block/colour chosen per budget
  by ``search_shared`` on the fit images: entropy-coded bytes + a 4-byte length per image, and separately
  the same plus the shared part amortised over the reference dataset size (the figure used for verdicts);
* codecs (Pillow): JPEG, WebP, AVIF over a quality sweep (mean file size) and, for JPEG and WebP, at every
  byte budget (each image at most the budget; unreachable budgets are recorded as such);
* lossless: zlib level 9 of the raw bytes, PNG (``optimize=True``).

PSNR is on the uint8 scale (mean over images of the per-image PSNR, capped at 100 dB); SSIM is scikit-image's
``structural_similarity`` (``data_range=255``, per image, mean). Verdicts compare the upper envelope of PSNR at
bytes at most ``b`` (linear between measured points) for ``b`` in 0.1, 0.2, 0.3, 0.4.

``--part filters`` measures HDF5 filters on stored cores of Fashion-MNIST (bytes and read speed); ``--part design``
the choices behind the defaults (quantisation-aware refit, RDOQ weight, PCA truncation, shared candidates).

Usage::

    .venv/bin/python benchmarks/rate_distortion.py --quick            # < 5 min, results/rate_distortion-quick.json
    .venv/bin/python benchmarks/rate_distortion.py                    # full run
    .venv/bin/python benchmarks/rate_distortion.py --part filters     # results/rate_distortion_filters.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import platform
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import mpsdata
from mpsdata import _quant, _shared, _signal, baselines

ROOT = Path(__file__).resolve().parent.parent
PSNR_CAP = 100.0
BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
GOAL_BUDGETS = (0.1, 0.2, 0.3, 0.4)
RHOS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
QUALITIES = (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
REFERENCE_SIZE = {"fashion": 60_000, "p32": 50_000, "c224": 1_281_167}


# ---------------------------------------------------------------------------------------------------
# Data
def load_fashion(path: Path, start: int, count: int) -> torch.Tensor:
    with gzip.open(path / "train-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return torch.from_numpy(data[start : start + count].copy())


def skimage_photos() -> dict[str, torch.Tensor]:
    """Every RGB uint8 sample photo scikit-image ships offline, ``(3, H, W)``; duplicates dropped."""
    import skimage.data

    photos: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for name in sorted(skimage.data.__all__):
        loader = getattr(skimage.data, name)
        if not callable(loader) or name in ("download_all", "lbp_frontal_face_cascade_filename"):
            continue
        try:
            image = loader()
        except Exception:  # optional data (needs a download): skip it
            continue
        if isinstance(image, tuple):
            image = image[0]
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            continue
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            photos[name] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return photos


def resize_short(image: torch.Tensor, short: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    scale = short / min(h, w)
    size = (max(short, round(h * scale)), max(short, round(w * scale)))
    out = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def photo_patches(photos: dict[str, torch.Tensor], size: int, shorts: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    out, owner = [], []
    for p, image in enumerate(photos.values()):
        for short in shorts:
            small = resize_short(image, short)
            h, w = small.shape[-2:]
            tiles = small[:, : h - h % size, : w - w % size].unfold(1, size, size).unfold(2, size, size)
            tiles = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)
            out.append(tiles)
            owner += [p] * tiles.shape[0]
    return torch.cat(out).contiguous(), np.asarray(owner)


def photo_crops(photos: dict[str, torch.Tensor], size: int, short: int, five: bool) -> tuple[torch.Tensor, np.ndarray]:
    out, owner = [], []
    for p, image in enumerate(photos.values()):
        small = resize_short(image, short)
        h, w = small.shape[-2:]
        corners = [((h - size) // 2, (w - size) // 2)]
        if five:
            corners += [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
        for r, c in corners:
            out.append(small[:, r : r + size, c : c + size])
            owner.append(p)
    return torch.stack(out).contiguous(), np.asarray(owner)


# ---------------------------------------------------------------------------------------------------
# Metrics
def as_nchw(x: torch.Tensor) -> torch.Tensor:
    return x[:, None] if x.ndim == 3 else x


def psnr(rec: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    return _signal.psnr(as_nchw(rec), as_nchw(ref)).numpy()


def ssim(rec: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    from skimage.metrics import structural_similarity

    a, b = as_nchw(rec).cpu().numpy(), as_nchw(ref).cpu().numpy()
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        if a.shape[1] == 1:
            out[i] = structural_similarity(a[i, 0], b[i, 0], data_range=255)
        else:
            out[i] = structural_similarity(a[i], b[i], data_range=255, channel_axis=0)
    return out


def row(method: str, family: str, setting, rec: torch.Tensor, ref: torch.Tensor, nbytes, **extra) -> dict:
    raw = math.prod(ref.shape[1:])
    nbytes = np.broadcast_to(np.asarray(nbytes, np.float64), (ref.shape[0],))
    return {
        "method": method,
        "family": family,
        "setting": setting,
        "bytes_ratio": float(nbytes.mean() / raw),
        "psnr": float(psnr(rec, ref).mean()),
        "ssim": float(ssim(rec, ref).mean()),
        "images": int(ref.shape[0]),
        **extra,
    }


# ---------------------------------------------------------------------------------------------------
# Methods
def run_factor_methods(x: torch.Tensor, rhos: Sequence[float], slow_limit: int, log: Callable) -> list[dict]:
    """Per-image factor methods at parameter ratios; float32 bytes (4 per parameter)."""
    rows = []
    raw = math.prod(x.shape[1:])
    for rho in rhos:
        for residual in (0, 1):
            try:
                m = mpsdata.decompose(x, rho, residual=residual, compute_bound=False)
            except ValueError:
                continue
            ratio = float(m.ratio.reshape(x.shape[0], -1).mean(1).mean()) if x.ndim == 4 else float(m.ratio.mean())
            name = "mps" if residual == 0 else "mps+residual"
            rows.append(row(name, "mpsdata", {"rho": rho, "layout": m.layout.describe(), "bond_dims": m.bond_dims},
                            m.reconstruct(torch.uint8), x, 4 * ratio * raw, param_ratio=ratio,
                            bytes_ratio_float16=2 * ratio))  # fmt: skip
        calls = {
            "ice": lambda imgs, r: baselines.ice(imgs, r),
            "ice+dct": lambda imgs, r: baselines.ice(imgs, r, transform="dct"),
            "svd": baselines.svd,
            "cp": baselines.cp,
            "tucker": baselines.tucker,
            "downsample_upsample": baselines.downsample_upsample,
        }
        for name, fn in calls.items():
            imgs = x[:slow_limit] if name in ("cp", "tucker") else x
            try:
                r = fn(imgs, rho)
            except ValueError:
                continue
            rows.append(row(name, "baseline", {"rho": rho, "method": r.method}, r.images, imgs, r.nbytes.numpy(),
                            param_ratio=float(r.ratio.mean())))  # fmt: skip
        log(f"  factor methods rho={rho}")
    return rows


def run_quantised_mps(
    x: torch.Tensor, budgets: Sequence[float], schemes: Sequence[str], search_n: int, options: dict, log: Callable
) -> list[dict]:
    """Quantised per-image MPS; layout, colour and domain chosen by search_layout on the first images."""
    rows = []
    for scheme in schemes:
        for b in budgets:
            try:
                found = _quant.search_layout(x[:search_n], b, scheme, **options)
            except ValueError:
                continue
            best = found["best"]
            rec, nbytes, bonds = _quant.apply_layout(x, b, scheme, site_dims=best["site_dims"], colour=best["colour"],
                                                     luma_share=best["luma_share"], domain=best["domain"])  # fmt: skip
            setting = {k: best[k] for k in ("site_dims", "layout", "colour", "luma_share", "domain")}
            setting["budget"], setting["bond_dims"] = b, bonds
            rows.append(row(f"mps-{scheme}", "mpsdata", setting, rec, x, nbytes))
            log(f"  mps-{scheme} budget {b}: {rows[-1]['psnr']:.2f} dB")
    return rows


def run_shared(
    x: torch.Tensor,
    folds: list[tuple[np.ndarray, np.ndarray]] | None,
    fit_images: torch.Tensor | None,
    budgets: Sequence[float],
    options: dict,
    reference: int,
    log: Callable,
) -> list[dict]:
    """The shared representation, fitted on other images (``fit_images``, or the other fold)."""
    rows = []
    raw = math.prod(x.shape[1:])
    for b in budgets:
        rec = torch.empty_like(as_nchw(x))
        nbytes = np.zeros(x.shape[0])
        shared_bytes, chosen = [], []
        parts = [(fit_images, np.arange(x.shape[0]))] if folds is None else [(x[f], e) for f, e in folds]
        try:
            for fit, test in parts:
                found = _shared.search_shared(fit, b, dataset_size=reference, **options)
                codec = found["codec"]
                r, nb = codec.roundtrip(x[test])
                rec[test], nbytes[test] = r, nb
                shared_bytes.append(codec.shared_nbytes)
                chosen.append(codec.describe())
        except ValueError:
            continue
        amortised = float(np.mean(shared_bytes)) / reference
        setting = {"budget": b, "codecs": chosen, "shared_nbytes": shared_bytes, "reference_images": reference}
        out = row("shared", "mpsdata", setting, rec.reshape(x.shape), x, nbytes + amortised,
                  bytes_ratio_own=float(nbytes.mean() / raw))  # fmt: skip
        rows.append(out)
        log(f"  shared budget {b}: {out['psnr']:.2f} dB at {out['bytes_ratio']:.3f} ({chosen[0]})")
    return rows


def run_codecs(x: torch.Tensor, qualities: Sequence[int], budgets: Sequence[float], log: Callable) -> list[dict]:
    rows = []
    from PIL import features

    for name, fn in (("jpeg", baselines.jpeg), ("webp", baselines.webp), ("avif", baselines.avif)):
        if not features.check({"jpeg": "jpg"}.get(name, name)):
            continue
        for q in qualities:
            r = fn(x, quality=q)
            rows.append(row(name, "codec", {"quality": q}, r.images, x, r.nbytes.numpy()))
        if name == "avif":
            continue  # AVIF's ~330-byte floor on small images and its encode time: the sweep suffices
        for b in budgets:
            try:
                r = fn(x, bytes_ratio=b)
            except ValueError as err:
                rows.append({"method": name, "family": "codec", "setting": {"budget": b}, "unreachable": str(err)})
                continue
            rows.append(row(name, "codec", {"budget": b}, r.images, x, r.nbytes.numpy()))
        log(f"  codec {name}")
    return rows


def run_lossless(x: torch.Tensor) -> list[dict]:
    from PIL import Image

    arrays = as_nchw(x).permute(0, 2, 3, 1).numpy()
    z = [len(zlib.compress(a.tobytes(), 9)) for a in arrays]
    png = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG", optimize=True)
        png.append(len(buf.getvalue()))
    return [row("zlib-9", "lossless", {}, x, x, z), row("png", "lossless", {}, x, x, png)]


# ---------------------------------------------------------------------------------------------------
# Envelopes and verdicts
def envelope(rows: list[dict], metric: str = "psnr") -> Callable[[float], float | None]:
    """Best ``metric`` at bytes ratio at most ``b``: running max over the points, linear between them."""
    pts = sorted((r["bytes_ratio"], r[metric]) for r in rows if "bytes_ratio" in r)
    xs, ys = [], []
    for bx, by in pts:
        if ys and by <= ys[-1]:
            continue
        xs.append(bx)
        ys.append(by)

    def at(b: float) -> float | None:
        if not xs or b < xs[0]:
            return None
        i = int(np.searchsorted(xs, b, side="right")) - 1
        if i == len(xs) - 1:
            return ys[-1]
        t = (b - xs[i]) / (xs[i + 1] - xs[i])
        # between two measured points, bytes buy PSNR at most linearly (conservative for the upper point)
        return ys[i] + t * (ys[i + 1] - ys[i])

    return at


def verdicts(results: dict) -> dict:
    out = {}
    for name, data in results["datasets"].items():
        rows = data["rows"]
        ours = envelope([r for r in rows if r.get("family") == "mpsdata"])
        per_image = envelope([r for r in rows if r.get("family") == "mpsdata" and r["method"] != "shared"])
        table = {}
        for b in GOAL_BUDGETS:
            entry = {"mpsdata_best": ours(b), "mpsdata_per_image_best": per_image(b)}
            for codec in ("jpeg", "webp", "avif"):
                entry[codec] = envelope([r for r in rows if r.get("method") == codec])(b)
            table[str(b)] = entry
        beats = {}
        for codec in ("jpeg", "webp", "avif"):
            beats[codec] = {
                str(b): (None if table[str(b)]["mpsdata_best"] is None else
                         table[str(b)][codec] is None or table[str(b)]["mpsdata_best"] > table[str(b)][codec])
                for b in GOAL_BUDGETS
            }  # fmt: skip
        out[name] = {"psnr_at_budget": table, "mpsdata_beats": beats}
    goal_webp = all(v for d in ("fashion", "p32") if d in out for v in out[d]["mpsdata_beats"]["webp"].values())
    goal_jpeg = all(v for d in out.values() for v in d["mpsdata_beats"]["jpeg"].values())
    out["goal"] = {"beats_webp_on_28_and_32_at_0.1_to_0.4": goal_webp, "beats_jpeg_everywhere_at_0.1_to_0.4": goal_jpeg}
    return out


# ---------------------------------------------------------------------------------------------------
# Report
LABELS = {
    "mps": "MPS float32", "mps+residual": "MPS+residual float32", "mps-int8": "MPS int8", "mps-int4": "MPS int4",
    "mps-float16": "MPS float16", "shared": "shared (mpsdata)", "ice": "ICE", "ice+dct": "ICE+DCT", "svd": "SVD",
    "cp": "CP", "tucker": "Tucker", "downsample_upsample": "down/up", "jpeg": "JPEG", "webp": "WebP", "avif": "AVIF",
}  # fmt: skip


def markdown(results: dict) -> str:
    lines = []
    for name, data in results["datasets"].items():
        rows = data["rows"]
        lines.append(f"\n### {name}: PSNR (dB) at bytes ratio <= b (upper envelope; SSIM in brackets)\n")
        lines.append("| method | " + " | ".join(f"b = {b}" for b in GOAL_BUDGETS) + " |")
        lines.append("|---|" + "---|" * len(GOAL_BUDGETS))
        for method in LABELS:
            sel = [r for r in rows if r.get("method") == method and "bytes_ratio" in r]
            if not sel:
                continue
            p, s = envelope(sel), envelope(sel, "ssim")
            cells = ["—" if p(b) is None else f"{p(b):.2f} ({s(b):.3f})" for b in GOAL_BUDGETS]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        for r in rows:
            if r.get("family") == "lossless":
                lines.append(f"| {r['method']} (lossless) | bytes ratio {r['bytes_ratio']:.3f} | | | |")
        lines.append(f"\n{name}: PSNR (dB) against the parameter ratio rho (float32 bytes = 4 rho)\n")
        rhos = sorted({r["setting"]["rho"] for r in rows if "param_ratio" in r})
        lines.append("| method | " + " | ".join(f"rho {rho}" for rho in rhos) + " |")
        lines.append("|---|" + "---|" * len(rhos))
        for method in ("mps", "mps+residual", "ice", "ice+dct", "svd", "cp", "tucker", "downsample_upsample"):
            by = {r["setting"]["rho"]: r for r in rows if r.get("method") == method and "param_ratio" in r}
            if by:
                cells = [f"{by[rho]['psnr']:.2f}" if rho in by else "—" for rho in rhos]
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    v = results["verdicts"]
    lines.append("\n### Goal verdicts\n")
    for name in results["datasets"]:
        for codec, by in v[name]["mpsdata_beats"].items():
            lines.append(f"- {name}, mpsdata best vs {codec}: " + ", ".join(f"{b}: {ok}" for b, ok in by.items()))
    lines.append(f"- overall: {v['goal']}")
    return "\n".join(lines)


def plot(results: dict, out_dir: Path, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    styles = {"mpsdata": "-", "baseline": "--", "codec": ":"}
    cmap = plt.get_cmap("tab20")
    colours = {method: cmap(i % 20) for i, method in enumerate(LABELS)}
    for name, data in results["datasets"].items():
        rows = [r for r in data["rows"] if "bytes_ratio" in r and r.get("family") != "lossless"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for metric, ax in zip(("psnr", "ssim"), axes, strict=True):
            for method, label in LABELS.items():
                sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes_ratio"])
                sel = [r for r in sel if r["bytes_ratio"] <= 1.0]
                if not sel:
                    continue
                ax.plot([r["bytes_ratio"] for r in sel], [r[metric] for r in sel], styles[sel[0]["family"]],
                        color=colours[method], marker="o", ms=3, label=label)  # fmt: skip
            for r in data["rows"]:
                if r.get("family") == "lossless":
                    ax.axvline(r["bytes_ratio"], color="gray", lw=0.5)
                    ax.text(r["bytes_ratio"], ax.get_ylim()[0], r["method"], rotation=90, fontsize=7, va="bottom")
            ax.axvspan(0.1, 0.4, color="yellow", alpha=0.08)
            ax.set_xlabel("bytes per image / raw uint8 bytes (float32 for float factor methods)")
            ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
            ax.set_xlim(0, 1.0)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{name}: {data['description']}")
        fig.tight_layout()
        path = out_dir / f"rate_distortion_{name}_bytes{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for metric, ax in zip(("psnr", "ssim"), axes, strict=True):
            for method in ("mps", "mps+residual", "ice", "ice+dct", "svd", "cp", "tucker", "downsample_upsample"):
                sel = sorted((r for r in data["rows"] if r.get("method") == method and "param_ratio" in r),
                             key=lambda r: r["param_ratio"])  # fmt: skip
                if sel:
                    ax.plot([r["param_ratio"] for r in sel], [r[metric] for r in sel], styles[sel[0]["family"]],
                            color=colours[method], marker="o", ms=3, label=LABELS[method])  # fmt: skip
            ax.set_xlabel("parameter ratio rho (values stored / values of the image)")
            ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name}: factor methods against the parameter ratio")
        fig.tight_layout()
        path = out_dir / f"rate_distortion_{name}_param{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# ---------------------------------------------------------------------------------------------------
# HDF5 filters
def run_filters(fashion: Path, count: int, log: Callable) -> dict:
    """Bytes and read speed of HDF5 filters on stored cores of real Fashion-MNIST images."""
    import h5py

    try:
        import hdf5plugin
    except ImportError:  # pragma: no cover - optional
        hdf5plugin = None
    x = load_fashion(fashion, 0, count)
    layout_m = mpsdata.decompose(x, 0.35, compute_bound=False)  # today's default core file: float16 cores
    payloads: dict[str, list[np.ndarray]] = {
        "float16 rho 0.35 (current)": [c.numpy().astype(np.float16) for c in layout_m.cores],
    }
    for scheme in ("int8", "int4"):
        found = _quant.search_layout(x[:64], 0.3, scheme, domains=("pixels",))
        from mpsdata._layout import make_layout

        layout = make_layout(28, 28, site_dims=found["best"]["site_dims"])
        q = _quant.quantize_refit(layout.to_sites(x), layout.site_dims, found["best"]["bond_dims"][0], 1, scheme)
        payloads[f"{scheme} bytes 0.3 {list(layout.site_dims)}"] = [q.values.numpy(), q.scales.numpy()]
    codec = _shared.fit_shared(load_fashion(fashion, 20_000, 5000), 0.2, transform="dct", block=4)
    enc = codec.encode(x)
    payloads["shared dct4 bytes 0.2 (entropy-coded)"] = [enc.data, enc.offsets]

    filters: dict[str, dict] = {
        "none": {},
        "gzip-1": {"compression": "gzip", "compression_opts": 1},
        "shuffle+gzip-4": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
        "shuffle+gzip-9": {"compression": "gzip", "compression_opts": 9, "shuffle": True},
        "gzip-9": {"compression": "gzip", "compression_opts": 9},
        "lzf": {"compression": "lzf"},
        "shuffle+lzf": {"compression": "lzf", "shuffle": True},
    }
    if hdf5plugin is not None:
        for level in (3, 9, 19):
            filters[f"zstd-{level}"] = dict(hdf5plugin.Zstd(clevel=level))
            filters[f"shuffle+zstd-{level}"] = {**hdf5plugin.Zstd(clevel=level), "shuffle": True}
        filters["blosc-lz4+shuffle"] = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
        filters["blosc-zstd+bitshuffle"] = dict(
            hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE)
        )
    out: dict = {"images": count, "payloads": {}}
    rng = np.random.default_rng(0)
    picks = rng.integers(0, count, 500)
    with tempfile.TemporaryDirectory() as tmp:
        for pname, arrays in payloads.items():
            out["payloads"][pname] = {}
            raw = sum(a.nbytes for a in arrays)
            for chunk_kib in (64, 1024):
                for fname, opts in filters.items():
                    path = Path(tmp) / "f.h5"
                    blob = pname.startswith("shared")  # byte strings + offsets: no filter on the offsets
                    with h5py.File(path, "w") as f:
                        for i, a in enumerate(arrays):
                            per_row = max(1, a[0].nbytes if a.ndim > 1 else a.itemsize)
                            target = max(1, min(a.shape[0], (chunk_kib << 10) // per_row))
                            rows = math.ceil(a.shape[0] / math.ceil(a.shape[0] / target))  # equal chunks
                            kw = {} if blob and i == 1 else opts
                            f.create_dataset(f"d{i}", data=a, chunks=(rows, *a.shape[1:]), **kw)
                    stored = 0
                    with h5py.File(path, "r") as f:
                        stored = sum(f[k].id.get_storage_size() for k in f)
                    full, item = [], []
                    for _ in range(3):
                        t = time.perf_counter()
                        with h5py.File(path, "r") as f:
                            for k in f:
                                f[k][()]
                        full.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        # No chunk cache: on a dataset much larger than the cache, a shuffled epoch
                        # decompresses a chunk for nearly every item.
                        with h5py.File(path, "r", rdcc_nbytes=0) as f:
                            if blob:
                                data, offsets = f["d0"], f["d1"]
                                for i in picks:
                                    lo, hi = offsets[int(i) : int(i) + 2]
                                    data[lo:hi]
                            else:
                                ds = [f[k] for k in f]
                                for i in picks:
                                    for d in ds:
                                        d[int(i)]
                        item.append((time.perf_counter() - t) / len(picks))
                    out["payloads"][pname][f"{fname} chunk {chunk_kib} KiB"] = {
                        "bytes_per_image": stored / count, "bytes_ratio": stored / count / 784,
                        "of_unfiltered": stored / raw, "full_read_s": min(full), "item_read_us": 1e6 * min(item),
                    }  # fmt: skip
            log(f"  filters on {pname}")
    return out


# ---------------------------------------------------------------------------------------------------
# Design choices behind the defaults
def run_design(fashion: Path, photos: dict[str, torch.Tensor], quick: bool, log: Callable) -> dict:
    """Measurements behind the defaults: quantised-MPS refit, RDOQ weight, PCA truncation, shared candidates."""
    from mpsdata._layout import make_layout

    out: dict = {}
    x = load_fashion(fashion, 0, 300 if quick else 1000)
    fit = load_fashion(fashion, 2000, 2000 if quick else 5000)
    # 1. quantised per-image MPS: plain rounding vs quantisation-aware refit vs refit + 2 ALS sweeps
    refit = []
    for spec in ("hierarchical", [28, 28]):
        layout = make_layout(28, 28, site_dims=spec)
        xd = x.double()
        for scheme in ("int8", "int4"):
            for b in (0.1, 0.2, 0.3, 0.4):
                try:
                    bonds = _quant.bonds_for_bytes(layout.site_dims, b, 784, 1, scheme)
                except ValueError:
                    continue
                m = mpsdata.decompose(xd, bond_dims=bonds, site_dims=spec, dtype=torch.float64, compute_bound=False)
                entry = {"layout": list(layout.site_dims), "scheme": scheme, "budget": b, "bond_dims": bonds}
                for label, q in (("plain", _quant.quantize_mps(m, scheme)),
                                 ("refit", _quant.quantize_mps(m, scheme, x=xd)),
                                 ("refit+2 sweeps", _quant.quantize_mps(m, scheme, x=xd, sweeps=2))):  # fmt: skip
                    entry[label] = float(psnr(_quant.reconstruct(q, layout, torch.uint8), x).mean())
                entry["float64 cores"] = float(psnr(m.reconstruct(torch.uint8), x).mean())
                entry["bytes_ratio"] = _quant.nbytes_per_image(layout.site_dims, bonds, 1, scheme) / 784
                refit.append(entry)
    out["quantised_mps_refit"] = refit
    log("  design: refit")
    # 2. RDOQ weight at equal bytes (fitted on other images, measured on x)
    patches_all, _ = photo_patches(photos, 32, (64, 96, 128))
    rng = np.random.default_rng(0)
    perm = rng.permutation(patches_all.shape[0])
    p_fit, p_test = patches_all[perm[: len(perm) // 2]], patches_all[perm[len(perm) // 2 :]]
    rdoq = []
    for name, f_, t_, kw in (("fashion dct 4", fit, x, {"transform": "dct", "block": 4}),
                             ("p32 dct 8 ycc", p_fit, p_test, {"transform": "dct", "block": 8})):  # fmt: skip
        for b in (0.1, 0.2, 0.3):
            for lam in (0.0, 0.05, 0.1, 0.15, 0.25):
                codec = _shared.fit_shared(f_, b, rdoq=lam, **kw)
                rec, nb = codec.roundtrip(t_)
                raw = math.prod(as_nchw(t_).shape[1:])
                rdoq.append({"set": name, "budget": b, "rdoq": lam, "bytes_ratio": float(nb.mean() / raw),
                             "psnr": float(psnr(rec, t_).mean())})  # fmt: skip
    out["rdoq"] = rdoq
    log("  design: rdoq")
    # 3. PCA truncation (min_nonzero) with the shared part amortised over 60,000 images
    trunc = []
    for b in (0.1, 0.2, 0.3):
        for mn in (0.002, 0.05, 0.1, 0.3):
            codec = _shared.fit_shared(fit, b, transform="pca", min_nonzero=mn, dataset_size=60_000)
            rec, nb = codec.roundtrip(x)
            trunc.append({"budget": b, "min_nonzero": mn, "components": int(codec.basis.shape[1]),
                          "shared_nbytes": codec.shared_nbytes, "bytes_ratio_own": float(nb.mean() / 784),
                          "bytes_ratio": float((nb.mean() + codec.shared_nbytes / 60_000) / 784),
                          "psnr": float(psnr(rec, x).mean())})  # fmt: skip
    out["pca_truncation"] = trunc
    log("  design: pca truncation")
    # 4. every shared candidate at bytes 0.2, scored on held-out images
    cands = {}
    for name, sample in (("fashion", fit[:2000]), ("p32", patches_all)):
        found = _shared.search_shared(sample, 0.2, blocks=(4, 7, 14, 28) if name == "fashion" else (4, 8, 16, 32))
        cands[name] = found["candidates"]
    out["shared_candidates_at_0.2"] = cands
    log("  design: shared candidates")
    return out


# ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", type=Path, default=os.environ.get("MPSDATA_FASHION_MNIST"))
    parser.add_argument("--quick", action="store_true", help="fewer images, budgets and candidates (< 5 min)")
    parser.add_argument("--part", choices=("rd", "filters", "design", "all"), default="rd")
    parser.add_argument("--datasets", default="fashion,p32,c224")
    parser.add_argument("--images", type=int, default=None, help="Fashion-MNIST images evaluated (2000)")
    parser.add_argument("--fit", type=int, default=None, help="Fashion-MNIST images the shared part is fitted on")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge", action="store_true", help="keep the other datasets already in the results file")
    parser.add_argument("--crops", type=int, choices=(1, 5), default=None, help="224x224 crops per photo (5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    suffix = "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "mpsdata": mpsdata.__version__, "platform": platform.platform(), "threads": args.threads}  # fmt: skip
    if args.part in ("filters", "all"):
        if args.fashion is None:
            parser.error("--fashion (or MPSDATA_FASHION_MNIST) is needed for the filter measurement")
        res = run_filters(args.fashion, 2000 if args.quick else 10_000, log)
        res["environment"] = env
        path = args.out / f"rate_distortion_filters{suffix}.json"
        path.write_text(json.dumps(res, indent=1))
        log(f"wrote {path}")
    if args.part in ("design", "all"):
        if args.fashion is None:
            parser.error("--fashion (or MPSDATA_FASHION_MNIST) is needed for the design measurements")
        res = run_design(args.fashion, skimage_photos(), args.quick, log)
        res["environment"] = env
        path = args.out / f"rate_distortion_design{suffix}.json"
        path.write_text(json.dumps(res, indent=1))
        log(f"wrote {path}")
    if args.part in ("filters", "design"):
        return

    budgets = (0.05, *GOAL_BUDGETS) if args.quick else BUDGETS
    rhos = (0.05, 0.1, 0.2, 0.4) if args.quick else RHOS
    qualities = (0, 10, 30, 50, 70, 90, 100) if args.quick else QUALITIES
    results: dict = {"environment": env, "quick": args.quick, "datasets": {}}
    previous = args.out / f"rate_distortion{suffix}.json"
    if args.merge and previous.is_file():
        kept = json.loads(previous.read_text())
        results["datasets"] = {k: v for k, v in kept.get("datasets", {}).items() if k not in args.datasets.split(",")}
        results["merged_from_earlier_runs"] = sorted(results["datasets"])
    wanted = args.datasets.split(",")
    photos = skimage_photos() if {"p32", "c224"} & set(wanted) else {}
    for name in wanted:
        log(f"dataset {name}")
        # Candidates are trimmed where earlier runs never picked them, to keep the run within the hour.
        layout_opts: dict = {}
        data_budgets, data_rhos = budgets, rhos
        if name == "fashion":
            if args.fashion is None:
                log("  skipped: no --fashion / MPSDATA_FASHION_MNIST")
                continue
            n = args.images or (300 if args.quick else 2000)
            n_fit = args.fit or (1000 if args.quick else 10_000)
            x = load_fashion(args.fashion, 0, n)
            fit, folds = load_fashion(args.fashion, 2000, n_fit), None
            description = f"Fashion-MNIST train[0:{n}], shared part fitted on train[2000:{2000 + n_fit}]"
            shared_opts: dict = {"blocks": (4, 28), "max_images": 500 if args.quick else 1000}
            schemes = ("int8", "int4") if args.quick else ("int8", "int4", "float16")
            search_n, slow_limit = 64, (100 if args.quick else 300)
        elif name == "p32":
            x, owner = photo_patches(photos, 32, (64, 96, 128))
            rng = np.random.default_rng(0)
            half = rng.permutation(x.shape[0])
            a, b = np.sort(half[: x.shape[0] // 2]), np.sort(half[x.shape[0] // 2 :])
            fit, folds = None, [(a, b), (b, a)]
            description = f"{x.shape[0]} 32x32 patches of {len(photos)} scikit-image photos, two random folds"
            shared_opts = {"blocks": (4, 8, 16, 32)} if not args.quick else {"blocks": (8, 16), "transforms": ("dct",)}
            schemes, search_n, slow_limit = (("int8", "int4", "float16") if not args.quick else ("int8",)), 48, 120
            if args.quick:
                layout_opts = {"domains": ("pixels",), "colours": ("rgb-site", "ycc"), "luma_shares": (0.6,)}
        elif name == "c224":
            x, owner = photo_crops(photos, 224, 256, five=(args.crops or (1 if args.quick else 5)) == 5)
            a, b = np.flatnonzero(owner % 2 == 0), np.flatnonzero(owner % 2 == 1)
            fit, folds = None, [(a, b), (b, a)]
            description = f"{x.shape[0]} 224x224 crops of {len(photos)} scikit-image photos, two folds by photo"
            shared_opts = {
                "blocks": (8, 16),
                "colours": ("ycc",),
                "transforms": ("dct",) if args.quick else ("dct", "pca"),
            }
            schemes, search_n, slow_limit = (() if args.quick else ("int8",)), 4, (3 if args.quick else 6)
            data_rhos = (0.1, 0.2) if args.quick else (0.025, 0.05, 0.1, 0.2, 0.4)
            layout_opts = {"site_dims": ("hierarchical", "row"), "colours": ("rgb-site", "ycc"), "luma_shares": (0.6,),
                           "domains": ("pixels",)}  # fmt: skip
            data_budgets = (0.05, *GOAL_BUDGETS)
        else:
            parser.error(f"unknown dataset {name!r}")
        rows: list[dict] = []
        rows += run_lossless(x)
        rows += run_codecs(x, qualities, data_budgets, log)
        rows += run_shared(x, folds, fit, data_budgets, shared_opts, REFERENCE_SIZE[name], log)
        rows += run_quantised_mps(x, data_budgets, schemes, search_n, layout_opts, log)
        rows += run_factor_methods(x, data_rhos, slow_limit, log)
        results["datasets"][name] = {"description": description, "shape": list(as_nchw(x).shape), "rows": rows}
        (args.out / f"rate_distortion{suffix}.json").write_text(json.dumps(results, indent=1, default=str))
    results["verdicts"] = verdicts(results)
    results["seconds"] = time.time() - start
    path = args.out / f"rate_distortion{suffix}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    args.figures.mkdir(parents=True, exist_ok=True)
    figures = plot(results, args.figures, suffix)
    print(markdown(results))
    log(f"wrote {path} and {len(figures)} figures")


if __name__ == "__main__":
    main()
