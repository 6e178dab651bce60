"""What ``site_dims="auto"`` picks (layout, pixel/DCT domain, RGB or luma/chroma) and what it gains over the
default layout, at int8 byte budgets; the luma share of ``colour="ycc"``; and the cost of decoding a core file
that holds DCT planes, per item (``__getitem__``) against files of pixels and against the batched float path that
``__getitem__`` took before its per-item kernel (``--items-only`` measures just that and updates the JSON).

Data: real Fashion-MNIST test split ``[0:2000]`` and the 32x32 RGB patches of the scikit-image photos
(``benchmarks/rate_distortion.py``'s p32 set). The search runs as datasets run it: on a seeded random sample
of 256 images (``mpsdata.datasets._base.AUTO_SAMPLE``, seed 0), then every image is decomposed with the winner.
PSNR is the mean per-image PSNR of the uint8 reconstructions (deterministic); times are ratios measured in one
process.

    python benchmarks/auto_layout.py --fashion ../shared/datasets/fashion-mnist
    python benchmarks/auto_layout.py --fashion ../shared/datasets/fashion-mnist --items-only
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rate_distortion import photo_patches, skimage_photos

import mpsdata
from mpsdata import _mps
from mpsdata._signal import psnr
from mpsdata.datasets import _base

BUDGETS = (0.1, 0.2, 0.3, 0.4)
SHARES = (1 / 3, 0.4, 0.5, 0.6, 0.7, 0.8)


def load_fashion_test(path: Path, count: int) -> torch.Tensor:
    with gzip.open(path / "t10k-images-idx3-ubyte.gz") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return torch.from_numpy(data[:count].copy())


def random_sample(x: torch.Tensor) -> torch.Tensor:
    count = min(_base.AUTO_SAMPLE, x.shape[0])
    wanted = np.sort(np.random.default_rng(_base.AUTO_SEED).choice(x.shape[0], count, replace=False))
    return x[torch.from_numpy(wanted)]


def mean_psnr(m: mpsdata.MPS, x: torch.Tensor) -> float:
    return float(psnr(m.reconstruct(torch.uint8).reshape(x.shape), x).mean())


def compare(x: torch.Tensor, mode: str, log) -> list[dict]:
    """Default layout against the searched choice, per budget."""
    rows = []
    for b in BUDGETS:
        default = mpsdata.decompose(x, bytes_ratio=b, channel_mode=mode, compute_bound=False)
        started = time.perf_counter()
        found = _mps.search(random_sample(x), bytes_ratio=b, channel_mode=mode)
        searched = time.perf_counter() - started
        site_dims, domain, colour, share = _mps._from_candidate(found, mode)
        started = time.perf_counter()
        auto = mpsdata.decompose(x, bytes_ratio=b, channel_mode=mode, site_dims=site_dims, domain=domain,
                                 colour=colour, luma_share=share, compute_bound=False)  # fmt: skip
        encoded = time.perf_counter() - started
        planes = x.shape[1] if x.ndim == 4 and mode == "separate" else 1
        nbytes = auto.nbytes.reshape(-1, planes).sum(-1).double().mean().item()
        rows.append({
            "bytes_ratio": b, "channel_mode": mode, "default_layout": default.layout.describe(),
            "default_psnr": mean_psnr(default, x), "auto_layout": auto.layout.describe(), "auto_domain": auto.domain,
            "auto_colour": auto.colour, "auto_luma_share": auto.luma_share, "auto_psnr": mean_psnr(auto, x),
            "auto_bytes_ratio": nbytes / x[0].numel(), "sample_best_psnr": found["best"]["psnr"],
            "candidates": len(found["candidates"]), "search_over_full_encode": searched / encoded,
        })  # fmt: skip
        r = rows[-1]
        log(f"  {mode} b={b}: default {r['default_layout']} {r['default_psnr']:.2f} dB; auto {r['auto_layout']} "
            f"{r['auto_domain']}/{r['auto_colour']}/{r['auto_luma_share']} {r['auto_psnr']:.2f} dB")  # fmt: skip
    return rows


def luma_shares(x: torch.Tensor, log) -> list[dict]:
    """PSNR of colour="ycc" (separate planes, default layout) at every luma share and budget."""
    rows = []
    for b in BUDGETS:
        for share in SHARES:
            try:
                m = mpsdata.decompose(x, bytes_ratio=b, colour="ycc", luma_share=share, compute_bound=False)
            except ValueError:
                continue
            rows.append({"bytes_ratio": b, "luma_share": share, "psnr": mean_psnr(m, x),
                         "bond_dims": m.bond_dims, "chroma_bond_dims": m.chroma_bond_dims})  # fmt: skip
            log(f"  ycc b={b} share={share:.3f}: {rows[-1]['psnr']:.2f} dB {m.bond_dims} / {m.chroma_bond_dims}")
        rgb = mpsdata.decompose(x, bytes_ratio=b, compute_bound=False)
        rows.append({"bytes_ratio": b, "luma_share": None, "psnr": mean_psnr(rgb, x), "bond_dims": rgb.bond_dims})
    return rows


def _float_item(ds, index: int):
    """``__getitem__`` as it was for transformed files: the batched float decode of one image, then PIL."""
    image = ds._cores.decode([index])[0].numpy()
    return PIL.Image.fromarray(image[0]), ds.targets[index]


def item_times(fashion: Path, count: int, repeats: int, log) -> dict:
    """Best per-item time of ``__getitem__`` (PIL out) over ``count`` items, interleaved passes in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = root / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            (raw / name).symlink_to(Path(fashion).resolve() / name)

        def build(**options):
            return mpsdata.MPSFashionMNIST(root, train=False, bytes_ratio=0.3, **options)

        datasets = {
            "pixels": build(),
            "dct": build(domain="dct", site_dims="hierarchical"),
            "pixels-hier": build(site_dims="hierarchical"),
            "dct-row": build(domain="dct", site_dims="row"),
            "pixels-row": build(site_dims="row"),
            "dct-default": build(domain="dct"),
        }
        readers = {name: ds.__getitem__ for name, ds in datasets.items()}
        readers["dct-float-path"] = lambda i, ds=datasets["dct"]: _float_item(ds, i)
        for read in readers.values():
            read(0)  # load the cores, compile
        for i in range(count):  # the reads being timed give the bytes of the batch decode
            for name in ("dct", "dct-row", "dct-default"):
                assert np.array_equal(np.asarray(readers[name](i)[0]), np.asarray(_float_item(datasets[name], i)[0]))
        best = {name: float("inf") for name in readers}
        for _ in range(repeats):  # interleaved, best of the repeats: the machine is shared
            for name, read in readers.items():
                started = time.perf_counter()
                for i in range(count):
                    read(i)
                best[name] = min(best[name], (time.perf_counter() - started) / count)
        out = {f"{name}_us": 1e6 * t for name, t in best.items()}
        out["dct_over_pixels_hier"] = best["dct"] / best["pixels-hier"]
        out["dct_over_pixels_default"] = best["dct"] / best["pixels"]
        out["dct_row_over_pixels_row"] = best["dct-row"] / best["pixels-row"]
        out["dct_default_over_pixels_default"] = best["dct-default"] / best["pixels"]
        out["float_path_over_dct"] = best["dct-float-path"] / best["dct"]
        out["psnr"] = {name: ds.psnr for name, ds in datasets.items()}
        out["items"], out["repeats"] = count, repeats
        log(f"  __getitem__: {json.dumps(out, indent=1)}")
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fashion", type=Path, required=True, help="folder with the Fashion-MNIST idx .gz files")
    parser.add_argument("--images", type=int, default=2000, help="Fashion-MNIST test images")
    parser.add_argument("--items", type=int, default=2000, help="items timed per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved passes of the item timing")
    parser.add_argument("--items-only", action="store_true", help="time __getitem__ only; update the JSON's getitem")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "auto_layout.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.items_only:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        results["getitem"] = item_times(args.fashion, args.items, args.repeats, log)
        results["getitem_command"] = " ".join(sys.argv)
        args.out.write_text(json.dumps(results, indent=1))
        log(f"wrote {args.out}")
        return

    results: dict = {"command": " ".join(sys.argv), "sample": _base.AUTO_SAMPLE, "seed": _base.AUTO_SEED}
    fashion = load_fashion_test(args.fashion, args.images)
    log(f"fashion test[0:{args.images}]")
    results["fashion"] = compare(fashion, "separate", log)
    patches, _ = photo_patches(skimage_photos(), 32, (64, 96, 128))
    log(f"p32: {patches.shape[0]} patches")
    results["p32_luma_share"] = luma_shares(patches, log)
    results["p32"] = compare(patches, "separate", log) + compare(patches, "site", log)
    results["getitem"] = item_times(args.fashion, args.items, args.repeats, log)
    args.out.write_text(json.dumps(results, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
