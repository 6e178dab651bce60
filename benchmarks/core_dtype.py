"""Storage precision of the cores: PSNR lost by float16 against float32, per layout and ratio.

Run: python benchmarks/core_dtype.py --fashion /work/shared/datasets/fashion-mnist
Prints a markdown table; the result chose the datasets' default core_dtype (docs/format.md).
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import numpy as np
import torch

import mpsdata
from mpsdata import _engine


def load_fashion(path: Path, count: int) -> torch.Tensor:
    with gzip.open(path / "train-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return torch.from_numpy(data[:count].copy())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fashion", type=Path, default=os.environ.get("MPSDATA_FASHION_MNIST"))
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    x = load_fashion(args.fashion, args.images)
    print("| layout | ratio | residual | PSNR float32 (dB) | PSNR float16 (dB) | loss (dB) |")
    print("|---|---|---|---|---|---|")
    for site_dims in ("row", "hierarchical"):
        for ratio in (0.1, 0.4, 0.7):
            for residual in (0, 1):
                try:
                    m = mpsdata.decompose(x, ratio, residual=residual, site_dims=site_dims, compute_bound=False)
                except ValueError:  # the ratio is below what any MPS with these terms can reach
                    print(f"| {site_dims} | {ratio} | {residual} | n/a | n/a | n/a |")
                    continue
                full = psnr(m.reconstruct(torch.uint8), x)
                half = m._packed.to(torch.float16).float()
                recon = _engine.decode(half, m.layout.scatter_index, m.site_dims, m.bond_dims, quantize=True)
                low = psnr(recon.reshape(x.shape), x)
                print(f"| {site_dims} | {ratio} | {residual} | {full:.3f} | {low:.3f} | {full - low:.4f} |")


if __name__ == "__main__":
    main()
