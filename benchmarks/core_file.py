"""Core-file choices measured on the real Fashion-MNIST training set: gzip level and two-site decode.

1. gzip level of the HDF5 filter: the float16 cores of ``MPSFashionMNIST(ratio=0.4)`` (60,000 images, default
   layout, written with the default filter so that the chunks are the ones filtered files use) rewritten with byte
   shuffle + gzip at levels 1, 4, 6 and 9 in those chunks: bytes relative to the unfiltered cores, and write time.
2. Decode of a two-site chain (the default ``[28, 28]`` layout): one batched matrix product
   (``_engine._decode_matrix``) against the lane kernel (``_engine._decode_numba``), batches of 256 random
   indices (the cores gathered per batch, as ``decode_batch`` does), interleaved repeats, minimum per image; and
   whether every uint8 image of the set is identical.

Run: python benchmarks/core_file.py --fashion /work/shared/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

import mpsdata
from mpsdata import _engine


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
        "matrix product": lambda c: _engine._decode_matrix(c, scatter, sites, bonds, True),
        "lane kernel": lambda c: _engine._decode_numba(c, scatter, sites, bonds, True),
    }
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            for batch in batches:  # gathered per batch, as decode_batch does
                fn(torch.from_numpy(np.asarray(cores.packed(batch))))
            best[name] = min(best[name], (time.perf_counter() - start) / (256 * len(batches)) * 1e6)
    every = torch.from_numpy(np.asarray(cores.packed(np.arange(len(ds)))))
    differ = int((methods["matrix product"](every) != methods["lane kernel"](every)).sum())
    print(
        f"\nTwo-site decode, {g.layout.describe()} bonds {list(bonds)}, uint8 out, {torch.get_num_threads()} threads:"
    )
    for name, us in best.items():
        print(f"- {name}: {us:.3f} us/image (min of {repeats})")
    print(f"- uint8 values that differ over all {len(ds):,} images: {differ}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fashion", type=Path, default=os.environ.get("MPSDATA_FASHION_MNIST"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.fashion is None:
        parser.error("give --fashion DIR (the Fashion-MNIST idx files) or set MPSDATA_FASHION_MNIST")
    work = Path(tempfile.mkdtemp(prefix="mpsdata-core-file-"))
    try:
        raw = work / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in args.fashion.glob("*-ubyte.gz"):
            shutil.copy(name, raw / name.name)
        ds = mpsdata.MPSFashionMNIST(work, train=True, ratio=0.4)
        gzip_levels(ds.archive, work)
        two_site_decode(ds, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
