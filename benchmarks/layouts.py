"""Which site layout and bond allocation compress real images best, at the paper's ratios.

Measures PSNR (uint8 0..255 scale, ``reconstruct(torch.uint8)`` against the original, per image, then
averaged) of :func:`mpsdata.decompose` for many layouts of each image size, at ``rho = 0.1 ... 0.7``:

* Fashion-MNIST 28x28 (the first 2,000 training images, from ``--fashion``);
* 32x32 patches of every RGB photo that scikit-image ships (resized so the shorter side is 192, then cut
  into non-overlapping patches), channels ``"separate"`` and ``"site"``;
* 224x224 crops of the same photos (shorter side resized to 256, then the centre and four corner crops,
  like torchvision's ``FiveCrop``), channels ``"separate"`` and ``"site"``;
* other sizes (29, 64, 100, 227: padded and unpadded), for the defaults' generalisation.

It also compares bond-allocation rules (all data independent: bonds depend only on the sites and the
budget) and, for the best layouts, one MPS term against ``residual=1`` and ``residual=2`` at the same total
ratio. Results go to JSON; a markdown summary is printed (docs/layouts.md holds the tables).

Usage::

    .venv/bin/python benchmarks/layouts.py            # full run, writes benchmarks/results/layouts.json
    .venv/bin/python benchmarks/layouts.py --quick    # fewer images and sizes, a few minutes
    .venv/bin/python benchmarks/layouts.py --cases fashion,"photos 32x32" --out ...   # a subset of the cases
    .venv/bin/python benchmarks/layouts.py --cases 224,28x28,29,48,64,96,100,128,227 --crops auto --rules smallest
    .venv/bin/python benchmarks/layouts.py --tables benchmarks/results/layouts*.json   # the docs' tables
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import mpsdata
from mpsdata import _budget
from mpsdata._layout import make_layout

RHOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
PSNR_CAP = 100.0  # an exact uint8 reconstruction has infinite PSNR; cap it so means stay finite
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------
# Data
def load_fashion(path: Path, count: int) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST training images, uint8 ``(count, 28, 28)``."""
    with gzip.open(path / "train-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return torch.from_numpy(data[:count].copy())


_NOT_PHOTOS = ("download_all", "lbp_frontal_face_cascade_filename", "colorwheel")  # colorwheel: synthetic


def skimage_photos() -> dict[str, torch.Tensor]:
    """Every RGB uint8 photo scikit-image ships (and can load offline), as ``(3, H, W)`` uint8.

    Duplicates (``cat`` is ``chelsea``) and the synthetic ``colorwheel`` are dropped; images that need a
    download are skipped.
    """
    import skimage.data

    photos: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for name in sorted(skimage.data.__all__):
        loader = getattr(skimage.data, name)
        if not callable(loader) or name in _NOT_PHOTOS:
            continue
        try:
            image = loader()
        except Exception:  # optional data that needs pooch or a download: skip it
            continue
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            continue
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        photos[name] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return photos


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of ``(C, H, W)`` uint8, as torchvision's ``Resize`` does."""
    out = torch.nn.functional.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0].round().clamp(0, 255).to(torch.uint8)


def resize_short(image: torch.Tensor, short: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    scale = short / min(h, w)
    return resize(image, max(short, round(h * scale)), max(short, round(w * scale)))


def patches(photos: dict[str, torch.Tensor], size: int, shorts: Sequence[int], limit: int | None) -> torch.Tensor:
    """Non-overlapping ``size x size`` patches of every photo resized to each shorter side in ``shorts``.

    Several scales, so that patches range from whole scenes (like CIFAR) to details.
    """
    out = []
    for image in photos.values():
        for short in shorts:
            small = resize_short(image, short)
            h, w = small.shape[-2:]
            cut = small[:, : h - h % size, : w - w % size]
            tiles = cut.unfold(1, size, size).unfold(2, size, size)  # (C, nh, nw, size, size)
            out.append(tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size))
    every = torch.cat(out)
    if limit is not None and every.shape[0] > limit:
        pick = torch.linspace(0, every.shape[0] - 1, limit).round().long()  # spread over all photos
        every = every[pick]
    return every.contiguous()


def crops(photos: dict[str, torch.Tensor], size: int, short: int, five: bool) -> torch.Tensor:
    """Centre (and, with ``five``, corner) ``size x size`` crops of every photo resized to ``short``."""
    out = []
    for image in photos.values():
        small = resize_short(image, short)
        h, w = small.shape[-2:]
        corners = [((h - size) // 2, (w - size) // 2)]
        if five:
            corners += [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
        out += [small[:, r : r + size, c : c + size] for r, c in corners]
    return torch.stack(out).contiguous()


# ---------------------------------------------------------------------------------------------------
# Bond allocation rules: each returns tight bonds whose params over ``terms`` terms fit the budget and
# depend only on the sites and the budget. They differ in which bond grows next.
def _greedy(site_dims: Sequence[int], ratio: float, num_values: int, terms: int, key: Callable) -> tuple[int, ...]:
    budget = math.floor(ratio * num_values / terms + 1e-9)
    bonds = [1] * (len(site_dims) - 1)
    if _budget.num_params(bonds, site_dims) > budget:
        raise ValueError("ratio below the smallest MPS")
    limits = _budget.max_bonds(site_dims)
    middle = (len(bonds) - 1) / 2
    while True:
        base = _budget.num_params(bonds, site_dims)
        candidates = []
        for k in range(len(bonds)):
            if bonds[k] >= limits[k]:
                continue
            trial = bonds.copy()
            trial[k] += 1
            if _budget.tighten(trial, site_dims) != tuple(trial):
                continue  # a neighbour must grow first
            cost = _budget.num_params(trial, site_dims) - base
            if base + cost <= budget:
                candidates.append((key(bonds[k], limits[k], cost, abs(k - middle), k), trial))
        if not candidates:
            return tuple(bonds)
        bonds = min(candidates)[1]


RULES: dict[str, Callable[..., tuple[int, ...]]] = {
    # grow the smallest bond, the middle breaks ties (the rule before this benchmark)
    "smallest": lambda s, r, v, t: _greedy(s, r, v, t, lambda d, lim, cost, mid, k: (d, mid, k)),
    # grow the bond that is least filled relative to its maximum min(prod left, prod right)
    "fill": lambda s, r, v, t: _greedy(s, r, v, t, lambda d, lim, cost, mid, k: (d / lim, mid, k)),
    # grow the bond whose next step costs the fewest parameters
    "cheapest": lambda s, r, v, t: _greedy(s, r, v, t, lambda d, lim, cost, mid, k: (cost, d, mid, k)),
    # between the two: fill relative to sqrt(maximum)
    "sqrt_fill": lambda s, r, v, t: _greedy(s, r, v, t, lambda d, lim, cost, mid, k: (d / math.sqrt(lim), mid, k)),
    # grow the bond with the most log-bond gained per parameter spent
    "log_gain": lambda s, r, v, t: _greedy(s, r, v, t, lambda d, lim, cost, mid, k: (cost / math.log1p(1 / d), mid, k)),
}


# ---------------------------------------------------------------------------------------------------
# Measurement
@dataclass(frozen=True)
class Block:
    """Two-level block layout with a ``fine x fine`` block, the image edge-padded to a multiple of it.

    The same layout as ``make_layout``'s default for a given fine block, emulated here (pad, decompose with
    explicit ``(row, col)`` digits, crop) so that any block size can be measured, padded or not.
    """

    fine: int

    def padded(self, n: int) -> int:
        return -(-n // self.fine) * self.fine

    def pairs(self, height: int, width: int) -> list[tuple[int, int]]:
        f = self.fine
        return [(self.padded(height) // f, self.padded(width) // f), (f, f)]


@dataclass
class Case:
    """One image set and the layouts to try on it."""

    name: str
    images: torch.Tensor  # (N, H, W) or (N, 3, H, W) uint8
    layouts: dict[str, object]  # label -> site_dims (or a Block)
    modes: tuple[str, ...] = ("separate",)
    rules: tuple[str, ...] = ("smallest",)
    residual_top: int = 0  # residual terms for this many of the best layouts
    cache: dict = field(default_factory=dict)

    @property
    def colour(self) -> bool:
        return self.images.ndim == 4

    def layout(self, spec, mode: str):
        """The layout ``spec`` gives (on the padded image for a :class:`Block`)."""
        h, w = self.images.shape[-2:]
        channels = self.images.shape[1] if self.colour else 1
        if isinstance(spec, Block):
            return make_layout(spec.padded(h), spec.padded(w), channels, spec.pairs(h, w), mode)
        return make_layout(h, w, channels, spec, mode)

    def values(self, mode: str) -> int:
        """Values of one original image under one MPS: the ratio's denominator."""
        h, w = self.images.shape[-2:]
        return (self.images.shape[1] if self.colour and mode == "site" else 1) * h * w


def psnr_per_image(x: torch.Tensor, y: torch.Tensor, image_dims: int) -> np.ndarray:
    dims = tuple(range(-image_dims, 0))
    mse = ((x.double() - y.double()) ** 2).mean(dims).reshape(-1)
    psnr = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-300))
    return psnr.clamp_max(PSNR_CAP).numpy()


def measure(case: Case, spec, mode: str, bonds: tuple[int, ...], terms: int, rho: float) -> dict:
    """Decompose the case's images with fixed bonds (found for ratio ``rho``, which they must not exceed);
    cached, so rules that agree cost nothing extra."""
    sites = case.layout(spec, mode).site_dims
    params = _budget.num_params(bonds, sites) * terms
    assert params <= rho * case.values(mode) + 1e-9, (spec, mode, bonds, terms, rho)  # the ratio is a cap
    key = (repr(spec), mode, bonds, terms)
    if key in case.cache:
        return case.cache[key]
    x = case.images
    h, w = x.shape[-2:]
    source, site_dims = x, spec
    if isinstance(spec, Block):  # edge padding, as make_layout pads
        pad = (0, spec.padded(w) - w, 0, spec.padded(h) - h)
        flat = x.reshape(-1, 1, h, w).float()
        source = torch.nn.functional.pad(flat, pad, mode="replicate").to(torch.uint8).reshape(*x.shape[:-2], -1)
        source = source.reshape(*x.shape[:-2], spec.padded(h), spec.padded(w))
        site_dims = spec.pairs(h, w)
    m = mpsdata.decompose(
        source, bond_dims=list(bonds), residual=terms - 1, site_dims=site_dims, channel_mode=mode, compute_bound=False
    )
    assert m.bond_dims == bonds and m.site_dims == sites, (m.bond_dims, bonds)  # the rules give tight bonds
    y = m.reconstruct(torch.uint8)[..., :h, :w]
    image_dims = 3 if case.colour else 2  # PSNR over all channels of an image, in either mode
    psnr = psnr_per_image(x, y, image_dims)
    mse = ((x.double() - y.double()) ** 2).mean().item()
    result = {
        "bonds": list(bonds),
        "ratio": params / case.values(mode),  # achieved: params over values of the original image, all terms
        "padded_ratio": params / math.prod(m.site_dims),  # the paper's ratio on the (padded) site tensor
        "psnr": float(psnr.mean()),
        "psnr_median": float(np.median(psnr)),
        "psnr_dataset": float(10 * math.log10(255.0**2 / max(mse, 1e-300))),
        "exact": float((psnr >= PSNR_CAP).mean()),
        "_per_image": psnr,
    }
    if not isinstance(spec, Block):
        assert abs(result["ratio"] - float(m.ratio.mean())) < 1e-9  # the library's own m.ratio agrees
    case.cache[key] = result
    return result


def run_case(case: Case, log) -> list[dict]:
    """Every layout x mode x rule x rho with one term, then residual terms for the best layouts."""
    rows = []
    for mode in case.modes:
        values = case.values(mode)
        for label, spec in case.layouts.items():
            layout = case.layout(spec, mode)
            tic = time.perf_counter()
            for rule in case.rules:
                for rho in RHOS:
                    try:
                        bonds = RULES[rule](layout.site_dims, rho, values, 1)
                    except ValueError:
                        continue  # below this layout's smallest ratio
                    if rule == "smallest":  # the library's own rule: the benchmark measures what it ships
                        assert bonds == _budget.bonds_for_ratio(layout.site_dims, rho, values, 1)
                    res = measure(case, spec, mode, bonds, 1, rho)
                    rows.append(_row(case, label, layout, mode, rule, rho, 0, res))
            log(f"    {label}: {time.perf_counter() - tic:.1f}s")
        log(f"  {case.name}, {mode}: {len(case.layouts)} layouts x {len(case.rules)} rules")
        if not case.residual_top:
            continue
        # Residual terms (paper Alg. 2) for the best one-term layouts, at the same total ratio.
        first = [r for r in rows if r["mode"] == mode and r["rule"] == case.rules[0] and r["residual"] == 0]
        for label in sorted(case.layouts, key=lambda lab: -_mean_psnr(first, lab))[: case.residual_top]:
            spec = case.layouts[label]
            layout = case.layout(spec, mode)
            for residual in (1, 2):
                for rho in RHOS:
                    try:
                        bonds = RULES[case.rules[0]](layout.site_dims, rho, values, residual + 1)
                    except ValueError:
                        continue
                    res = measure(case, spec, mode, bonds, residual + 1, rho)
                    rows.append(_row(case, label, layout, mode, case.rules[0], rho, residual, res))
        log(f"  {case.name}, {mode}: residual terms")
    return rows


def _mean_psnr(rows: list[dict], label: str, key: str = "psnr") -> float:
    """Mean PSNR of a layout over the rhos; a rho the layout cannot reach counts as 0 dB."""
    by_rho = {r["rho"]: r[key] for r in rows if r["layout"] == label}
    return sum(by_rho.get(rho, 0.0) for rho in RHOS) / len(RHOS)


def _row(case: Case, label: str, layout, mode: str, rule: str, rho: float, residual: int, res: dict) -> dict:
    h, w = case.images.shape[-2:]
    describe = layout.describe()
    if (layout.padded_height, layout.padded_width) != (h, w) and "padded" not in describe:
        describe += f", padded {h}x{w} -> {layout.padded_height}x{layout.padded_width}"
    channels = case.images.shape[1] if case.colour else 1
    return {
        "case": case.name,
        "layout": label,
        "describe": describe,
        "is_default": describe == make_layout(h, w, channels, None, mode).describe(),
        "is_row": describe == make_layout(h, w, channels, "row", mode).describe(),
        "is_hierarchical": describe == make_layout(h, w, channels, "hierarchical", mode).describe(),
        "is_svd": describe == make_layout(h, w, channels, [h, w], mode).describe(),
        "site_dims": list(layout.site_dims),
        "mode": mode,
        "rule": rule,
        "rho": rho,
        "residual": residual,
        **res,
    }


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of the per-image difference ``a - b`` and its standard error (same images, so paired)."""
    diff = a - b
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
    return float(diff.mean()), se


def paired_noise(rows: list[dict]) -> None:
    """Add paired PSNR differences: every row against the best layout at its rho (same rule and terms),
    and every residual row against one term of the same layout and total ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["mode"], r["rule"], r["residual"], r["rho"]), []).append(r)
    for group in groups.values():
        best = max(group, key=lambda r: r["psnr"])
        for r in group:
            r["vs_best"], r["vs_best_se"] = _paired(r["_per_image"], best["_per_image"])
            r["best_layout"] = best["layout"]
    one_term = {(r["case"], r["mode"], r["rule"], r["layout"], r["rho"]): r for r in rows if r["residual"] == 0}
    for r in rows:
        base = one_term.get((r["case"], r["mode"], r["rule"], r["layout"], r["rho"]))
        if r["residual"] and base is not None:
            r["vs_one_term"], r["vs_one_term_se"] = _paired(r["_per_image"], base["_per_image"])


# ---------------------------------------------------------------------------------------------------
# Layout candidates per size
def candidates_28() -> dict[str, object]:
    return {
        "row [2,4,7,7,2] (paper)": [2, 4, 7, 7, 2],
        "row [4,7,4,7]": [4, 7, 4, 7],
        "row [2,14,14,2]": [2, 14, 14, 2],
        "row [4,7,28]": [4, 7, 28],
        "row [28,4,7]": [28, 4, 7],
        "svd [28,28]": [28, 28],
        "hier (7,2,2)": [(7, 7), (2, 2), (2, 2)],
        "hier (2,2,7)": [(2, 2), (2, 2), (7, 7)],
        "hier (2,7,2)": [(2, 2), (7, 7), (2, 2)],
        "hier (7,4)": [(7, 7), (4, 4)],
        "hier (4,7)": [(4, 4), (7, 7)],
        "hier (14,2)": [(14, 14), (2, 2)],
        "hier (2,14)": [(2, 2), (14, 14)],
    }


def candidates_32() -> dict[str, object]:
    return {
        "row [4,4,4,4,4] (paper)": [4, 4, 4, 4, 4],
        "row [4,8,8,4]": [4, 8, 8, 4],
        "row [8,4,32]": [8, 4, 32],
        "row [32,4,8]": [32, 4, 8],
        "svd [32,32]": [32, 32],
        "hier (2,2,2,2,2)": [(2, 2)] * 5,
        "hier (4,4,2)": [(4, 4), (4, 4), (2, 2)],
        "hier (2,4,4)": [(2, 2), (4, 4), (4, 4)],
        "hier (8,4)": [(8, 8), (4, 4)],
        "hier (4,8)": [(4, 4), (8, 8)],
        "hier (16,2)": [(16, 16), (2, 2)],
        "hier (8,2,2)": [(8, 8), (2, 2), (2, 2)],
    }


def candidates_224() -> dict[str, object]:
    return {
        "row [7,8,16,8,7] (paper)": [7, 8, 16, 8, 7],
        "row [14,16,16,14]": [14, 16, 16, 14],
        "row [8,28,224]": [8, 28, 224],
        "row [224,14,16]": [224, 14, 16],
        "svd [224,224]": [224, 224],
        "hier (7,2,2,2,2,2)": [(7, 7)] + [(2, 2)] * 5,
        "hier (2,2,2,2,2,7)": [(2, 2)] * 5 + [(7, 7)],
        "hier (7,4,4,2)": [(7, 7), (4, 4), (4, 4), (2, 2)],
        "hier (14,4,4)": [(14, 14), (4, 4), (4, 4)],
        "hier (4,4,14)": [(4, 4), (4, 4), (14, 14)],
        "hier (28,8)": [(28, 28), (8, 8)],
        "hier (8,28)": [(8, 8), (28, 28)],
        "hier (14,16)": [(14, 14), (16, 16)],
        "hier (16,14)": [(16, 16), (14, 14)],
    }


def candidates_generic(size: int) -> dict[str, object]:
    """The family defaults plus two-level blocks of several sizes around ``size ** 0.4`` (padded if needed)."""
    fines = sorted({f for f in (2, 3, 4, 5, 6, 7, 8, 10, 12, 16) if 0.5 <= f / size**0.4 <= 2 and f <= size // 2})
    layouts: dict[str, object] = {"default": None, "svd": [size, size], "hierarchical": "hierarchical", "row": "row"}
    layouts.update({f"block {f}": Block(f) for f in fines})
    return layouts


# ---------------------------------------------------------------------------------------------------
def build_cases(args) -> tuple[list[Case], dict]:
    """The image sets and what to try on each; ``--quick`` shrinks every set and the 224x224 candidates."""
    quick = args.quick
    rules = tuple(args.rules.split(",")) if args.rules else (("smallest", "sqrt_fill") if quick else tuple(RULES))
    fashion = load_fashion(Path(args.fashion), 500 if quick else 2000)
    photos = skimage_photos()
    p32 = patches(photos, 32, (64, 96, 128), limit=120 if quick else None)
    five = {"five": lambda size: not quick, "centre": lambda size: False, "auto": lambda size: size <= 128}[args.crops]
    c224 = crops(photos, 224, 256, five=five(224))
    layouts_224 = candidates_224()
    if quick:  # 224x224 costs most (the eigensolver on 224x224 Gram matrices): 5 images, 4 layouts
        c224 = c224[:5]
        keep = ("paper", "svd", "(7,2,2,2,2,2)", "(28,8)")
        layouts_224 = {k: v for k, v in layouts_224.items() if any(part in k for part in keep)}
    cases = [
        Case("fashion 28x28", fashion, candidates_28(), rules=rules, residual_top=2 if quick else 3),
        Case("photos 32x32", p32, candidates_32(), ("separate", "site"), rules, 2 if quick else 3),
        Case(
            "photos 224x224",
            c224,
            layouts_224,
            ("separate", "site"),
            rules[:1] if quick else tuple(r for r in rules if r in ("smallest", "sqrt_fill")) or rules[:1],
            0 if quick else 3,
        ),
    ]
    sizes = (28, 29, 48) if quick else (28, 29, 48, 64, 96, 100, 128, 227)
    for size in [int(v) for v in args.sizes.split(",")] if args.sizes else sizes:
        images = crops(photos, size, round(size * 8 / 7), five=five(size))
        name = f"photos {size}x{size}" + (" (blocks)" if size == 224 else "")  # not the 224x224 case above
        cases.append(Case(name, images, candidates_generic(size), ("separate", "site")))
    info = {
        "fashion_images": fashion.shape[0],
        "photos": {k: list(v.shape) for k, v in photos.items()},
        **{c.name: list(c.images.shape) for c in cases},
    }
    return cases, info


def _selected(rows: list[dict], case: str, mode: str, rule: str | None = None, residual: int = 0) -> list[dict]:
    return [
        r
        for r in rows
        if r["case"] == case and r["mode"] == mode and r["residual"] == residual and rule in (None, r["rule"])
    ]


def layout_table(rows: list[dict], case: str, mode: str, rule: str) -> str:
    """PSNR (achieved ratio) per layout and rho, one term; ``*`` marks the library default."""
    sel = _selected(rows, case, mode, rule)
    lines = [
        f"| {case}, {mode} | " + " | ".join(f"{rho}" for rho in RHOS) + " | mean | mean (pooled) |",
        "|---|" + "---|" * (len(RHOS) + 2),
    ]
    for label in dict.fromkeys(r["layout"] for r in sel):
        hits = {r["rho"]: r for r in sel if r["layout"] == label}
        cells = [f"{hits[rho]['psnr']:.2f} ({hits[rho]['ratio']:.2f})" if rho in hits else "-" for rho in RHOS]
        star = " *" if next(iter(hits.values()))["is_default"] else ""
        dataset = _mean_psnr(sel, label, "psnr_dataset")
        lines.append(f"| {label}{star} | " + " | ".join(cells) + f" | {_mean_psnr(sel, label):.2f} | {dataset:.2f} |")
    return "\n".join(lines)


def rule_table(rows: list[dict], cases: list[Case]) -> str:
    """Mean PSNR of each allocation rule over the (layout, rho) pairs every rule reaches."""
    lines = []
    for case in cases:
        if len(case.rules) < 2:
            continue
        for mode in case.modes:
            by_key: dict[tuple, dict[str, float]] = {}
            for r in _selected(rows, case.name, mode):
                by_key.setdefault((r["layout"], r["rho"]), {})[r["rule"]] = r["psnr"]
            full = [v for v in by_key.values() if len(v) == len(case.rules)]
            means = {rule: sum(v[rule] for v in full) / len(full) for rule in case.rules}
            wins = {rule: sum(v[rule] >= max(v.values()) - 1e-9 for v in full) for rule in case.rules}
            if not lines:
                lines = ["| case, channels (layout x rho pairs) | " + " | ".join(case.rules) + " |"]
                lines.append("|---|" + "---|" * len(case.rules))
            cells = [f"{means[rule]:.2f} ({wins[rule]})" for rule in case.rules]
            lines.append(f"| {case.name}, {mode} ({len(full)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def residual_table(rows: list[dict], cases: list[Case]) -> str:
    """PSNR of 1 and 2 residual terms minus one term at the same total ratio (paired, +- std. error)."""
    lines = ["| case, channels, layout | terms | " + " | ".join(f"{rho}" for rho in RHOS) + " | mean |"]
    lines.append("|---|---|" + "---|" * (len(RHOS) + 1))
    for case in cases:
        if not case.residual_top:
            continue
        for mode in case.modes:
            labels = dict.fromkeys(r["layout"] for r in _selected(rows, case.name, mode, case.rules[0], 1))
            for label in labels:
                for residual in (1, 2):
                    sel = _selected(rows, case.name, mode, case.rules[0], residual)
                    hits = {r["rho"]: r for r in sel if r["layout"] == label and "vs_one_term" in r}
                    cells = [
                        f"{hits[rho]['vs_one_term']:+.2f}+-{hits[rho]['vs_one_term_se']:.2f}" if rho in hits else "-"
                        for rho in RHOS
                    ]
                    mean = sum(h["vs_one_term"] for h in hits.values()) / max(1, len(hits))
                    lines.append(
                        f"| {case.name}, {mode}, {label} | 1+{residual} | " + " | ".join(cells) + f" | {mean:+.2f} |"
                    )
    return "\n".join(lines)


def default_table(rows: list[dict], cases: list[Case]) -> str:
    """The default layout against the best measured one at every rho (paired difference +- std. error)."""
    lines = ["| case, channels | default | " + " | ".join(f"{rho}" for rho in RHOS) + " |"]
    lines.append("|---|---|" + "---|" * len(RHOS))
    for case in cases:
        for mode in case.modes:
            sel = _selected(rows, case.name, mode, case.rules[0])
            default = next((r for r in sel if r["is_default"]), None)
            if default is None:
                continue
            cells = []
            for rho in RHOS:
                hit = next((r for r in sel if r["is_default"] and r["rho"] == rho), None)
                if hit is None:
                    cells.append("-")
                elif hit["layout"] == hit["best_layout"] or hit["vs_best"] == 0:
                    cells.append("best")
                else:
                    cells.append(f"{hit['vs_best']:+.2f}+-{hit['vs_best_se']:.2f} ({hit['best_layout']})")
            lines.append(f"| {case.name}, {mode} | {default['describe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(rows: list[dict], cases: list[Case]) -> str:
    """Mean PSNR over the rhos (one term, first rule): the default, the best layout and the named families."""
    lines = ['| case, channels | default | best measured | plain SVD | "row" (paper) | "hierarchical" |']
    lines.append("|---|---|---|---|---|---|")
    for case in cases:
        for mode in case.modes:
            sel = _selected(rows, case.name, mode, case.rules[0])
            means = {label: _mean_psnr(sel, label) for label in dict.fromkeys(r["layout"] for r in sel)}

            def of(flag: str, sel=sel, means=means) -> str:
                label = next((r["layout"] for r in sel if r[flag]), None)
                return "-" if label is None else f"{means[label]:.2f}"

            best = max(means, key=means.get)
            cells = [of("is_default"), f"{means[best]:.2f} ({best})", of("is_svd"), of("is_row"), of("is_hierarchical")]
            lines.append(f"| {case.name}, {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rename_run_default(rows: list[dict]) -> list[dict]:
    """Name the rows of the ``"default"`` candidate (the default when the run was made) by what they measured,
    ``"svd"`` or ``"block <fine>"``, and drop them where the same layout was measured under that name."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = [r for r in rows if r["mode"] == mode]
        named = {r["describe"]: r["layout"] for r in sel if r["layout"] != "default"}
        ran = next((r["describe"] for r in sel if r["layout"] == "default"), None)
        if ran is None:
            out += sel
            continue
        fine = re.findall(r"\((\d+), \d+\)\]", ran)
        label = named.get(ran) or ("svd" if ran.startswith("row") else f"block {fine[-1]}" if fine else ran)
        for r in sel:
            if r["layout"] == "default" and ran in named:
                continue
            r["layout"] = label if r["layout"] == "default" else r["layout"]
            r["best_layout"] = label if r.get("best_layout") == "default" else r.get("best_layout")
            out.append(r)
    return out


@dataclass(frozen=True)
class _Stored:
    """What the table functions read of a :class:`Case`, rebuilt from a results file."""

    name: str
    modes: tuple[str, ...]
    rules: tuple[str, ...]
    residual_top: int


def tables(paths: Sequence[str]) -> str:
    """Every markdown table of one or more results files (the tables of docs/layouts.md).

    ``is_default`` is recomputed with the library's current default, so the tables follow it.
    """
    rows: list[dict] = []
    cases: list[_Stored] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for name in dict.fromkeys(r["case"] for r in data["rows"]):
            sel = [r for r in data["rows"] if r["case"] == name]
            shape = data["meta"][name]
            h, w = shape[-2:]
            channels = shape[1] if len(shape) == 4 else 1
            for r in sel:
                r["is_default"] = r["describe"] == make_layout(h, w, channels, None, r["mode"]).describe()
            sel = _rename_run_default(sel)
            modes = tuple(dict.fromkeys(r["mode"] for r in sel))
            rules = tuple(dict.fromkeys(r["rule"] for r in sel))
            cases.append(_Stored(name, modes, rules, int(any(r["residual"] for r in sel))))
            rows += sel
    out = [layout_table(rows, c.name, mode, c.rules[0]) for c in cases for mode in c.modes]
    out.append("## Mean PSNR over the ratios\n\n" + summary_table(rows, cases))
    out.append("## Colour: one MPS per channel or the channels as a site\n\n" + colour_table(rows, cases))
    out.append("## Allocation rules: mean PSNR (wins)\n\n" + rule_table(rows, cases))
    out.append("## Residual terms at the same total ratio\n\n" + residual_table(rows, cases))
    out.append("## Default against the best layout (dB, paired)\n\n" + default_table(rows, cases))
    return "\n\n".join(out)


def colour_table(rows: list[dict], cases: Sequence) -> str:
    """Mean PSNR over the ratios with one MPS per channel against the channels as a site, same total ratio."""
    lines = ["| case | default, separate | default, site | site - separate | best separate | best site |"]
    lines.append("|---|---|---|---|---|---|")
    for case in cases:
        if tuple(case.modes) != ("separate", "site"):
            continue
        cells = {}
        for mode in case.modes:
            sel = _selected(rows, case.name, mode, case.rules[0])
            means = {label: _mean_psnr(sel, label) for label in dict.fromkeys(r["layout"] for r in sel)}
            default = next((r["layout"] for r in sel if r["is_default"]), None)
            cells[mode] = (means.get(default, math.nan), max(means.values()))
        (sep, best_sep), (site, best_site) = cells["separate"], cells["site"]
        sep_text, site_text, diff = (
            "-" if math.isnan(v) else f"{v:{f}}" for v, f in ((sep, ".2f"), (site, ".2f"), (site - sep, "+.2f"))
        )
        lines.append(f"| {case.name} | {sep_text} | {site_text} | {diff} | {best_sep:.2f} | {best_site:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, sizes and rules (about 3 minutes)")
    parser.add_argument("--fashion", default="/work/shared/datasets/fashion-mnist", help="Fashion-MNIST idx folder")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/layouts[-quick].json)")
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these (comma separated)")
    parser.add_argument(
        "--crops",
        choices=("five", "centre", "auto"),
        default="five",
        help="photo crops per photo: five (centre and corners), centre only, or auto (five up to 128 px, else centre)",
    )
    parser.add_argument("--sizes", default="", help="sizes of the 'photos NxN' cases (comma separated)")
    parser.add_argument("--rules", default="", help=f"allocation rules to compare, comma separated, from {list(RULES)}")
    parser.add_argument("--tables", nargs="+", default=None, help="print the tables of results files, run nothing")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(args.tables))
        return 0
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    cases, info = build_cases(args)
    if args.cases:
        cases = [c for c in cases if any(part in c.name for part in args.cases.split(","))]
    log(f"data: {info}")
    out = Path(args.out or ROOT / f"benchmarks/results/layouts{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["benchmarks/layouts.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "rhos": RHOS,
        "psnr": f"mean over images of 10 log10(255^2 / MSE), uint8 reconstruct, capped at {PSNR_CAP} dB",
        "ratio": "achieved: parameters of all terms over values of the original image (m.ratio)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_at_start": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        **info,
        "cases_run": [c.name for c in cases],
    }
    rows: list[dict] = []
    for case in cases:
        case_rows = run_case(case, log)
        case.cache.clear()
        paired_noise(case_rows)
        for mode in case.modes:
            print(f"\n{layout_table(case_rows, case.name, mode, case.rules[0])}\n", flush=True)
        rows += [{k: v for k, v in r.items() if not k.startswith("_")} for r in case_rows]
        meta["seconds"] = round(time.perf_counter() - start, 1)
        meta["machine"]["load_now"] = os.getloadavg()
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # after every case: partial runs count
    print("\n## Mean PSNR over the ratios\n\n" + summary_table(rows, cases))
    print("\n## Allocation rules: mean PSNR (wins)\n\n" + rule_table(rows, cases))
    print("\n## Residual terms at the same total ratio\n\n" + residual_table(rows, cases))
    print("\n## Default against the best layout (dB, paired)\n\n" + default_table(rows, cases))
    log(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
