"""Accuracy of a fresh network trained on each compressed training set: the paper's Table 1 under one protocol.

Every arm trains the same recipe (``benchmarks/harness.py``) on one training set made by one method at one budget,
and is tested on the 10,000 ORIGINAL test images with the model after its last epoch; nothing is chosen on the
test set. Seeds 0, 1, 2 (the seed fixes the initialisation, dropout, the batch order and the random coreset).

Run (CPU, real Fashion-MNIST; resumable: finished runs are kept in the JSON and skipped, every reconstructed
training set is cached as uint8 ``.npy`` under ``--cache``; several invocations with different ``--stages`` may
share one JSON, saves merge under a file lock)::

    python benchmarks/accuracy.py --fashion ../shared/datasets/fashion-mnist --out benchmarks/results/accuracy.json

Stages (``--stages``, default all but ``candidates``): ``select`` (validation runs choosing mpsdata best),
``param`` (Table 1 at equal rho), ``residual`` (the best residual configuration, when best is not one),
``bytes`` (equal bytes), ``low`` (rho below 40 %), ``mlp`` (another architecture), ``candidates`` (every mpsdata
configuration on the test set, seed 0). Seeds: ``--seeds`` (default 0 1 2), ``--select-seeds`` (default 0),
``--low-seeds`` (default the first seed), ``--mlp-seeds`` (default ``--seeds``).

Quick check (the first 5,000 training images, 1 seed, 1 epoch, every arm; the core files are built on those
5,000 images only)::

    python benchmarks/accuracy.py --quick --fashion ../shared/datasets/fashion-mnist --cache /tmp/acc-quick

Tables and claims of a finished run (markdown, as in docs/reproduction.md)::

    python benchmarks/accuracy.py --report benchmarks/results/accuracy.json

Arms (``rho`` is the paper's ratio: stored values over pixel values; solved into bonds/ranks never above it):

* ``whole``: the original training set;
* at rho = 0.4 and 0.7 (the paper's axis): ICE (``baselines.ice``, 2-D DCT first, as the paper describes it;
  hierarchical sites ``[(7, 7), (2, 2), (2, 2)]``), random and k-center coresets (a fraction rho of the original
  images; k-center: greedy farthest point on pixels, first centre from seed 0, the same subset for every training
  seed), SVD, CP (TensorLy ALS), and mpsdata best;
* mpsdata candidates, explicit layouts (never the package default): row-major ``[2, 4, 7, 7, 2]`` and
  hierarchical ``[(7, 7), (2, 2), (2, 2)]``, each with one term and with one residual term (``residual=1``, the
  same total ratio), and the two-site layout ``[28, 28]`` (``svd-layout``: the truncated SVD of the image, stored
  as float16 cores). mpsdata images are exactly what ``MPSFashionMNIST`` serves from its float16 core file
  (``decode_batch``);
* "mpsdata best" per ratio: the candidate with the highest accuracy on a validation split carved from the
  TRAINING set (5,000 original training images held out; the candidates are trained on the other 55,000
  compressed images with the same recipe, ``--select-seeds``, mean accuracy; ties: fewer bytes); the test set
  plays no part in the choice. Only mpsdata best (and the residual configuration ranked first, ``residual``) are
  trained on the full training set with every seed;
* at equal bytes (the honest axis): with ``b`` = the bytes ratio of mpsdata best (2 bytes per parameter, the
  float16 cores), WebP and JPEG training sets with every image at most ``b`` times its raw uint8 bytes (the
  highest quality that fits, per image), area-downsampled images stored as uint8 at ``b`` values per pixel and
  upsampled bicubically, and a random coreset of a fraction ``b`` (the last two only where ``b < 1``; at
  ``b >= 1`` the whole uint8 training set costs less than mpsdata);
* below 40 % (the paper's claim that SVD and CP fail there): SVD, CP and mpsdata (the configuration ranked first
  at rho = 0.4 that fits the budget, and the first with more than two sites) at rho = 0.1 and 0.2;
* another architecture (the CPU stand-in for Table 2): the MLP of the harness on whole, ICE, SVD and mpsdata best.

Budget accounting, per image of the ORIGINAL training set (coresets amortise their kept images over all of it):
mpsdata 2 bytes per parameter (float16 cores; the core file's own size is reported beside it), ICE, SVD and CP
4 bytes per parameter (float32 factors, ``mpsdata.baselines``), codecs their encoded file, downsampling one byte
per stored value, coresets and whole one byte per pixel of each kept image. Labels are not counted anywhere.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

import mpsdata
from mpsdata import _signal, baselines

__all__ = [
    "Arm",
    "Builder",
    "DataSpec",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "TrainingSet",
    "fashion_spec",
    "load_fashion",
    "markdown",
    "claims",
    "paired",
    "verdict",
    "psnr",
    "robust_cp",
    "select_best",
    "summarize",
    "validation_split",
]

STAGES = ("select", "param", "residual", "bytes", "low", "mlp", "candidates")
RATIOS = (0.4, 0.7)
LOW_RATIOS = (0.1, 0.2)
FASHION_MPS_CONFIGS: dict[str, dict[str, Any]] = {
    "row": {"site_dims": [2, 4, 7, 7, 2], "residual": 0},
    "row+res1": {"site_dims": [2, 4, 7, 7, 2], "residual": 1},
    "hier": {"site_dims": [(7, 7), (2, 2), (2, 2)], "residual": 0},
    "hier+res1": {"site_dims": [(7, 7), (2, 2), (2, 2)], "residual": 1},
    "svd-layout": {"site_dims": [28, 28], "residual": 0},
}
FASHION_ICE_SITES = [(7, 7), (2, 2), (2, 2)]
MPS_BYTES_PER_PARAM = 2  # float16 cores, as MPSFashionMNIST stores them
#: The paper's test accuracies (%), ResNet18, Table 1's Fashion-MNIST row, keyed by our method names.
PAPER_TABLE1 = {
    0.4: {"ice+dct": 91.42, "random": 91.42, "k-center": 83.36, "svd": 91.26, "cp": 89.01, "ours": 91.46},
    0.7: {"ice+dct": 92.55, "random": 92.78, "k-center": 86.02, "svd": 91.98, "cp": 90.11, "ours": 93.35},
    "whole": 93.83,
}
#: Table 2 (rho = 0.7, Fashion-MNIST): architecture -> (ICE, ours).
PAPER_TABLE2 = {"resnet18": (92.55, 93.35), "vgg16": (92.37, 93.21), "mobilenetv2": (92.73, 93.93)}
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CACHE_VERSION = 1  # bump when a method's output changes, so that stale cached arrays are not reused


# ---------------------------------------------------------------------------------------------------------
# Data
def read_idx(path: Path) -> np.ndarray:
    """An idx array (MNIST format), gzip-compressed or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from its four idx ``.gz`` files: train images ``(N, 1, 28, 28)`` uint8, labels int64, test."""
    arrays = {key: read_idx(Path(folder) / name) for key, name in FASHION_FILES.items()}
    return (
        torch.from_numpy(arrays["train_images"].copy())[:, None],
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy())[:, None],
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def fashion_root(folder: Path, root: Path, limit: int | None = None) -> Path:
    """A torchvision-style root (``root/FashionMNIST/raw``) holding the raw files, where MPS core files are built.

    The files are symbolic links to ``folder``'s; with ``limit`` the training files are copies cut to their first
    ``limit`` images (``--quick``: the core files then hold only the pool, not all 60,000 images).
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for key, name in FASHION_FILES.items():
        target = raw / name
        if target.exists() or target.is_symlink():
            continue
        if limit is None or not key.startswith("train"):
            target.symlink_to(Path(folder).resolve() / name)
            continue
        array = read_idx(Path(folder) / name)[:limit]
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        tmp = target.with_name(f".{name}.{os.getpid()}")
        with gzip.open(tmp, "wb") as f:
            f.write(header + np.ascontiguousarray(array).tobytes())
        os.replace(tmp, target)
    return Path(root)


@dataclass(frozen=True)
class DataSpec:
    """What the arm builders need to know of a dataset.

    Attributes:
        name: Short name used in cache keys, e.g. ``"fashion"``.
        dataset_cls: The mpsdata dataset class (``mpsdata.MPSFashionMNIST``) that builds and serves core files.
        root: Its torchvision-style root holding the raw training files.
        mps_configs: Candidate mpsdata configurations, name -> ``{"site_dims": ..., "residual": ...}``.
        ice_sites: Hierarchical sites of ICE.
        dataset_kwargs: Extra keyword arguments of ``dataset_cls`` (e.g. ``channel_mode``).
    """

    name: str
    dataset_cls: type
    root: Path
    mps_configs: dict[str, dict[str, Any]]
    ice_sites: Any
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)


def fashion_spec(root: Path) -> DataSpec:
    """The Fashion-MNIST spec of the CPU protocol (``root`` from :func:`fashion_root`)."""
    return DataSpec("fashion", mpsdata.MPSFashionMNIST, Path(root), FASHION_MPS_CONFIGS, FASHION_ICE_SITES)


# ---------------------------------------------------------------------------------------------------------
# Arms and their training sets
@dataclass(frozen=True)
class Arm:
    """One training set: a method at a budget.

    Attributes:
        method: ``whole``, ``mps``, ``ice+dct``, ``svd``, ``cp``, ``random``, ``k-center``, ``webp``, ``jpeg`` or
            ``downsample``.
        ratio: The paper's ratio rho (factor methods, mpsdata), the fraction of images kept (coresets), or
            values per pixel (downsample).
        bytes_ratio: Byte budget per image over its raw uint8 bytes (codecs).
        config: mpsdata configuration name (``DataSpec.mps_configs``).
        axis: ``"param"`` (equal rho), ``"bytes"`` (equal bytes) or ``"low"`` (rho below 40 %), for the tables.
    """

    method: str
    ratio: float | None = None
    bytes_ratio: float | None = None
    config: str | None = None
    axis: str = "param"

    @property
    def name(self) -> str:
        if self.method == "whole":
            return "whole"
        label = self.method if self.config is None else f"mps {self.config}"
        if self.axis == "bytes":
            budget = self.bytes_ratio if self.bytes_ratio is not None else self.ratio
            return f"{label} bytes={budget:.3f}"
        return f"{label} rho={self.ratio:g}"


@dataclass
class TrainingSet:
    """A training set and what it costs: ``images`` uint8 ``(n, C, H, W)``, ``targets`` int64, ``info`` budget."""

    images: torch.Tensor
    targets: torch.Tensor
    info: dict[str, Any]


def psnr(rec: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR (dB, uint8 scale, capped at 100 dB)."""
    return float(_signal.psnr(rec, ref).mean()) if len(rec) else float("nan")


def budget(images_kept: int, pool: int, chw: int, nbytes_per_kept: float, ratio: float, note: str) -> dict:
    """Budget of a training set per image of the original dataset (coresets amortise their kept images)."""
    per_image = nbytes_per_kept * images_kept / pool
    return {
        "ratio": ratio,
        "bytes_per_image": per_image,
        "bytes_ratio": per_image / chw,
        "bytes_note": note,
        "train_images": images_kept,
    }


class Builder:
    """Makes every arm's training set from a pool of original training images, caching arrays on disk.

    Args:
        spec: The dataset (mpsdata class, root, candidate configurations).
        pool_images: uint8 ``(N, C, H, W)``: the original training images an arm compresses or selects from;
            they must be the first ``N`` images of ``spec.dataset_cls(spec.root, train=True)``.
        pool_targets: int64 ``(N,)``.
        cache: Folder of cached arrays (``<key>.npy`` + ``<key>.json``) and MPS core files (``cache/mps``).
        log: Progress printer.
        kcenter_fraction: Fraction of the pool the k-center order is computed for once (every smaller coreset
            is its prefix: greedy farthest-point selection is nested).
        kcenter_device: Where the k-center distances are computed.
    """

    def __init__(
        self,
        spec: DataSpec,
        pool_images: torch.Tensor,
        pool_targets: torch.Tensor,
        cache: Path,
        log: Callable[[str], None] = print,
        kcenter_fraction: float = max(RATIOS),
        kcenter_device: str | torch.device = "cpu",
    ) -> None:
        if pool_images.dtype != torch.uint8 or pool_images.ndim != 4:
            raise TypeError(
                f"pool_images must be uint8 (N, C, H, W), got {pool_images.dtype} {tuple(pool_images.shape)}"
            )
        if len(pool_images) != len(pool_targets):
            raise ValueError(f"{len(pool_images)} pool images but {len(pool_targets)} targets")
        self.spec = spec
        self.pool = pool_images
        self.targets = pool_targets
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.kcenter_fraction = kcenter_fraction
        self.kcenter_device = kcenter_device
        self.chw = math.prod(pool_images.shape[1:])
        digest = hashlib.sha256(pool_images[: min(len(pool_images), 256)].numpy().tobytes()).hexdigest()[:8]
        self.pool_id = f"{spec.name}{len(pool_images)}-{digest}"

    # -- public ------------------------------------------------------------------------------------------
    def training_set(self, arm: Arm, seed: int = 0) -> TrainingSet:
        """The training set of ``arm`` (``seed`` draws the random coreset; other arms ignore it)."""
        n = len(self.pool)
        if arm.method == "whole":
            info = budget(n, n, self.chw, self.chw, 1.0, "uint8 pixels")
            return TrainingSet(self.pool, self.targets, {**info, "psnr": None, "settings": {}})
        if arm.method in ("random", "k-center"):
            fraction = arm.ratio if arm.axis != "bytes" else arm.bytes_ratio
            if arm.method == "random":
                idx = baselines.random_coreset(n, fraction, seed=seed)
                settings = {"seed": seed}
            else:
                idx = self.kcenter_indices(fraction)
                settings = {"seed": 0, "features": "pixels"}
            idx = idx.sort().values
            info = budget(len(idx), n, self.chw, self.chw, len(idx) / n, "uint8 pixels of the kept images")
            return TrainingSet(self.pool[idx], self.targets[idx], {**info, "psnr": None, "settings": settings})
        images, info = self._cached(arm)
        return TrainingSet(images, self.targets, info)

    def mps_dataset(self, ratio: float, config: str):
        """The mpsdata dataset (float16 core file under ``cache/mps``) of one configuration at one ratio."""
        options = self.spec.mps_configs[config]
        return self.spec.dataset_cls(
            self.spec.root,
            train=True,
            ratio=ratio,
            site_dims=options["site_dims"],
            residual=options["residual"],
            core_dtype="float16",
            archive_dir=self.cache / "mps",
            **self.spec.dataset_kwargs,
        )

    def kcenter_indices(self, fraction: float) -> torch.Tensor:
        """Greedy k-center subset (pixels, first centre from seed 0), a prefix of one cached selection order."""
        k = math.floor(fraction * len(self.pool) + 1e-9)
        k_max = max(k, math.floor(self.kcenter_fraction * len(self.pool) + 1e-9))
        for path in sorted(self.cache.glob(f"kcenter-{self.pool_id}-seed0-k*.npy")):
            if int(path.stem.rsplit("-k", 1)[1]) >= k:
                return torch.from_numpy(np.load(path)[:k])
        began = time.perf_counter()
        self.log(f"k-center order of {k_max} of {len(self.pool)} images (one-time, cached)")
        features = self.pool.reshape(len(self.pool), -1).to(self.kcenter_device)
        order = baselines.k_center_coreset(features, k_max / len(self.pool), seed=0)
        np.save(self.cache / f"kcenter-{self.pool_id}-seed0-k{len(order)}.npy", order.numpy())
        self.log(f"k-center: {time.perf_counter() - began:.0f} s")
        return order[:k]

    # -- reconstruction methods, cached --------------------------------------------------------------------
    def _key(self, arm: Arm) -> str:
        parts = {
            "v": CACHE_VERSION,
            "pool": self.pool_id,
            "method": arm.method,
            "ratio": arm.ratio,
            "bytes": arm.bytes_ratio,
            "config": None if arm.config is None else self.spec.mps_configs[arm.config],
            "ice_sites": self.spec.ice_sites if arm.method == "ice+dct" else None,
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{arm.method}-{self.pool_id}-{digest}"

    def _cached(self, arm: Arm) -> tuple[torch.Tensor, dict[str, Any]]:
        key = self._key(arm)
        array_path, info_path = self.cache / f"{key}.npy", self.cache / f"{key}.json"
        if array_path.exists() and info_path.exists():
            return torch.from_numpy(np.load(array_path)), json.loads(info_path.read_text())
        began = time.perf_counter()
        images, info = self._reconstruct(arm)
        if images.dtype != torch.uint8 or images.shape != self.pool.shape:
            raise RuntimeError(
                f"{arm.name}: got {images.dtype} {tuple(images.shape)}, expected uint8 {self.pool.shape}"
            )
        info["psnr"] = psnr(images, self.pool)
        info["build_seconds"] = time.perf_counter() - began
        tmp = array_path.with_name(f".{key}.{os.getpid()}.npy")
        np.save(tmp, images.numpy())
        os.replace(tmp, array_path)
        info_path.write_text(json.dumps(info, indent=1, default=str))
        self.log(
            f"built {arm.name}: psnr {info['psnr']:.2f} dB, bytes ratio {info['bytes_ratio']:.3f} "
            f"({info['build_seconds']:.0f} s)"
        )
        return images, info

    def _reconstruct(self, arm: Arm) -> tuple[torch.Tensor, dict[str, Any]]:
        n, chw, x = len(self.pool), self.chw, self.pool
        if arm.method == "mps":
            ds = self.mps_dataset(arm.ratio, arm.config)
            if len(ds) < n or not torch.equal(torch.as_tensor(ds.targets[:n]), self.targets):
                raise ValueError(f"the pool is not the first {n} images of {type(ds).__name__}({self.spec.root})")
            images = torch.cat([ds.decode_batch(np.arange(s, min(s + 8192, n))) for s in range(0, n, 8192)])
            options = self.spec.mps_configs[arm.config]
            probe = mpsdata.decompose(x[:1], arm.ratio, site_dims=options["site_dims"], residual=options["residual"])
            ratio = float(ds.ratio)
            info = budget(n, n, chw, MPS_BYTES_PER_PARAM * ratio * chw, ratio, "float16 cores, 2 bytes/param")
            info["file_bytes_ratio"] = float(ds.bytes_ratio)
            info["settings"] = {
                "site_dims": [list(d) if isinstance(d, tuple) else d for d in options["site_dims"]],
                "residual": options["residual"],
                "bond_dims": list(probe.bond_dims),
                "layout": probe.layout.describe(),
                "archive": str(ds.archive),
            }
            return images, info
        if arm.method == "cp":
            return robust_cp(x, arm.ratio)
        if arm.method in ("ice+dct", "svd"):
            if arm.method == "ice+dct":
                result = baselines.ice(x, arm.ratio, transform="dct", site_dims=self.spec.ice_sites)
            else:
                result = baselines.svd(x, arm.ratio)
            ratio = float(result.ratio.mean())
            info = budget(n, n, chw, float(result.nbytes.double().mean()), ratio, "float32 factors, 4 bytes/param")
            info["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in result.settings.items()}
            return result.images, info
        if arm.method in ("webp", "jpeg"):
            result = getattr(baselines, arm.method)(x, bytes_ratio=arm.bytes_ratio)
            quality = torch.as_tensor(result.settings["quality"], dtype=torch.float64)
            info = budget(n, n, chw, float(result.nbytes.double().mean()), None, "encoded file per image")
            info["settings"] = {
                "budget_bytes_ratio": arm.bytes_ratio,
                "max_image_bytes_ratio": float(result.bytes_ratio.max()),
                "quality_min_median_max": [float(quality.min()), float(quality.median()), float(quality.max())],
            }
            return result.images, info
        if arm.method == "downsample":
            result = baselines.downsample_upsample(x, arm.bytes_ratio)
            ratio = float(result.ratio.mean())
            info = budget(n, n, chw, float(result.nbytes.double().mean()), ratio, "uint8 small image")
            info["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in result.settings.items()}
            return result.images, info
        raise ValueError(f"unknown method {arm.method!r}")


def robust_cp(x: torch.Tensor, ratio: float, chunk: int = 500) -> tuple[torch.Tensor, dict[str, Any]]:
    """``baselines.cp`` on every image, with a fallback where TensorLy's ALS fails.

    ``baselines.cp`` raises ``numpy.linalg.LinAlgError`` ("Singular matrix") on an image whose matrix rank is
    below the CP rank (e.g. Fashion-MNIST training image 30 has rank 7; rho = 0.7 asks for rank 9). Such an image
    is decomposed again at the next lower rank until ALS succeeds, which happens at or below its own rank, so it
    is reconstructed exactly. Its budget is still counted at the nominal rank (the stored slots; an upper bound).
    """
    n, c, h, w = x.shape
    dims_sum = h + w + (c if c > 1 else 0)
    rank = math.floor(ratio * c * h * w / dims_sum + 1e-9)
    out = torch.empty_like(x)
    fallbacks = []
    for start in range(0, n, chunk):
        try:
            out[start : start + chunk] = baselines.cp(x[start : start + chunk], ratio).images
        except np.linalg.LinAlgError:
            for i in range(start, min(start + chunk, n)):
                r = rank
                while True:
                    try:
                        result = baselines.cp(x[i : i + 1], min(ratio, r * dims_sum / (c * h * w) + 1e-12))
                        break
                    except np.linalg.LinAlgError:
                        if r == 1:
                            raise
                        r -= 1
                out[i] = result.images[0]
                if r < rank:
                    fallbacks.append(i)
    params = rank * dims_sum
    info = budget(n, n, c * h * w, 4.0 * params, params / (c * h * w), "float32 factors, 4 bytes/param")
    info["settings"] = {"rank": rank, "lower_rank_fallbacks": len(fallbacks), "fallback_images": fallbacks[:50]}
    return out, info


# ---------------------------------------------------------------------------------------------------------
# Validation split and the choice of "mpsdata best"
def validation_split(n: int, count: int, seed: int = 2024) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted ``(train, val)`` indices of ``range(n)``: ``count`` images drawn for validation."""
    if not 0 < count < n:
        raise ValueError(f"the validation split must hold between 1 and n - 1 = {n - 1} images, got {count}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[count:].sort().values, perm[:count].sort().values


def select_best(scores: dict[str, Sequence[float]], bytes_ratio: dict[str, float] | None = None) -> list[str]:
    """Configurations ranked by mean validation accuracy (ties: fewer bytes, then name); best first."""
    bytes_ratio = bytes_ratio or {}
    # means rounded so that equal accuracies reached in another order tie (0.8 + 0.9 vs 0.85 + 0.85)
    return sorted(scores, key=lambda c: (-round(statistics.fmean(scores[c]), 9), bytes_ratio.get(c, 0.0), c))


# ---------------------------------------------------------------------------------------------------------
# Results
def _protocol(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a configuration that decide what a finished run means (seeds and candidates may grow)."""
    validation = config.get("validation", {})
    keys = (
        "dataset",
        "train_images",
        "test_images",
        "epochs",
        "recipe",
        "recipe_name",
        "max_steps",
        "select",
        "ice_sites",
        "mps_bytes_per_param",
    )
    return {
        **{key: config.get(key) for key in keys},
        "validation": {key: validation.get(key) for key in ("count", "split_seed")},
    }


class Results:
    """The output JSON; finished runs are kept and skipped by a rerun with the same protocol.

    Saving merges what another process running the same protocol wrote meanwhile (under a file lock), so two
    invocations with different ``--stages`` can share one JSON.
    """

    SECTIONS = ("data", "runs", "select_runs")

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"config": config, "data": {}, "runs": {}, "selection": {}, "select_runs": {}}
        old = self._read()
        if old is not None and _protocol(old.get("config", {})) == _protocol(config):
            self.data = {**old, "config": config}
            for section in (*self.SECTIONS, "selection"):
                self.data.setdefault(section, {})
        elif old is not None:
            print(f"{self.path} holds another protocol; starting afresh", flush=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:12]
        with open(Path(tempfile.gettempdir()) / f"mpsdata-accuracy-{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = self._read()
            if old is not None and _protocol(old.get("config", {})) == _protocol(self.data["config"]):
                for section in self.SECTIONS:
                    for key, value in old.get(section, {}).items():
                        self.data[section].setdefault(key, value)
                for key, value in old.get("selection", {}).items():
                    self.data["selection"].setdefault(key, value)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True, default=str))
            os.replace(tmp, self.path)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [100 * v for v in values]
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Test accuracy (%) per ``"arm|arch"``: mean, sample std and count over seeds."""
    groups: dict[str, list[float]] = {}
    for key, run in runs.items():
        arm, arch, _ = key.split("|")
        groups.setdefault(f"{arm}|{arch}", []).append(run["test_acc"])
    return {key: _stats(values) for key, values in sorted(groups.items())}


def paired(runs: dict[str, dict[str, Any]], arm_a: str, arm_b: str, arch: str = "cnn") -> dict[str, Any]:
    """``a - b`` test accuracy (points) over the seeds both arms ran: same seed = same init and batch order."""
    diffs = []
    for key, run in runs.items():
        arm, run_arch, seed = key.split("|")
        other = runs.get(f"{arm_b}|{arch}|{seed}")
        if arm == arm_a and run_arch == arch and other is not None:
            diffs.append(run["test_acc"] - other["test_acc"])
    return _stats(diffs)


def _fmt(stat: dict[str, Any] | None, sign: str = "") -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    std = "" if stat["std"] is None else f" ± {stat['std']:.2f}"
    return f"{stat['mean']:{sign}.2f}{std} ({stat['n']})"


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def verdict(diff: dict[str, Any], single_seed_margin: float = 0.5, floor: float = 0.25) -> str:
    """Whether "a beats b" holds from a paired difference ``a - b`` in points (:func:`paired`).

    With two or more seeds the margin is two standard errors of the paired difference but at least ``floor``
    points (two or three seeds can agree by chance); with one seed it is ``single_seed_margin`` points (about twice
    the seed-to-seed spread this recipe shows). Within the margin the claim does not hold either: the data cannot
    tell the two apart.
    """
    if not diff or diff.get("mean") is None:
        return "not measured"
    d, n = diff["mean"], diff["n"]
    margin = single_seed_margin if n < 2 or diff["std"] is None else max(floor, 2 * diff["std"] / math.sqrt(n))
    if d > margin:
        return "holds"
    if d < -margin:
        return "does not hold (reversed)"
    return "does not hold (tie within seed noise)"


def claims(results: dict[str, Any], arch: str = "cnn", other_arch: str = "mlp") -> str:
    """The paper's claims and the benchmark's aims against a results JSON, as a markdown table with verdicts.

    Every comparison is paired by seed (:func:`paired`); the verdict rule is :func:`verdict`'s.
    """
    runs, sel = results["runs"], results.get("selection", {})
    summary = summarize(runs)
    rows = []
    labels = {"ice+dct": "ICE", "random": "random", "k-center": "k-center", "svd": "SVD", "cp": "CP"}

    def add(claim: str, a: str, b: str, paper: str, row_arch: str = arch, rule: Any = verdict) -> None:
        diff = paired(runs, a, b, row_arch)
        mean_a, mean_b = summary.get(f"{a}|{row_arch}"), summary.get(f"{b}|{row_arch}")
        ours = "n/a" if not diff.get("n") else f"{_fmt(mean_a)} vs {_fmt(mean_b)}: {_fmt(diff, '+')}"
        rows.append(f"| {claim} | {paper} | {ours} | {rule(diff)} |")

    def aim(gap: float) -> Callable[[dict[str, Any]], str]:
        def rule(diff: dict[str, Any]) -> str:
            if not diff or diff.get("mean") is None:
                return "not measured"
            return "met" if diff["mean"] >= gap else "not met"

        return rule

    for ratio in RATIOS:
        key = f"{ratio:g}"
        if key not in sel:
            continue
        best = f"mps {sel[key]['best']} rho={key}"
        paper = PAPER_TABLE1[ratio]
        for method, label in labels.items():
            p = f"{paper['ours']:.2f} vs {paper[method]:.2f}"
            add(f"rho = {key}: mpsdata best beats {label} (Table 1)", best, f"{method} rho={key}", p)
        residual = next((c for c in sel[key]["ranking"] if results["config"]["mps_configs"][c]["residual"]), None)
        if residual is not None:
            p = f"{paper['ours']:.2f} vs {paper['ice+dct']:.2f}"
            add(f"rho = {key}: the residual MPS ({residual}) beats ICE", f"mps {residual} rho={key}",
                f"ice+dct rho={key}", p)  # fmt: skip
        limit = {0.4: -1.0, 0.7: -0.3}.get(ratio)
        if limit is not None:
            p = f"{paper['ours'] - PAPER_TABLE1['whole']:+.2f} (ours - whole)"
            add(f"aim: mpsdata best within {-limit:.1f} point of whole at rho = {key}", best, "whole", p,
                rule=aim(limit))  # fmt: skip
        b = sel[key].get("bytes_budget")
        for method in ("webp", "jpeg", "downsample", "random"):
            if b is not None and f"{method} bytes={b:.3f}|{arch}" in summary:
                add(f"aim: mpsdata best (rho = {key}) at least as accurate as {method} at equal bytes {b:.3f}",
                    best, f"{method} bytes={b:.3f}", "not in the paper", rule=aim(0.0))  # fmt: skip
    for ratio in results["config"].get("low_ratios", ()):
        key = f"{ratio:g}"
        mps = [n.split("|")[0] for n in summary if n.startswith("mps ") and n.endswith(f"rho={key}|{arch}")]
        for name in mps:
            for method in ("svd", "cp"):
                add(f"rho = {key}: {method.upper()} fails (below {name.rsplit(' ', 1)[0]} at the same rho)", name,
                    f"{method} rho={key}", "stated, no number")  # fmt: skip
    if "0.7" in sel:
        best = f"mps {sel['0.7']['best']} rho=0.7"
        paper = ", ".join(f"{a} {o:.2f} vs {i:.2f}" for a, (i, o) in PAPER_TABLE2.items())
        add(f"Table 2 stand-in ({other_arch}): mpsdata best beats ICE at rho = 0.7", best, "ice+dct rho=0.7",
            paper, row_arch=other_arch)  # fmt: skip
    header = "| claim | paper % | ours % (a vs b: paired a - b, seeds) | verdict |\n|---|---|---|---|"
    return header + "\n" + "\n".join(rows) + "\n"


def markdown(
    results: dict[str, Any],
    arch: str = "cnn",
    paper: dict[Any, Any] | None = None,
    other_archs: Sequence[str] = ("mlp",),
) -> str:
    """The tables of a results JSON for one architecture: equal rho (Table 1), equal bytes, below 40 %, other
    architectures and the choice of mpsdata best.

    Args:
        results: A results JSON of this benchmark or of ``accuracy_gpu.py``.
        arch: The architecture of the main tables.
        paper: The paper's numbers beside ours, ``{rho: {method: acc}, "whole": acc}``; default: Table 1's
            Fashion-MNIST row when the results are on Fashion-MNIST, else none.
        other_archs: Architectures listed in a short table of their own (the CPU protocol's MLP).
    """
    data, runs, sel = results["data"], results["runs"], results.get("selection", {})
    config = results["config"]
    if paper is None:
        paper = PAPER_TABLE1 if config.get("dataset") == "fashion-mnist" else {}
    ratios = config.get("ratios", RATIOS)
    low_ratios = config.get("low_ratios", ())
    summary = summarize(runs)
    out = []

    def row(name: str, label: str, paper_acc: Any, row_arch: str = arch) -> str:
        info = data.get(name, {})
        stat = summary.get(f"{name}|{row_arch}")
        whole = summary.get(f"whole|{row_arch}")
        gap = f"{stat['mean'] - whole['mean']:+.2f}" if stat and whole else ""
        paper_s = "" if paper_acc is None else f"{paper_acc:.2f}"
        nbytes = _num(info.get("bytes_ratio"))
        if info.get("file_bytes_ratio") is not None:
            nbytes += f" (file {info['file_bytes_ratio']:.3f})"
        return (
            f"| {label} | {_num(info.get('ratio'))} | {nbytes} | "
            f"{_num(info.get('psnr'), 2)} | {_fmt(stat)} | {gap} | {paper_s} |"
        )

    header = (
        "| method | achieved rho | bytes ratio | PSNR dB | test acc % (seeds) | vs whole | paper % |\n"
        "|---|---|---|---|---|---|---|"
    )
    for ratio in ratios:
        key = f"{ratio:g}"
        best = sel.get(key, {}).get("best")
        at = paper.get(ratio, {})
        out += [f"\n**{arch}, rho = {ratio:g} (equal parameter ratio, the paper's axis)**\n", header]
        for method, label in (
            ("ice+dct", "ICE (DCT)"),
            ("random", "random coreset"),
            ("k-center", "k-center coreset"),
            ("svd", "SVD"),
            ("cp", "CP"),
        ):
            if f"{method} rho={key}" in data:
                out.append(row(f"{method} rho={key}", label, at.get(method)))
        for name in config["mps_configs"]:
            if f"mps {name} rho={key}|{arch}" not in summary:
                continue  # a candidate not trained on the full training set (only validated)
            mark = " **(best)**" if name == best else ""
            out.append(row(f"mps {name} rho={key}", f"mpsdata {name}{mark}", at.get("ours") if mark else None))
        out.append(row("whole", "whole", paper.get("whole")))
    for ratio in ratios:
        b = sel.get(f"{ratio:g}", {}).get("bytes_budget")
        if b is None:
            continue
        best = sel[f"{ratio:g}"]["best"]
        out += [f"\n**{arch}, equal bytes: b = {b:.3f} (mpsdata best at rho = {ratio:g})**\n", header]
        out.append(row(f"mps {best} rho={ratio:g}", f"mpsdata {best}", None))
        for method in ("webp", "jpeg", "downsample", "random"):
            name = f"{method} bytes={b:.3f}"
            if name in data:
                out.append(row(name, method, None))
        out.append(row("whole", "whole (uint8)", None))
    lows = [n for n in data if low_ratios and n.endswith(tuple(f"rho={r:g}" for r in low_ratios))]
    if lows:
        out += [f"\n**{arch}, below 40 % (SVD and CP against mpsdata)**\n", header]
        for ratio in low_ratios:
            for name in sorted(n for n in lows if n.endswith(f"rho={ratio:g}")):
                out.append(row(name, name, None))
        out.append(row("whole", "whole", paper.get("whole")))
    for other in other_archs:
        names = sorted({k.split("|")[0] for k in runs if k.split("|")[1] == other}, key=lambda n: (n != "whole", n))
        if names:
            out += [f"\n**another architecture: {other}**\n", header]
            out += [row(name, name, None, row_arch=other) for name in names]
    if sel:
        out += [
            "\n**choice of mpsdata best (validation split of the training set; test set unused)**\n",
            "| rho | configuration | validation acc % (seeds) | chosen |\n|---|---|---|---|",
        ]
        for key, entry in sel.items():
            for name in entry["ranking"]:
                stats = _stats(entry["scores"][name])
                out.append(f"| {key} | {name} | {_fmt(stats)} | {'yes' if name == entry['best'] else ''} |")
    trained = {key.split("|")[0] for key in runs}
    cut = [name for name in results.get("skipped", []) if name not in trained]
    if cut:
        out.append(f"\nArms cut (`--skip`, not trained): {', '.join(cut)}.")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The CPU protocol
def coreset_steps(
    builder: Builder,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    config: dict[str, Any],
    out: Path,
    seeds: Sequence[int],
    epochs: int,
    log: Callable[[str], None],
) -> None:
    """Coresets with about as many optimiser steps as the whole set: ``round(epochs / rho)`` epochs.

    With the same epochs a coreset of a fraction rho gets rho times the steps of the whole set; this variant
    separates having fewer images from having fewer steps (recipe otherwise unchanged).
    """
    results = Results(out, {**config, "mode": "coreset equal steps"})
    for seed in seeds:
        for ratio in RATIOS:
            for method in ("random", "k-center"):
                arm = Arm(method, ratio)
                arm_epochs = round(epochs / ratio)
                key = f"{arm.name} epochs={arm_epochs}|cnn|seed={seed}"
                ts = builder.training_set(arm, seed)
                results.data["data"].setdefault(key.split("|")[0], ts.info)
                if key in results.data["runs"]:
                    continue
                res = harness.train_and_evaluate(
                    ts.images, ts.targets, test_x, test_y, arch="cnn", epochs=arm_epochs, seed=seed
                )
                res.update(arm=arm.name, arch="cnn", seed=seed, steps=arm_epochs * math.ceil(len(ts.images) / 128))
                results.data["runs"][key] = res
                results.save()
                log(f"{key}: test acc {100 * res['test_acc']:.2f} % ({res['train_time']:.0f} s)")
    results.data["summary"] = summarize(results.data["runs"])
    results.save()
    for key, stat in results.data["summary"].items():
        print(f"| {key.split('|')[0]} | {_fmt(stat)} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", type=Path, default=os.environ.get("MPSDATA_FASHION_MNIST"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mpsdata_accuracy"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="5,000 training images, 1 seed, 1 epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--select-seeds", type=int, nargs="+", default=None, help="default 0")
    parser.add_argument("--low-seeds", type=int, nargs="+", default=None, help="below 40 %%; default 0")
    parser.add_argument("--mlp-seeds", type=int, nargs="+", default=None, help="default: --seeds")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES[:-1]),
        help="what to train (default all but candidates); the selection is computed from finished select runs",
    )
    parser.add_argument(
        "--skip", nargs="+", default=[], help='arm names not to build or train, e.g. "webp bytes=1.367" (recorded)'
    )
    parser.add_argument("--report", type=Path, default=None, help="print the tables of a results JSON and exit")
    parser.add_argument(
        "--coreset-steps",
        action="store_true",
        help="only the coresets, trained round(epochs / rho) epochs (about the whole set's steps); own JSON",
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        report = json.loads(args.report.read_text())
        print(markdown(report) + "\n**claims**\n\n" + claims(report))
        return
    if args.fashion is None:
        parser.error("give --fashion or set MPSDATA_FASHION_MNIST")
    name = "accuracy-coreset-steps" if args.coreset_steps else "accuracy"
    out = args.out or Path(__file__).parent / "results" / f"{name}{'-quick' if args.quick else ''}.json"
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (1 if args.quick else 3)
    select_seeds = args.select_seeds or [0]
    low_seeds = args.low_seeds or [seeds[0]]
    mlp_seeds = args.mlp_seeds or seeds
    pool_size = 5000 if args.quick else None
    val_count = 500 if args.quick else 5000
    torch.set_num_threads(1)  # one thread: see harness.train_and_evaluate
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {msg}", flush=True)

    train_x, train_y, test_x, test_y = load_fashion(args.fashion)
    if pool_size is not None:
        train_x, train_y = train_x[:pool_size], train_y[:pool_size]
    root = args.cache / ("root" if pool_size is None else f"root-first{pool_size}")
    spec = fashion_spec(fashion_root(args.fashion, root, limit=pool_size))
    config = {
        "dataset": "fashion-mnist",
        "train_images": len(train_x),
        "test_images": len(test_x),
        "seeds": seeds,
        "epochs": epochs,
        "recipe": "benchmarks/harness.py: Adam 1e-3 cosine to 0, batch 128, no augmentation, last epoch",
        "ratios": list(RATIOS),
        "low_ratios": list(LOW_RATIOS),
        "mps_configs": {
            k: {
                "site_dims": [list(d) if isinstance(d, tuple) else d for d in v["site_dims"]],
                "residual": v["residual"],
            }
            for k, v in FASHION_MPS_CONFIGS.items()
        },
        "ice_sites": [list(d) for d in FASHION_ICE_SITES],
        "validation": {
            "count": val_count,
            "split_seed": 2024,
            "seeds": select_seeds,
            "criterion": "accuracy on held-out ORIGINAL training images",
        },
        "low_seeds": low_seeds,
        "mlp_seeds": mlp_seeds,
        "mps_bytes_per_param": MPS_BYTES_PER_PARAM,
    }
    results = Results(out, config)
    results.data["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": 1,
        "cpus": os.cpu_count(),
    }
    builder = Builder(spec, train_x, train_y, args.cache / "arrays", log)
    if args.coreset_steps:
        coreset_steps(builder, test_x, test_y, config, out, seeds, epochs, log)
        return

    def train(arm: Arm, arch: str, seed: int) -> None:
        key = f"{arm.name}|{arch}|seed={seed}"
        if key in results.data["runs"]:
            return
        ts = builder.training_set(arm, seed)
        info = {k: v for k, v in ts.info.items() if k != "settings"}
        results.data["data"].setdefault(
            arm.name,
            {
                **ts.info,
                "method": arm.method,
                "axis": arm.axis,
                "target": arm.ratio if arm.ratio is not None else arm.bytes_ratio,
            },
        )
        res = harness.train_and_evaluate(ts.images, ts.targets, test_x, test_y, arch=arch, epochs=epochs, seed=seed)
        res.update(arm=arm.name, arch=arch, seed=seed, **{f"data_{k}": v for k, v in info.items()})
        results.data["runs"][key] = res
        results.save()
        log(f"{key}: test acc {100 * res['test_acc']:.2f} % ({res['train_time']:.0f} s)")

    # 1. mpsdata best per ratio, chosen on a validation split of the training set (test set unused).
    fit_idx, val_idx = validation_split(len(train_x), val_count)
    for ratio in RATIOS:
        key = f"{ratio:g}"
        scores: dict[str, list[float]] = {}
        bytes_ratio = {}
        for config_name in FASHION_MPS_CONFIGS:
            ts = builder.training_set(Arm("mps", ratio, config=config_name))
            bytes_ratio[config_name] = ts.info["bytes_ratio"]
            for seed in select_seeds:
                run_key = f"select mps {config_name} rho={key}|cnn|seed={seed}"
                if run_key not in results.data["select_runs"]:
                    if "select" not in args.stages:
                        parser.error(f"{run_key} has not run: add the select stage")
                    res = harness.train_and_evaluate(
                        ts.images[fit_idx],
                        ts.targets[fit_idx],
                        train_x[val_idx],
                        train_y[val_idx],
                        arch="cnn",
                        epochs=epochs,
                        seed=seed,
                    )
                    results.data["select_runs"][run_key] = {"val_acc": res["test_acc"], "train_time": res["train_time"]}
                    results.save()
                    log(f"{run_key}: validation acc {100 * res['test_acc']:.2f} %")
                scores.setdefault(config_name, []).append(results.data["select_runs"][run_key]["val_acc"])
        ranking = select_best(scores, bytes_ratio)
        results.data["selection"][key] = {
            "scores": scores,
            "seeds": list(select_seeds),
            "ranking": ranking,
            "best": ranking[0],
            "bytes_budget": bytes_ratio[ranking[0]],
        }
        results.save()
        log(f"rho={key}: mpsdata best = {ranking[0]} (ranking {ranking})")
    selection = results.data["selection"]
    # 2. The paper's axis: equal rho; mpsdata is its chosen configuration.
    param_arms = [Arm("whole")]
    for ratio in RATIOS:
        param_arms += [Arm(m, ratio) for m in ("ice+dct", "random", "k-center", "svd", "cp")]
        param_arms.append(Arm("mps", ratio, config=selection[f"{ratio:g}"]["best"]))
    # 2b. The paper's method proper (a residual MPS): the residual configuration ranked first, if best is not one.
    residual_arms = []
    for ratio in RATIOS:
        ranking = selection[f"{ratio:g}"]["ranking"]
        first = next((c for c in ranking if FASHION_MPS_CONFIGS[c]["residual"] > 0), None)
        if first is not None and first != ranking[0]:
            residual_arms.append(Arm("mps", ratio, config=first))
    # 3. Equal bytes against codecs, downsampling and a random coreset at mpsdata best's bytes.
    bytes_arms = []
    for ratio in RATIOS:
        b = selection[f"{ratio:g}"]["bytes_budget"]
        bytes_arms += [Arm("webp", bytes_ratio=b, axis="bytes"), Arm("jpeg", bytes_ratio=b, axis="bytes")]
        if b < 1:
            bytes_arms += [Arm("downsample", bytes_ratio=b, axis="bytes"), Arm("random", bytes_ratio=b, axis="bytes")]
    # 4. Below 40 %: SVD, CP and the best-ranked mpsdata configuration at rho = 0.4 that fits, and the
    # best-ranked one with more than two sites (a two-site layout is the SVD itself).
    low_arms = []
    for ratio in LOW_RATIOS:
        low_arms += [Arm("svd", ratio, axis="low"), Arm("cp", ratio, axis="low")]
        for multi_site in (False, True):
            for config_name in selection["0.4"]["ranking"]:
                options = FASHION_MPS_CONFIGS[config_name]
                if multi_site and len(options["site_dims"]) <= 2:
                    continue
                try:
                    mpsdata.decompose(train_x[:1], ratio, site_dims=options["site_dims"], residual=options["residual"])
                except ValueError:
                    continue  # too small a budget for this layout: the next one
                arm = Arm("mps", ratio, config=config_name, axis="low")
                if arm not in low_arms:
                    low_arms.append(arm)
                break
    # 5. Another architecture.
    mlp_arms = [Arm("whole")]
    for ratio in RATIOS:
        best = selection[f"{ratio:g}"]["best"]
        mlp_arms += [Arm("ice+dct", ratio), Arm("svd", ratio), Arm("mps", ratio, config=best)]
    # 6. Every candidate on the test set (seed 0), to see what the validation choice cost.
    candidate_arms = [Arm("mps", ratio, config=c) for ratio in RATIOS for c in FASHION_MPS_CONFIGS]
    stage_arms = {"param": param_arms, "residual": residual_arms, "bytes": bytes_arms, "low": low_arms}
    stage_arms = {stage: [a for a in arms if a.name not in args.skip] for stage, arms in stage_arms.items()}
    mlp_arms = [a for a in mlp_arms if a.name not in args.skip]
    candidate_arms = [a for a in candidate_arms if a.name not in args.skip]
    if args.skip:
        results.data["skipped"] = sorted({*results.data.get("skipped", []), *args.skip})
    for stage, arms in stage_arms.items():  # build first: the expensive sets are cached for every seed
        for arm in arms if stage in args.stages else ():
            if arm.method not in ("whole", "random"):
                builder.training_set(arm)
    stage_seeds = {"param": seeds, "residual": seeds, "bytes": seeds, "low": low_seeds}
    for seed in sorted({*seeds, *low_seeds}):
        for stage, arms in stage_arms.items():
            if stage in args.stages and seed in stage_seeds[stage]:
                for arm in arms:
                    train(arm, "cnn", seed)
    if "mlp" in args.stages:
        for seed in mlp_seeds:
            for arm in mlp_arms:
                train(arm, "mlp", seed)
    if "candidates" in args.stages:
        for arm in candidate_arms:
            train(arm, "cnn", seeds[0])
    results.data["summary"] = summarize(results.data["runs"])
    results.data["seconds_this_invocation"] = time.perf_counter() - began
    results.save()
    print(markdown(results.data))
    log(f"done: {out}")


if __name__ == "__main__":
    main()
