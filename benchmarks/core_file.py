"""Core-file choices measured on the real Fashion-MNIST training set: gzip level and two-site decode.

1. gzip level of the HDF5 filter: the float16 cores of ``MPSFashionMNIST(ratio=0.4)`` (60,000 images, default
   layout, written with the default filter so that the chunks are the ones filtered files use) rewritten with byte
   shuffle + gzip at levels 1, 4, 6 and 9 in those chunks: bytes relative to the unfiltered cores, and write time.
2. Decode of a two-site chain (the default ``[28, 28]`` layout): one batched matrix product in float64
   (``_engine._decode_matrix``, what ``decode_batch`` runs), the same in float32 (before), and the lane kernel
   (``_engine._decode_numba``, float32), batches of 256 random indices (the cores gathered per batch, as
   ``decode_batch`` does), interleaved repeats, minimum per image; and for each, the uint8 values of the whole set
   that differ from the per-item decoder behind ``ds[i]`` (``CoreFile.decode_one``).
3. int8 against int4 core files at byte budgets: ``MPSFashionMNIST(train=False, bytes_ratio=b, core_dtype=...)``
   (10,000 test images, default layout and gzip) at ``b`` in ``--budgets``: bonds, the file's real bytes over the
   raw uint8 bytes and the mean PSNR of its stored per-image MSE (what ``mpsdata info`` prints).
4. The same choice on colour photos: the 307 RGB 32x32 patches of ``rate_distortion.py``'s p32 set, encoded with
   the datasets' defaults (``channel_mode="site"``, default layout) by ``decompose(..., core_dtype=...)``, whose
   int4 images a core file reproduces exactly (tests/test_archive.py) and int8 images within one level.

Run: python benchmarks/core_file.py --fashion /work/shared/datasets/fashion-mnist
(``--parts files,photos`` for parts 3 and 4 alone; ``--parts gzip,decode`` for parts 1 and 2.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

import mpsdata
from mpsdata import _engine
from mpsdata._mps import to_uint8
from mpsdata._signal import psnr
from mpsdata.cli import _summary

sys.path.insert(0, str(Path(__file__).resolve().parent))


def gzip_levels(path: Path, out_dir: Path) -> None:
    with h5py.File(path, "r") as f:
        arrays = {k: (f["cores"][k][...], f["cores"][k].chunks) for k in f["cores"]}
    raw = sum(a.nbytes for a, _ in arrays.values())
    print(f"| gzip level | bytes / unfiltered cores ({raw:,} B) | write (s) |")
    print("|---|---:|---:|")
    for level in (1, 4, 6, 9):
        target = out_dir / f"level{level}.h5"
        start = time.perf_counter()
        with h5py.File(target, "w") as f:
            for name, (array, chunks) in arrays.items():
                f.create_dataset(
                    name, data=array, chunks=chunks, compression="gzip", compression_opts=level, shuffle=True
                )
        seconds = time.perf_counter() - start
        print(f"| {level} | {target.stat().st_size / raw:.4f} | {seconds:.2f} |")


def two_site_decode(ds, repeats: int) -> None:
    cores = ds._cores
    g = cores.geometry
    sites, bonds, scatter = g.layout.site_dims, g.bond_dims, g.layout.scatter_index
    assert len(sites) == 2, f"expected the two-site default layout, got {g.layout.describe()}"
    order = np.random.default_rng(0).permutation(len(ds))
    batches = [order[s : s + 256] for s in range(0, 20480, 256)]
    methods = {
        "matrix product, float64 (decode_batch)": lambda c: _engine._decode_matrix(c, scatter, sites, bonds, True),
        "matrix product, float32": lambda c: to_uint8(_engine._decode_matrix(c, scatter, sites, bonds, False)),
        "lane kernel, float32": lambda c: _engine._decode_numba(c, scatter, sites, bonds, True),
    }
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            for batch in batches:  # gathered per batch, as decode_batch does
                fn(torch.from_numpy(np.asarray(cores.packed(batch))))
            best[name] = min(best[name], (time.perf_counter() - start) / (256 * len(batches)) * 1e6)
    every = torch.from_numpy(np.asarray(cores.packed(np.arange(len(ds)))))
    items = torch.from_numpy(np.stack([cores.decode_one(i) for i in range(len(ds))]).reshape(len(ds), -1))
    print(
        f"\nTwo-site decode, {g.layout.describe()} bonds {list(bonds)}, uint8 out, {torch.get_num_threads()} threads:"
    )
    for name, us in best.items():
        differ = int((methods[name](every) != items).sum())
        print(f"- {name}: {us:.3f} us/image (min of {repeats}); values differing from ds[i] over {len(ds):,}: {differ}")


def byte_budget_files(root: Path, budgets: list[float]) -> None:
    print("\n| options | cores | bonds | file bytes ratio | PSNR (dB) |")
    print("|---|---|---|---|---|")
    for budget in budgets:
        for core_dtype in ("int8", "int4"):
            ds = mpsdata.MPSFashionMNIST(root, train=False, bytes_ratio=budget, core_dtype=core_dtype)
            info = _summary(ds.archive)
            options = f'`bytes_ratio={budget}, core_dtype="{core_dtype}"` (gzip)'
            print(f"| {options} | {core_dtype} | {tuple(info['bond_dims'])} | {info['bytes_ratio']:.3f} | "
                  f"{info['psnr_db']:.2f} |")  # fmt: skip


def photo_budgets(budgets: list[float]) -> None:
    from rate_distortion import photo_patches, skimage_photos

    x, _ = photo_patches(skimage_photos(), 32, (64, 96, 128))
    print(f"\n{x.shape[0]} RGB 32x32 photo patches, channel_mode='site', default layout:")
    print("| bytes_ratio | int8 bonds | int8 PSNR (dB) | int4 bonds | int4 PSNR (dB) |")
    print("|---|---|---|---|---|")
    for budget in budgets:
        cells = []
        for core_dtype in ("int8", "int4"):
            m = mpsdata.decompose(x, bytes_ratio=budget, core_dtype=core_dtype, channel_mode="site")
            cells += [str(m.bond_dims), f"{float(psnr(m.reconstruct(torch.uint8), x).mean()):.2f}"]
        print(f"| {budget} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fashion", type=Path, default=os.environ.get("MPSDATA_FASHION_MNIST"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="gzip,decode,files,photos", help="comma list of gzip, decode, files, photos")
    parser.add_argument("--budgets", default="0.1,0.2,0.3", help="bytes ratios of the files part")
    args = parser.parse_args()
    if args.fashion is None:
        parser.error("give --fashion DIR (the Fashion-MNIST idx files) or set MPSDATA_FASHION_MNIST")
    work = Path(tempfile.mkdtemp(prefix="mpsdata-core-file-"))
    try:
        raw = work / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in args.fashion.glob("*-ubyte.gz"):
            shutil.copy(name, raw / name.name)
        parts = set(args.parts.split(","))
        if parts & {"gzip", "decode"}:
            ds = mpsdata.MPSFashionMNIST(work, train=True, ratio=0.4)
            if "gzip" in parts:
                gzip_levels(ds.archive, work)
            if "decode" in parts:
                two_site_decode(ds, args.repeats)
        if "files" in parts:
            byte_budget_files(work, [float(b) for b in args.budgets.split(",")])
        if "photos" in parts:
            photo_budgets([float(b) for b in args.budgets.split(",")])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
