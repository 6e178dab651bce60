"""Speed of the MPS datasets against torchvision's, side by side in one process (issue: drop-in datasets).

Measures, on real Fashion-MNIST:
- ``__getitem__`` (PIL out) against ``torchvision.datasets.FashionMNIST.__getitem__``;
- a DataLoader epoch with 2 workers and ``ToTensor()`` against torchvision's;
- the batched path (``decode_batch`` + conversion to float in [0, 1]) against torchvision's per-item path
  with ``ToTensor()``;
- building the full train split (60,000 images) from the raw files: wall time and peak memory (a separate
  process, so the peak is the build's own).

Run: python benchmarks/datasets_speed.py --fashion ../shared/datasets/fashion-mnist [--quick]
Writes benchmarks/results/datasets_speed.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

import mpsdata


def prepare_root(fashion: Path, root: Path) -> None:
    """torchvision's layout: root/FashionMNIST/raw with the idx files, gzipped and extracted."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in fashion.glob("*-idx?-ubyte.gz"):
        shutil.copyfile(gz, raw / gz.name)
        with gzip.open(gz) as src, open(raw / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)


def per_item(ds, indices: np.ndarray) -> float:
    start = time.perf_counter()
    for i in indices:
        ds[int(i)]
    return (time.perf_counter() - start) / len(indices)


def epoch(ds, workers: int, limit: int) -> float:
    loader = DataLoader(
        torch.utils.data.Subset(ds, range(limit)), batch_size=128, shuffle=True, num_workers=workers,
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
    )  # fmt: skip
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def batched(ds, indices: np.ndarray, batch: int = 256) -> float:
    start = time.perf_counter()
    for s in range(0, len(indices), batch):
        ds.decode_batch(indices[s : s + batch]).float().div_(255)
    return (time.perf_counter() - start) / len(indices)


def build_in_subprocess(root: Path, ratio: float) -> dict:
    code = (
        "import time, resource, mpsdata; t=time.perf_counter(); "
        f"ds = mpsdata.MPSFashionMNIST({str(root)!r}, train=True, ratio={ratio}); "
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(ds))"
    )
    # Warm numba's on-disk cache first so the timing is the build, not the compilation.
    warm = (
        "import torch, mpsdata; "
        "mpsdata.decompose(torch.zeros(3, 28, 28, dtype=torch.uint8), 0.4).reconstruct(torch.uint8)"
    )
    subprocess.run([sys.executable, "-c", warm], check=True)
    baseline = subprocess.run(
        [sys.executable, "-c", "import resource, mpsdata; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds, peak_kib, count = out.stdout.split()
    return {
        "seconds": float(seconds),
        "peak_mib": int(peak_kib) / 1024,
        "import_only_peak_mib": int(baseline.stdout) / 1024,
        "images": int(count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", type=Path, default=os.environ.get("MPSDATA_FASHION_MNIST"))
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "datasets_speed.json")
    args = parser.parse_args()
    if args.fashion is None:
        parser.error("give --fashion DIR or set MPSDATA_FASHION_MNIST")
    repeats = 2 if args.quick else 5
    items = 5_000 if args.quick else 20_000
    epoch_images = 10_000 if args.quick else 60_000

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_root(args.fashion, root)
        build = build_in_subprocess(root, args.ratio)
        tv = torchvision.datasets.FashionMNIST(root, train=True)
        ours = mpsdata.MPSFashionMNIST(root, train=True, ratio=args.ratio)
        tv_t = torchvision.datasets.FashionMNIST(root, train=True, transform=transforms.ToTensor())
        ours_t = mpsdata.MPSFashionMNIST(root, train=True, ratio=args.ratio, transform=transforms.ToTensor())
        ours[0], tv[0]
        rng = np.random.default_rng(0)
        indices = rng.permutation(len(tv))[:items]
        keys = ("tv_item", "ours_item", "tv_item_tensor", "ours_batched", "ours_batched_1thread")
        rows: dict[str, list[float]] = {k: [] for k in keys}
        rows.update({"tv_epoch": [], "ours_epoch": []})
        for _ in range(repeats):  # interleaved so that load changes hit both sides alike
            rows["tv_item"].append(per_item(tv, indices))
            rows["ours_item"].append(per_item(ours, indices))
            rows["tv_item_tensor"].append(per_item(tv_t, indices))
            rows["ours_batched"].append(batched(ours, indices))
            # The same with one torch thread: on an oversubscribed machine torch's parallel regions in
            # .float()/.div_() wait for descheduled threads; torchvision's per-item path never goes parallel.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                rows["ours_batched_1thread"].append(batched(ours, indices))
            finally:
                torch.set_num_threads(threads)
        for _ in range(max(1, repeats // 2)):
            rows["tv_epoch"].append(epoch(tv_t, 2, epoch_images))
            rows["ours_epoch"].append(epoch(ours_t, 2, epoch_images))
    best = {k: min(v) for k, v in rows.items()}
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "mpsdata": mpsdata.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu_count": os.cpu_count(),
            "load_average_start_end": [load_start, os.getloadavg()],
        },
        "ratio": args.ratio,
        "layout": ours.archive.name,
        "repeats": repeats,
        "item_images": items,
        "epoch_images": epoch_images,
        "min_seconds": best,
        "all_seconds": rows,
        "build": build,
        "peak_rss_this_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    us = 1e6
    print("| measure | torchvision | mpsdata | ratio (mpsdata / torchvision) | target |")
    print("|---|---|---|---|---|")
    print(
        f"| `__getitem__`, PIL out (us/image) | {best['tv_item'] * us:.2f} | {best['ours_item'] * us:.2f} | "
        f"{best['ours_item'] / best['tv_item']:.2f} | <= 1.5 |"
    )
    print(
        f"| DataLoader epoch, 2 workers, ToTensor, {epoch_images} images (s) | {best['tv_epoch']:.2f} | "
        f"{best['ours_epoch']:.2f} | {best['ours_epoch'] / best['tv_epoch']:.2f} | <= 1.2 |"
    )
    print(
        f"| torchvision per item + ToTensor vs mpsdata decode_batch (us/image) | {best['tv_item_tensor'] * us:.2f} | "
        f"{best['ours_batched'] * us:.3f} | speed-up {best['tv_item_tensor'] / best['ours_batched']:.1f}x | >= 20x |"
    )
    print(
        f"| same, torch.set_num_threads(1) (us/image) | {best['tv_item_tensor'] * us:.2f} | "
        f"{best['ours_batched_1thread'] * us:.3f} | "
        f"speed-up {best['tv_item_tensor'] / best['ours_batched_1thread']:.1f}x | >= 20x |"
    )
    print(
        f"| build 60,000 train images (s, peak MiB; import alone {build['import_only_peak_mib']:.0f} MiB) | - | "
        f"{build['seconds']:.2f} s, {build['peak_mib']:.0f} MiB | - | <= 10 s |"
    )


if __name__ == "__main__":
    main()
