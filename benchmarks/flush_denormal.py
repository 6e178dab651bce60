"""What subnormal numbers cost the encode: kernel revisions timed with the CPU's flush-to-zero mode off and on.

``torch.set_flush_denormal(True)`` makes this thread's floating point flush subnormal results and inputs to zero
(x86 with SSE3); with one thread the kernels run in this thread. For each revision (as in ``kernel_ab.py``) and
each of ``kernel_ab.py``'s cases, float32, ``tails=True``, the repeats of both modes are interleaved and the
minimum time per image is reported with the ratio on / off: well below 1 means subnormal arithmetic costs time
(on Intel every operation on a subnormal number takes a microcode assist). Also counts the subnormal values in
the cores, which should be none.

Usage::

    .venv/bin/python benchmarks/flush_denormal.py d9fdc5b WORKTREE     # before and after the fix
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from mpsdata import _engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ab import encode_cases, load_kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+", help="kernel revisions (git revisions or WORKTREE)")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # flush-to-zero is per thread: the kernels must run in this one
    if not torch.set_flush_denormal(True):
        raise SystemExit("this CPU has no flush-to-zero mode that torch can set")
    torch.set_flush_denormal(False)
    tiny = torch.finfo(torch.float32).tiny
    original = _engine._kernels
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for rev in args.revs:
                _engine._kernels = load_kernels(rev, Path(tmp))
                for name, x, layout, bonds, tol in encode_cases(args.images):
                    xf = x.float()
                    times: dict[bool, list[float]] = {False: [], True: []}
                    for rep in range(args.repeats + 1):
                        for flush in (False, True):
                            torch.set_flush_denormal(flush)
                            start = time.perf_counter()
                            packed = _engine.encode(xf, layout.gather_index, layout.site_dims, bonds, tol=tol)
                            elapsed = time.perf_counter() - start
                            torch.set_flush_denormal(False)
                            if rep:  # the first round compiles
                                times[flush].append(elapsed / x.shape[0] * 1e6)
                            elif not flush:
                                cores = packed.cores
                                subnormal = int(((cores != 0) & (cores.abs() < tiny)).sum())
                    off, on = min(times[False]), min(times[True])
                    print(
                        f"{rev} {name}: flush off {off:.2f} us, on {on:.2f} us per image, ratio on/off "
                        f"{on / off:.3f}; subnormal core values {subnormal}",
                        flush=True,
                    )
        finally:
            _engine._kernels = original
            torch.set_flush_denormal(False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
