"""The ``mpsdata`` command line: build, info, verify and show core files; pack and download archives."""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._archive import COMPRESSIONS, CORE_DTYPES, DEFAULT_COMPRESSION
from ._typing import ChannelMode
from ._version import __version__

_DATASETS = {
    "mnist": "MPSMNIST",
    "fashion-mnist": "MPSFashionMNIST",
    "cifar10": "MPSCIFAR10",
    "cifar100": "MPSCIFAR100",
    "imagenet": "MPSImageNet",
    "imagefolder": "MPSImageFolder",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpsdata",
        description="Compress image datasets with matrix product states and inspect the results.",
    )
    parser.add_argument("--version", action="version", version=f"mpsdata {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    build = commands.add_parser("build", help="compress a dataset into a core file (or reuse an existing one)")
    build.add_argument("dataset", choices=sorted(_DATASETS), help="which dataset")
    build.add_argument("--root", required=True, type=Path, help="dataset root, torchvision's layout")
    build.add_argument("--split", default="train", help="train or test (val for imagenet; ignored for imagefolder)")
    build.add_argument("--download", action="store_true", help="download the raw data through torchvision if missing")
    build.add_argument(
        "--raw", type=Path, help="(mnist, fashion-mnist) folder holding the idx files to copy under root"
    )
    budget = build.add_argument_group("budget (default: --ratio 0.4)")
    budget.add_argument("--ratio", type=float, help="the paper's compression ratio in (0, 1]")
    budget.add_argument(
        "--bytes-ratio",
        type=float,
        help="byte budget: core bytes per image over raw uint8 bytes (int8 cores unless --core-dtype)",
    )
    budget.add_argument("--bond-dims", type=_int_list, help="explicit bond dimensions, e.g. 2,6,5,2")
    budget.add_argument("--max-bond", type=int, help="cap on every bond")
    budget.add_argument("--tol", type=float, help="relative error tolerance")
    budget.add_argument("--residual", type=int, default=0, help="residual MPS terms (paper Alg. 2)")
    build.add_argument(
        "--site-dims", type=_site_dims, help="'row', 'hierarchical', 'auto' (searched) or sizes like 2,4,7,7,2"
    )
    build.add_argument("--domain", choices=("pixels", "dct"), help="decompose the pixels or their 2-D DCT")
    build.add_argument("--colour", choices=("rgb", "ycc"), help="colour images as RGB or orthonormal luma/chroma")
    build.add_argument("--luma-share", type=float, help="luma's share of the budget (--colour ycc, separate channels)")
    build.add_argument("--channel-mode", choices=("site", "separate"), default="site")
    build.add_argument(
        "--core-dtype",
        choices=CORE_DTYPES,
        help="storage of the cores (default: float16; int8 with --bytes-ratio; int4 packs two codes per byte)",
    )
    build.add_argument(
        "--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION, help="HDF5 filter of the core file"
    )
    build.add_argument("--image-size", type=int, help="(imagenet, imagefolder) side of the stored images")
    build.add_argument(
        "--codec",
        choices=("mps", "shared"),
        default="mps",
        help="per-image MPS cores, or the shared representation fitted on the training split (needs --bytes-ratio)",
    )
    build.set_defaults(handler=_build)

    info = commands.add_parser("info", help="settings, counts, ratios and quality of a core file")
    info.add_argument("file", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_info)

    verify = commands.add_parser("verify", help="check every checksum and decode every image")
    verify.add_argument("file", type=Path)
    verify.set_defaults(handler=_verify)

    show = commands.add_parser("show", help="a PNG of stored images (beside the originals) and bond entropies")
    show.add_argument("file", type=Path)
    show.add_argument("--out", type=Path, required=True, help="PNG to write")
    show.add_argument("--count", type=_positive_int, default=8, help="images to show")
    show.add_argument("--root", type=Path, help="dataset root holding the raw data, to show the originals too")
    show.set_defaults(handler=_show)

    from .download import register_commands

    register_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpsdata`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from ._errors import MPSDataError

    try:
        return int(args.handler(args) or 0)
    except (MPSDataError, RuntimeError, ValueError, TypeError, OSError, KeyError) as error:
        # OSError: unreadable or unwritable paths (a read-only root, a folder given as a file); KeyError: h5py's
        # word for some damaged HDF5 metadata.
        message = str(error) if not isinstance(error, KeyError) else f"damaged HDF5 file ({error.args[0]})"
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            message = f"{type(error).__name__}: {message}"
        if "download=True" in message:
            message += " (on the command line: --download)"
        print(f"mpsdata {args.command}: error: {message}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _site_dims(text: str) -> Any:
    return text if text in ("row", "hierarchical", "auto") else _int_list(text)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "ratio": args.ratio,
        "bytes_ratio": args.bytes_ratio,
        "bond_dims": args.bond_dims,
        "max_bond": args.max_bond,
        "tol": args.tol,
        "residual": args.residual,
        "site_dims": args.site_dims,
        "channel_mode": args.channel_mode,
        "core_dtype": args.core_dtype,
        "compression": args.compression,
    }
    given = {"domain": args.domain, "colour": args.colour, "luma_share": args.luma_share}
    options.update({k: v for k, v in given.items() if v is not None})
    if args.codec == "shared":  # what the user left unset stays unset: the dataset refuses MPS options
        options = {key: value for key, value in options.items() if value is not None}
        if not args.residual:
            options.pop("residual")
        options["codec"] = "shared"
    if args.image_size is not None:
        if args.dataset not in ("imagenet", "imagefolder"):
            raise ValueError("--image-size applies to imagenet and imagefolder only")
        options["image_size"] = args.image_size
    return options


def open_dataset(name: str, root: Path, split: str, download: bool = False, **options: Any):
    """Instantiate the MPS dataset class behind a command-line dataset name."""
    import mpsdata

    cls = getattr(mpsdata, _DATASETS[name])
    if name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
        if split not in ("train", "test"):
            raise ValueError(f"--split must be train or test for {name}, got {split!r}")
        return cls(root, train=split == "train", download=download, **options)
    if name == "imagenet":
        return cls(root, split=split, download=download, **options)
    return cls(root, download=download, **options)


def _build(args: argparse.Namespace) -> int:
    if args.raw is not None:
        _copy_raw(args.dataset, args.raw, args.root)
    start = time.perf_counter()
    ds = open_dataset(args.dataset, args.root, args.split, args.download, **_options(args))
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(repr(ds))
    print(f"PSNR: {ds.psnr:.2f} dB (stored uint8 images against the originals)")
    print(f"Time: {seconds:.2f} s, peak memory: {peak_mib:.0f} MiB")
    return 0


def _copy_raw(dataset: str, raw: Path, root: Path) -> None:
    import mpsdata

    if dataset not in ("mnist", "fashion-mnist"):
        raise ValueError("--raw applies to mnist and fashion-mnist (idx files)")
    target = root / getattr(mpsdata, _DATASETS[dataset])._torchvision_cls.__name__ / "raw"
    target.mkdir(parents=True, exist_ok=True)
    found = sorted(raw.glob("*-idx?-ubyte*"))
    if not found:
        raise FileNotFoundError(f"no idx files (*-idx?-ubyte[.gz]) in {raw}")
    for path in found:
        if not (target / path.name).exists():
            shutil.copyfile(path, target / path.name)


def _summary(path: Path) -> dict[str, Any]:
    """What `info` prints: the fields every core file has, then those of its kind (MPS cores or shared codec)."""
    import torch

    from ._archive import open_core_file

    cores = open_core_file(path)
    values = math.prod(cores.settings["image_shape"])
    mse = cores.mse.double().clamp_min(1e-10)
    summary: dict[str, Any] = {
        "file": str(cores.path),
        "format_version": cores.format_version,
        "dataset": cores.settings["dataset"],
        "split": cores.settings["split"],
        "images": cores.num_samples,
        "image_shape": cores.settings["image_shape"],
        "classes": len(cores.meta["classes"]),
        "bytes_ratio": cores.nbytes / max(1, cores.num_samples * values),
        "file_bytes": cores.nbytes,
        "psnr_db": float((10 * torch.log10(255.0**2 / mse)).mean()) if cores.num_samples else None,
        "settings": cores.settings,
        "source": cores.meta.get("source", {}),
        "content_sha256": cores.content_sha256,
    }
    if getattr(cores, "codec_name", "mps") == "shared":
        summary.update(
            codec="shared",
            shared_codec=cores.codec.describe(),
            shared_fit=cores.meta.get("shared_fit", {}),
            shared_nbytes=cores.shared_nbytes,
            amortised_bytes_ratio=cores.amortised_bytes_ratio,
        )
        return summary
    g = cores.geometry
    ranks = cores.ranks.double()
    ones = ranks.new_ones(ranks.shape[:-1] + (1,))
    bonds = torch.cat([ones, ranks, ones], -1)
    sites = torch.tensor(g.layout.site_dims, dtype=torch.float64)
    params = (bonds[..., :-1] * sites * bonds[..., 1:]).sum((-1, -2))
    summary.update(
        layout=g.layout.describe(),
        domain=cores.domain,
        colour=cores.colour,
        bond_dims=list(g.bond_dims),
        terms=g.terms,
        core_dtype=cores.core_dtype,
        ratio=float(params.mean() / values) if cores.num_samples else 0.0,
    )
    return summary


def _info(args: argparse.Namespace) -> int:
    summary = _summary(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    for key in ("file", "dataset", "split", "images", "image_shape", "classes"):
        print(f"{key:>14}: {summary[key]}")
    if summary.get("codec") == "shared":
        fit = summary["shared_fit"]
        print(f"{'codec':>14}: shared, {summary['shared_codec']}")
        print(f"{'shared_fit':>14}: {fit.get('split')} split, {fit.get('images')} images")
        print(f"{'shared_bytes':>14}: {summary['shared_nbytes']}")
    else:
        for key in ("layout", "domain", "colour", "bond_dims", "terms", "core_dtype"):
            print(f"{key:>14}: {summary[key]}")
        print(f"{'ratio':>14}: {summary['ratio']:.4f} (paper: parameters / pixel values)")
    print(f"{'bytes_ratio':>14}: {summary['bytes_ratio']:.4f} (file bytes / raw uint8 bytes)")
    if summary.get("codec") == "shared":
        print(f"{'amortised':>14}: {summary['amortised_bytes_ratio']:.4f} (per-image bytes + shared part / fit images)")
    print(f"{'psnr':>14}: {summary['psnr_db']:.2f} dB (every stored image against its original)")
    print(f"{'content':>14}: sha256 {summary['content_sha256']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ._archive import open_core_file

    report = open_core_file(args.file).verify()
    print(f"OK: {report['images']} images decoded, every checksum matches ({report['path']})")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("mpsdata show needs matplotlib: pip install matplotlib") from None
    from ._archive import open_core_file
    from ._layout import make_layout
    from ._mps import entanglement_entropy

    cores = open_core_file(args.file)
    shared = getattr(cores, "codec_name", "mps") == "shared"
    count = max(1, min(args.count, cores.num_samples))
    stored = cores.decode(np.arange(count)).numpy()  # (n, C, H, W)
    originals = _originals(cores, args.root, count) if args.root is not None else None
    # A shared-codec file has no chain of its own: its entropies are those of the default MPS layout.
    channels, height, width = stored.shape[1:]
    layout = make_layout(height, width, channels, None, "site") if shared else cores.geometry.layout
    site_dims = layout.spatial_sites
    mode: ChannelMode = "site" if layout.channel_site else "separate"
    import torch

    def entropy(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).double()
        x = x if layout.channel_site else x.flatten(0, 1)
        return entanglement_entropy(x, site_dims, channel_mode=mode).mean(0).numpy()

    rows = 2 if originals is not None else 1
    fig = plt.figure(figsize=(1.6 * count, 1.7 * rows + 2.6))
    grid = fig.add_gridspec(rows + 1, count, height_ratios=[1] * rows + [1.6])
    for i in range(count):
        for r, (label, batch) in enumerate([("original", originals), ("stored", stored)][2 - rows :]):
            ax = fig.add_subplot(grid[r, i])
            image = batch[i].transpose(1, 2, 0)
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label)
            if label == "stored":
                psnr = 10 * math.log10(255.0**2 / max(float(cores.mse[i]), 1e-10))
                ax.set_title(f"{psnr:.1f} dB", fontsize=8)
    ax = fig.add_subplot(grid[rows, :])
    bonds = np.arange(1, len(layout.site_dims))
    if originals is not None:
        ax.plot(bonds, entropy(originals), "o-", label="original")
    ax.plot(bonds, entropy(stored), "s-", label="stored")
    ax.set_xlabel("bond k")
    ax.set_ylabel("entanglement entropy E_k")
    ax.set_xticks(bonds)
    ax.legend()
    summary = _summary(args.file)
    if shared:
        fig.suptitle(f"{summary['dataset']} {summary['split']}: shared codec {summary['shared_codec']}, bytes ratio "
                     f"{summary['bytes_ratio']:.3f}; entropies on {layout.describe()}")  # fmt: skip
    else:
        fig.suptitle(f"{summary['dataset']} {summary['split']}: {layout.describe()}, ratio {summary['ratio']:.3f}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


def _originals(cores, root: Path, count: int) -> np.ndarray:
    """The first raw images of the file's dataset, read through the dataset class under ``root``."""
    import mpsdata

    settings = cores.settings
    name = settings["dataset"]
    cls = getattr(mpsdata, name, None)
    if cls is None:
        raise ValueError(f"unknown dataset {name!r} in {cores.path}")
    if settings.get("codec") == "shared":
        options = {"codec": "shared", "bytes_ratio": settings["bytes_ratio"]}
    else:
        keys = ("ratio", "bytes_ratio", "bond_dims", "max_bond", "tol", "residual", "site_dims", "channel_mode")
        options = {k: settings.get(k) for k in keys}
        options.update({k: settings[k] for k in ("domain", "colour", "luma_share") if k in settings})
        options["core_dtype"] = settings["core_dtype"]
    options["compression"] = settings.get("compression", "none")
    options["archive_dir"] = cores.path.parent
    if name in ("MPSImageFolder", "MPSImageNet"):
        options["image_size"] = settings["image_shape"][-1]
    split = settings["split"]
    if name == "MPSImageFolder":
        ds = cls(root, **options)
    elif name == "MPSImageNet":
        ds = cls(root, split=split, **options)
    else:
        ds = cls(root, train=split == "train", **options)
    if not ds._raw_exists():
        raise ValueError(f"--root {root} holds no raw data for {name}; give the root the file was built from")
    images, _ = next(ds._source().batches(count))
    return images[:count].numpy()


if __name__ == "__main__":
    sys.exit(main())
