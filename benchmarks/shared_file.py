"""The shared codec in real core files: Fashion-MNIST built with ``MPSFashionMNIST(codec="shared")``.

For each byte budget the training split (60,000 images) is built first: the shared part is fitted on it
(``search_shared`` on held-out halves, winner refitted on the whole split, the shared part amortised over it);
the test split (10,000 images) is then encoded by projection onto that shared part. Reported per split: the real
file bytes over raw uint8 bytes (the dataset's ``bytes_ratio``), the amortised figure (byte strings + 4-byte
lengths + shared part / 60,000), the file's mean stored PSNR, and the codec chosen. Then the per-item
``__getitem__`` time of the shared test split as a ratio to the default MPS dataset (``ratio=0.4``) measured in
the same process: interleaved repeats over the same random indices, minimum per repeat.

Run: python benchmarks/shared_file.py --fashion /work/shared/datasets/fashion-mnist [--budgets 0.1,0.2,0.4]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import mpsdata


def _raw_root(fashion: Path, out: Path) -> Path:
    raw = out / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in fashion.glob("*-ubyte.gz"):
        with gzip.open(path) as src, open(raw / path.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def _item_seconds(ds, indices: np.ndarray) -> float:
    start = time.perf_counter()
    for i in indices:
        ds[int(i)]
    return (time.perf_counter() - start) / len(indices)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fashion", type=Path, required=True)
    parser.add_argument("--budgets", default="0.1,0.2,0.4")
    parser.add_argument("--items", type=int, default=2000, help="random items per timing repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = _raw_root(args.fashion, Path(tmp))
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
        for ds in (mps, *shared.values()):
            _item_seconds(ds, indices[:50])  # warm: jit, file loads
        best = {name: float("inf") for name in ["mps", *shared]}
        for _ in range(args.repeats):
            best["mps"] = min(best["mps"], _item_seconds(mps, indices))
            for budget, ds in shared.items():
                best[budget] = min(best[budget], _item_seconds(ds, indices))
        print(f"\n__getitem__ per item, {args.items} random items, min of {args.repeats} interleaved repeats")
        print("| dataset | time / MPS default |")
        print("|---|---:|")
        print(f"| MPS ratio=0.4 | 1.00 ({best['mps'] * 1e6:.0f} us) |")
        for budget in shared:
            print(f"| shared bytes_ratio={budget} | {best[budget] / best['mps']:.2f} |")


if __name__ == "__main__":
    main()
