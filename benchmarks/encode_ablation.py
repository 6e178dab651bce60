"""Where the encode time goes: the kernels with stages cut out, timed against the full kernel in one process.

Loads ``mpsdata/_kernels.py`` several times with source edits that drop one stage more each time (the
eigensolver, then the Gram matrices, the projections, the write-out of the cores, the gather of the images
into lane-major order), points ``_engine.encode`` at each in turn with the repeats interleaved, and prints
the minimum time per image. The differences between neighbouring columns are the stages' costs. The cut
kernels compute garbage; only their time means something. Fashion-MNIST on two layouts and 32x32 patches of
scikit-image photos (one MPS per channel), float32, ``tails=False``.

Usage::

    .venv/bin/python benchmarks/encode_ablation.py            # one thread, 4096 images
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from mpsdata import _engine
from mpsdata._layout import make_layout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ab import module_from_source
from speed import DEFAULT_FASHION, load_fashion, load_patches

SOURCE = Path(__file__).resolve().parents[1] / "mpsdata" / "_kernels.py"
NOOP = "@numba.njit(**_JIT)\ndef _noop(*args):\n    pass\n\n\n"
CUTS = {
    "eigensolver": [
        ("            _eigh_top_lanes(G, m, cap,", "            _noop(G, m, cap,"),
        ("            _eigh_top_lanes(G, ncol, cap,", "            _noop(G, ncol, cap,"),
        ("@numba.njit(**_JIT)\ndef _choose_rank(", NOOP + "@numba.njit(**_JIT)\ndef _choose_rank("),
    ],
    "Gram matrices": [("G[p, q, lane] += C[p * step + t * stride, lane] * C[q * step + t * stride, lane]", "pass")],
    "projections": [
        ("C2[a * ncol + t, lane] += Vs[p, a, lane] * C[p * ncol + t, lane]", "pass"),
        ("core[off + i * cap + a, lane] += C[i * ncol + t, lane] * Vs[t, a, lane]", "pass"),
    ],
    "core write-out": [("                    cores[b0 + lane, term, i] = core[i, lane]", "                    pass")],
    "image gather": [("                X[i, lane] = x[b0 + lane, src]", "                X[i, lane] = src")],
}


def variants(workdir: Path) -> dict:
    source = SOURCE.read_text()
    modules = {"full": source}
    for stage, edits in CUTS.items():
        for old, new in edits:
            if old not in source:
                raise RuntimeError(f"the kernel source changed: cannot cut {stage!r} at {old.strip()!r}")
            source = source.replace(old, new)
        modules[f"- {stage}"] = source
    return {name: module_from_source(text, f"cut{i}", workdir) for i, (name, text) in enumerate(modules.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fashion = load_fashion(DEFAULT_FASHION, args.images).reshape(args.images, -1).float()
    patches = load_patches(None)[0][: args.images].reshape(-1, 32 * 32).float()  # one MPS per channel
    cases = [
        (fashion, 28, [2, 4, 7, 7, 2], (2, 6, 5, 2)),
        (fashion, 28, [28, 28], (5,)),
        (patches, 32, [4, 4, 4, 4, 4], (4, 6, 6, 4)),
    ]
    original = _engine._kernels
    with tempfile.TemporaryDirectory() as tmp:
        modules = variants(Path(tmp))
        try:
            for x, side, sites, bonds in cases:
                layout = make_layout(side, side, site_dims=sites)
                times: dict[str, list[float]] = {name: [] for name in modules}
                for rep in range(args.repeats + 1):
                    for name, module in modules.items():
                        _engine._kernels = module
                        start = time.perf_counter()
                        _engine.encode(x, layout.gather_index, layout.site_dims, bonds, tails=False)
                        if rep:  # the first round compiles
                            times[name].append((time.perf_counter() - start) / x.shape[0] * 1e6)
                row = ", ".join(f"{name} {min(t):.2f}" for name, t in times.items())
                print(f"sites {sites} bonds {list(bonds)}, us/image: {row}", flush=True)
        finally:
            _engine._kernels = original
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
