"""The shared codec in real core files: Fashion-MNIST built with ``MPSFashionMNIST(codec="shared")``.

For each byte budget the training split (60,000 images) is built first: the shared part is fitted on it
(``search_shared`` on held-out halves, winner refitted on the whole split, the shared part amortised over it);
the test split (10,000 images) is then encoded by projection onto that shared part. Reported per split: the real
file bytes over raw uint8 bytes (the dataset's ``bytes_ratio``), the amortised figure (byte strings + 4-byte
lengths + shared part / 60,000), the file's mean stored PSNR, and the codec chosen. Then the per-item
``__getitem__`` time of the shared test split as a ratio to the default MPS dataset (``ratio=0.4``) measured in
the same process: interleaved repeats over the same random indices, minimum per repeat, beside the per-item path
before the numba inverse (rANS kernel, then torch's float64 inverse; pixels compared). Last, WebP on the same
10,000 test images at each test file's real bytes ratio: the best mean PSNR of a quality sweep (0, 5, ..., 100)
whose mean bytes ratio is at most the file's, and the per-image search (each image at the highest quality whose
file fits, ``mpsdata.baselines.webp(x, bytes_ratio=...)``), bytes of the WebP bitstream alone.

Run: python benchmarks/shared_file.py --fashion /work/shared/datasets/fashion-mnist [--budgets 0.1,0.2,0.4]
     python benchmarks/shared_file.py --fashion ... --webp-only 0.1079,0.2084,0.4088  (the WebP part alone)
     python benchmarks/shared_file.py --fashion ... --budgets 0.2 --no-webp  (build, PSNR and item speed only)
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mpsdata
from mpsdata import baselines
from mpsdata._shared import _decode_batch, _decode_one, _inverse
from mpsdata._signal import psnr
from mpsdata.datasets.mnist import read_idx


def _raw_root(fashion: Path, out: Path) -> Path:
    raw = out / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in fashion.glob("*-ubyte.gz"):
        with gzip.open(path) as src, open(raw / path.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def _item_seconds(ds, indices: np.ndarray) -> float:
    """Mean seconds of ``ds[i]`` (a dataset, or a function of the index) over ``indices``."""
    get = ds if callable(ds) else ds.__getitem__
    start = time.perf_counter()
    for i in indices:
        get(int(i))
    return (time.perf_counter() - start) / len(indices)


def _torch_item(cores):
    """``decode_one`` as it was before the numba inverse: the rANS kernel, then torch's inverse of one image."""
    codec = cores.codec

    def item(index: int, unrounded: bool = False) -> np.ndarray:
        q = np.empty((1, codec.num_coefficients), np.int64)
        _decode_one(cores.load(), cores.offsets[index], q.shape[1], codec.classes, codec.freq, codec._cum,
                    codec._lookup, q[0])  # fmt: skip
        image = _inverse(torch.from_numpy(q).to(torch.float64) * codec.step, codec)
        return image[0].numpy() if unrounded else image.round().clamp_(0, 255).to(torch.uint8)[0].numpy()

    return item


def _batch_ratio(cores, repeats: int = 3) -> float:
    """Seconds of decoding every image with the numba kernel over the same with the torch inverse (batches of
    4,096 as ``verify`` takes them; the rANS decoding is the same kernel in both)."""
    codec = cores.codec

    def torch_decode(rows: np.ndarray) -> torch.Tensor:
        q = np.empty((rows.size, codec.num_coefficients), np.int64)
        enc = cores._encoded(rows)[0]
        _decode_batch(enc.data, enc.offsets, rows, q.shape[1], codec.classes, codec.freq, codec._cum,
                      codec._lookup, q)  # fmt: skip
        return _inverse(torch.from_numpy(q).to(torch.float64) * codec.step, codec).round().clamp_(0, 255)

    best = {"numba": float("inf"), "torch": float("inf")}
    for _ in range(repeats):
        for name, decode in (("numba", cores.decode), ("torch", torch_decode)):
            start = time.perf_counter()
            for first in range(0, len(cores), 4096):
                decode(np.arange(first, min(first + 4096, len(cores))))
            best[name] = min(best[name], time.perf_counter() - start)
    return best["numba"] / best["torch"]


def _compare(cores, item, indices: np.ndarray) -> str:
    """Pixels where ``decode_one`` differs from the torch inverse's rounding, and how far from a half level the
    torch value of each lies (the two sum in different orders, so only near-ties can round apart)."""
    differ, worst, pixels = 0, 0.0, 0
    for i in np.unique(indices):
        new, before = cores.decode_one(int(i)).astype(np.int64), item(int(i), unrounded=True)
        before = before[0] if before.shape[0] == 1 else before.transpose(1, 2, 0)
        apart = new != np.clip(np.rint(before), 0, 255)
        differ, pixels = differ + int(apart.sum()), pixels + new.size
        if apart.any():
            worst = max(worst, float(np.abs(before[apart] - np.floor(before[apart]) - 0.5).max()))
    if not differ:
        return f"0 of {pixels} pixels differ"
    return f"{differ} of {pixels} pixels differ, each within {worst:.1e} of a half level"


def webp_at(images: torch.Tensor, ratios: list[float]) -> None:
    """WebP on ``images`` (uint8 ``(N, 1, H, W)``) at mean bytes ratios ``ratios``: quality sweep and per image."""
    sweep = []
    for quality in range(0, 101, 5):
        result = baselines.webp(images, quality)
        sweep.append((float(result.bytes_ratio.mean()), float(psnr(result.images, images).mean()), quality))
    print("\n| test file bytes ratio | WebP sweep: best PSNR at mean bytes <= it (quality, bytes) | WebP per image |")
    print("|---:|---|---|")
    for ratio in ratios:
        fits = [s for s in sweep if s[0] <= ratio]
        best = max(fits, key=lambda s: s[1]) if fits else None
        swept = f"{best[1]:.2f} dB (q {best[2]}, {best[0]:.4f})" if best else f"none (q 0 takes {sweep[0][0]:.4f})"
        try:
            result = baselines.webp(images, bytes_ratio=ratio)
            per_image = f"{float(psnr(result.images, images).mean()):.2f} dB ({float(result.bytes_ratio.mean()):.4f})"
        except ValueError as error:
            per_image = f"none ({str(error).split(':')[0]})"
        print(f"| {ratio} | {swept} | {per_image} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fashion", type=Path, required=True)
    parser.add_argument("--budgets", default="0.1,0.2,0.4")
    parser.add_argument("--items", type=int, default=2000, help="random items per timing repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--webp-only", help="comma-separated bytes ratios: run only the WebP part at them")
    parser.add_argument("--no-webp", action="store_true", help="skip the WebP comparison")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = _raw_root(args.fashion, Path(tmp))
        test_images = read_idx(root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte", 3)
        test_images = torch.from_numpy(test_images.copy())[:, None]
        if args.webp_only:
            webp_at(test_images, [float(r) for r in args.webp_only.split(",")])
            return
        print("| bytes_ratio | split | codec | file bytes ratio | amortised bytes ratio | PSNR (dB) | build (s) |")
        print("|---|---|---|---:|---:|---:|---:|")
        shared = {}
        for budget in budgets:
            for train in (True, False):
                start = time.perf_counter()
                ds = mpsdata.MPSFashionMNIST(root, train=train, codec="shared", bytes_ratio=budget)
                seconds = time.perf_counter() - start
                cores = ds._cores
                print(
                    f"| {budget} | {'train' if train else 'test'} | {cores.codec.describe()} | {ds.bytes_ratio:.4f} | "
                    f"{cores.amortised_bytes_ratio:.4f} | {ds.psnr:.2f} | {seconds:.0f} |",
                    flush=True,
                )
            shared[budget] = ds  # the test split
        mps = mpsdata.MPSFashionMNIST(root, train=False)
        print(f"\ndefault MPS test split: bytes ratio {mps.bytes_ratio:.4f}, PSNR {mps.psnr:.2f} dB")
        indices = np.random.default_rng(0).integers(0, len(mps), args.items)
        before = {budget: _torch_item(ds._cores) for budget, ds in shared.items()}
        for budget, ds in shared.items():
            print(f"bytes_ratio={budget}, numba decode_one against the torch inverse on the timed items: "
                  f"{_compare(ds._cores, before[budget], indices)}")  # fmt: skip
        for ds in (mps, *shared.values()):
            _item_seconds(ds, indices[:50])  # warm: jit, file loads
        for item in before.values():
            _item_seconds(item, indices[:50])
        best = {name: float("inf") for name in ["mps", *shared, *(f"torch {b}" for b in shared)]}
        for _ in range(args.repeats):
            best["mps"] = min(best["mps"], _item_seconds(mps, indices))
            for budget, ds in shared.items():
                best[budget] = min(best[budget], _item_seconds(ds, indices))
                best[f"torch {budget}"] = min(best[f"torch {budget}"], _item_seconds(before[budget], indices))
        print(f"\n__getitem__ per item, {args.items} random items, min of {args.repeats} interleaved repeats")
        print("| dataset | time / MPS default |")
        print("|---|---:|")
        print(f"| MPS ratio=0.4 | 1.00 ({best['mps'] * 1e6:.0f} us) |")
        for budget in shared:
            print(f"| shared bytes_ratio={budget} | {best[budget] / best['mps']:.2f} |")
            print(f"| decode_one before (torch inverse, no PIL), bytes_ratio={budget} | "
                  f"{best[f'torch {budget}'] / best['mps']:.2f} |")  # fmt: skip
        print("\nWhole test split through decode (batches of 4,096), min of 3 interleaved repeats")
        print("| dataset | numba kernel / torch inverse |")
        print("|---|---:|")
        for budget, ds in shared.items():
            print(f"| shared bytes_ratio={budget} | {_batch_ratio(ds._cores):.2f} |")
        if args.no_webp:
            return
        webp_at(test_images, [round(ds.bytes_ratio, 4) for ds in shared.values()])


if __name__ == "__main__":
    main()
