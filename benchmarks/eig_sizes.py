"""The top-cap lane eigensolver against per-matrix LAPACK, by matrix size (sets ``_kernels._LAPACK_MIN``).

Random Gram matrices ``B B^T`` (``B`` of shape ``n x 3n``), float32, one thread, the top 5 eigenpairs:
``_eigh_top_lanes`` on 64 matrices at once against ``np.linalg.eigh`` called per matrix inside numba, as
``_kernels._lapack_lane`` does. Prints microseconds per matrix and the ratio.

Usage::

    .venv/bin/python benchmarks/eig_sizes.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import _eig_loop


@numba.njit(nogil=True)
def _lapack_loop(grams, cap):
    acc = 0.0
    for g in grams:
        w, v = np.linalg.eigh(g)
        acc += w[-1] + v[0, -cap]
    return acc


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cap, count = 5, 1024
    print("| n | lane solver us/matrix | LAPACK us/matrix | LAPACK / lanes |")
    print("|---:|---:|---:|---:|")
    for n in (8, 14, 24, 32, 48, 64, 96, 128):
        b = rng.normal(size=(count, n, 3 * n)).astype(np.float32)
        grams = np.ascontiguousarray(b @ b.transpose(0, 2, 1))
        lanes = best_of(lambda g=grams: _eig_loop(g, cap, True, 1)) / count * 1e6
        lapack = best_of(lambda g=grams: _lapack_loop(g, cap)) / count * 1e6
        print(f"| {n} | {lanes:.2f} | {lapack:.2f} | {lapack / lanes:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
