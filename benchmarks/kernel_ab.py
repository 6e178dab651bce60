"""A/B of the CPU kernels (``mpsdata/_kernels.py``) at two git revisions, in one process.

Both versions of the module are loaded side by side and ``mpsdata._engine.encode`` is pointed at each in
turn, with the repeats interleaved, so that the ratio holds on a shared, noisy machine. Reports the
minimum time per image of each version, the ratio B/A, the largest difference of the per-image
relative reconstruction errors (B minus A, so a positive number means B lost accuracy), and for each
version how far the error it reports (``sqrt(sum eps2)``) is from the error measured on its
reconstruction (largest relative difference over the images whose error is at least 1e-3 of their norm).

Usage::

    .venv/bin/python benchmarks/kernel_ab.py a39a8ad WORKTREE           # one thread, 4096 images
    .venv/bin/python benchmarks/kernel_ab.py HEAD~1 HEAD --threads 2 --images 10000

Cases: Fashion-MNIST on three layouts and 32x32 patches at fixed bonds, and both under ``tol=0.1`` with the
largest bonds as caps (what ``decompose(x, tol=0.1)`` runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from mpsdata import _engine
from mpsdata._layout import make_layout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import DEFAULT_FASHION, load_fashion, load_patches

ROOT = Path(__file__).resolve().parents[1]


def load_kernels(rev: str, workdir: Path) -> ModuleType:
    """``mpsdata/_kernels.py`` at git revision ``rev`` (``WORKTREE``: the file as it is now) as a module."""
    if rev == "WORKTREE":
        source = (ROOT / "mpsdata" / "_kernels.py").read_text()
    else:
        source = subprocess.run(
            ["git", "show", f"{rev}:mpsdata/_kernels.py"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
    return module_from_source(source, "kernels_" + "".join(c if c.isalnum() else "_" for c in rev), workdir)


def module_from_source(source: str, name: str, workdir: Path) -> ModuleType:
    """Kernel source text loaded as module ``name`` (written to ``workdir``, where numba caches it)."""
    path = workdir / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode_cases(count: int) -> list[tuple[str, torch.Tensor, object, tuple[int, ...], float]]:
    """``(name, images (B, N), layout, bonds, tol)``: Fashion-MNIST on three layouts and 32x32 patches at fixed
    bonds, and both under ``tol=0.1`` with the largest bonds as caps; ``count`` images (and at most as many
    patch channels)."""
    fashion = load_fashion(DEFAULT_FASHION, count).reshape(count, -1)
    patches, _ = load_patches(None)
    patches = patches[:count].reshape(-1, 32 * 32)  # one MPS per channel
    fashion_layout = make_layout(28, 28, site_dims=[2, 4, 7, 7, 2])
    patch_layout = make_layout(32, 32, site_dims=[4, 4, 4, 4, 4])
    return [
        ("Fashion-MNIST [2,4,7,7,2] bonds [2,6,5,2]", fashion, fashion_layout, (2, 6, 5, 2), 0.0),
        ("Fashion-MNIST default [28,28] bond 5 (ratio 0.4)", fashion, make_layout(28, 28), (5,), 0.0),
        (
            "Fashion-MNIST hierarchical [49,4,4] bonds [4,4] (ratio 0.4)",
            fashion,
            make_layout(28, 28, site_dims="hierarchical"),
            (4, 4),
            0.0,
        ),
        ("32x32 channels [4,4,4,4,4] bonds [4,6,6,4]", patches, patch_layout, (4, 6, 6, 4), 0.0),
        ("Fashion-MNIST default [28,28] tol 0.1 (caps 28)", fashion, make_layout(28, 28), (28,), 0.1),
        ("32x32 channels [4,4,4,4,4] tol 0.1 (caps [4,16,16,4])", patches, patch_layout, (4, 16, 16, 4), 0.1),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="baseline revision (or WORKTREE)")
    parser.add_argument("b", help="candidate revision (or WORKTREE)")
    parser.add_argument("--images", type=int, default=4096, help="Fashion-MNIST images (and at most that many patches)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cases = encode_cases(args.images)
    original = _engine._kernels
    with tempfile.TemporaryDirectory() as tmp:
        versions = {args.a: load_kernels(args.a, Path(tmp)), args.b: load_kernels(args.b, Path(tmp))}
        try:
            for name, x, layout, bonds, tol in cases:
                for dtype in (torch.float32, torch.float64):
                    xf = x.to(dtype)
                    times: dict[str, list[float]] = {rev: [] for rev in versions}
                    errors, reported = {}, {}
                    for rep in range(args.repeats + 1):
                        for rev, module in versions.items():
                            _engine._kernels = module
                            start = time.perf_counter()
                            packed = _engine.encode(
                                xf, layout.gather_index, layout.site_dims, bonds, tol=tol, dtype=dtype, tails=True
                            )
                            elapsed = time.perf_counter() - start
                            if rep:  # the first round compiles
                                times[rev].append(elapsed / x.shape[0] * 1e6)
                            else:
                                approx = _engine.decode(packed.cores, layout.scatter_index, layout.site_dims, bonds)
                                ref = xf.double()
                                measured = (approx.double() - ref).norm(dim=1)
                                errors[rev] = measured / ref.norm(dim=1).clamp_min(1e-300)
                                claimed = packed.eps2.double().sum((1, 2)).sqrt()
                                # relative to the measured error, over the images not reconstructed to
                                # rounding level (there the reported error is ~sqrt(eps) ||x||, documented)
                                lossy = measured >= 1e-3 * ref.norm(dim=1)
                                gap = (claimed - measured).abs() / measured.clamp_min(1e-300)
                                reported[rev] = float(gap[lossy].max()) if bool(lossy.any()) else 0.0
                    a, b = (min(times[rev]) for rev in versions)
                    diff = float((errors[args.b] - errors[args.a]).max())
                    print(
                        f"{name} {str(dtype)[6:]}: {args.a} {a:.2f} us, {args.b} {b:.2f} us per image, "
                        f"ratio {b / a:.3f}; max error difference {diff:+.2e}; reported vs measured error "
                        f"{reported[args.a]:.1e} / {reported[args.b]:.1e}",
                        flush=True,
                    )
        finally:
            _engine._kernels = original
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
