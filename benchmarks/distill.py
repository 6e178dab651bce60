"""Does the paper's task-specific residual bias (Section 4.2, Eq. 6) help a fresh network trained on MPS data?

Run (full, about an hour on 2 shared cores; resumable: finished arms are kept in the JSON and skipped):
    python benchmarks/distill.py --fashion ../shared/datasets/fashion-mnist --root /tmp/distill_bench \
        --out benchmarks/results/distill.json
Quick check (a 5,000-image subset, 1 seed, 1 epoch, a few minutes):
    python benchmarks/distill.py --fashion ../shared/datasets/fashion-mnist --root /tmp/distill_quick --quick \
        --out benchmarks/results/distill-quick.json

Recipe (every arm, benchmarks/harness.py): a fresh network, Adam 1e-3 with cosine decay, batch 128, ``--epochs``
epochs, no augmentation, the model after the last epoch evaluated on the real test set (10,000 original
images); nothing is chosen on the test set. Per seed ``s``:

1. MPSFashionMNIST core files at ratio 0.4 and 0.7 (float16 cores; ``--layout hierarchical``: sites
   ``[(7, 7), (2, 2), (2, 2)]``, the package default when the table in docs/distill.md was recorded, or
   ``--layout default``: whatever the package default is now) are built once under ``--root`` from the raw files.
2. A teacher CNN is trained on the whole original training set with seed ``100 + s`` (not the students' seed).
3. Its outputs on the original training images are computed once; then a bias is learned on each core file by
   ``mpsdata.distill.fit`` (KL at temperature 4, ``--bias-epochs`` epochs, batch 256, SparseAdam with a cosine
   decay): a dense float16 bias (the paper, peak lr 0.02) and a compact one, rank 2 with int8 storage (peak lr
   0.03). Each learning rate is the one of a small grid with the lowest training distillation loss (relative to
   the zero bias, averaged over both ratios) on the first 10,000 training images, with the seed-0 teacher;
   test data played no part (docs/distill.md).
4. Each bias is saved into a copy of the core file (``distill.save_bias``), read back (``distill.load_bias``)
   and applied to the decoded uint8 images (``apply_uint8``): the students see exactly what a dataset with
   ``bias=True`` serves. The parameter ratio counts cores plus bias parameters; the bytes ratio is the size of
   the core file holding the bias over the raw uint8 bytes.
5. Students with seed ``s``: CNN on whole, MPS, MPS + dense bias, MPS + compact bias at both ratios; an MLP
   (another architecture) on whole, MPS, and MPS + the biases learned with the CNN teacher (cross-architecture).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

import mpsdata
from mpsdata import distill

RATIOS = (0.4, 0.7)
#: Site layouts: pinned, so that a recorded table does not move when the package default changes. The
#: hierarchical one was the package default when docs/distill.md was recorded; "default" follows the package.
LAYOUTS = {"hierarchical": [(7, 7), (2, 2), (2, 2)], "default": None}
BIASES = {
    "dense": {"form": "dense", "rank": None, "dtype": "float16", "lr": 0.02},
    "lowrank2-int8": {"form": "lowrank", "rank": 2, "dtype": "int8", "lr": 0.03},
}
TEACHER_SEED_OFFSET = 100
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array).tobytes())


def prepare_root(fashion: Path, root: Path, count: int | None) -> None:
    """Raw files under ``root/FashionMNIST/raw``: copies, or the first ``count`` training images (quick mode)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        target = raw / name
        if target.exists():
            continue
        if count is not None and key.startswith("train"):
            write_idx(target, read_idx(fashion / name)[:count])
        else:
            shutil.copyfile(fashion / name, target)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


class Results:
    """Arms already measured, kept in the output JSON so that a rerun skips them."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"config": config, "arms": {}, "biases": {}, "teachers": {}}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("config") == config:
                self.data = old
            else:
                print(f"{path} holds another configuration; starting afresh", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", type=Path, default=os.environ.get("MPSDATA_FASHION_MNIST"))
    parser.add_argument("--root", type=Path, required=True, help="where core files and teachers are kept")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="5,000 training images, 1 seed, 1 epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="student and teacher epochs (default 3)")
    parser.add_argument("--bias-epochs", type=int, default=None, help="bias epochs (default 3)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="hierarchical", help="MPS site layout")
    args = parser.parse_args()
    if args.fashion is None:
        parser.error("give --fashion or set MPSDATA_FASHION_MNIST")
    count = 5000 if args.quick else None
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs or (1 if args.quick else 3)
    bias_epochs = args.bias_epochs or (1 if args.quick else 3)
    torch.set_num_threads(1)  # see harness.train_and_evaluate: one thread is far faster on the shared cores

    prepare_root(args.fashion, args.root, count)
    raw = args.root / "FashionMNIST" / "raw"
    train_x = torch.from_numpy(read_idx(raw / FILES["train_images"]).copy())[:, None]
    train_y = torch.from_numpy(read_idx(raw / FILES["train_labels"]).astype(np.int64))
    test_x = torch.from_numpy(read_idx(raw / FILES["test_images"]).copy())[:, None]
    test_y = torch.from_numpy(read_idx(raw / FILES["test_labels"]).astype(np.int64))
    config = {
        "train_images": len(train_x),
        "test_images": len(test_x),
        "seeds": seeds,
        "epochs": epochs,
        "bias_epochs": bias_epochs,
        "biases": BIASES,
        "ratios": list(RATIOS),
        "teacher_seed_offset": TEACHER_SEED_OFFSET,
        "layout": args.layout,
    }
    results = Results(args.out, config)
    results.data["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "threads": 1}
    raw_bytes = len(train_x) * 28 * 28

    datasets = {}
    for ratio in RATIOS:
        ds = mpsdata.MPSFashionMNIST(args.root, train=True, ratio=ratio, site_dims=LAYOUTS[args.layout])
        datasets[ratio] = ds
        key = f"rho={ratio}"
        results.data.setdefault("mps", {})[key] = {
            "layout": ds._cores.settings["layout"],
            "bond_dims": ds._cores.geometry.bond_dims,
            "ratio": ds.ratio,
            "bytes_ratio": ds.bytes_ratio,
            "psnr": ds.psnr,
            "archive": str(ds.archive),
        }
    mps_images = {ratio: ds.decode_batch(np.arange(len(ds))) for ratio, ds in datasets.items()}
    results.save()

    def arm(name: str, images: torch.Tensor, arch: str, seed: int, extra: dict[str, Any]) -> None:
        key = f"{name}|{arch}|seed={seed}"
        if key in results.data["arms"]:
            results.data["arms"][key].update(extra)  # budgets are re-read from the files on every run
            return
        began = time.perf_counter()
        out = harness.train_and_evaluate(images, train_y, test_x, test_y, arch=arch, epochs=epochs, seed=seed)
        out.update(extra, data=name, arch=arch, seed=seed)
        results.data["arms"][key] = out
        results.save()
        print(f"{key}: test acc {out['test_acc']:.4f} ({time.perf_counter() - began:.0f} s)", flush=True)

    work = args.root / "distill-work"  # teachers (any layout); biases and their core files per layout below
    (work / args.layout).mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        # Students that need no teacher first: whole and MPS data.
        for arch in harness.ARCHS:
            arm("whole", train_x, arch, seed, {"ratio": 1.0, "bytes_ratio": 1.0})
            for ratio in RATIOS:
                info = results.data["mps"][f"rho={ratio}"]
                arm(f"mps rho={ratio}", mps_images[ratio], arch, seed, {k: info[k] for k in ("ratio", "bytes_ratio")})

        teacher_path = work / f"teacher-seed{seed}.pt"
        teacher = harness.build_model("cnn")
        if teacher_path.exists() and f"seed={seed}" in results.data["teachers"]:
            teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
        else:
            out = harness.train_and_evaluate(
                train_x, train_y, test_x, test_y, arch="cnn", epochs=epochs,
                seed=TEACHER_SEED_OFFSET + seed, return_model=True,
            )  # fmt: skip
            teacher = out.pop("model")
            torch.save(teacher.state_dict(), teacher_path)
            results.data["teachers"][f"seed={seed}"] = out
            results.save()
            print(f"teacher seed {TEACHER_SEED_OFFSET + seed}: test acc {out['test_acc']:.4f}", flush=True)
        teacher.eval()
        logits = distill.teacher_logits(teacher, train_x)  # once per teacher: the originals are not needed again

        for ratio in RATIOS:
            ds = datasets[ratio]
            for bias_name, spec in BIASES.items():
                tag = f"mps+{bias_name} rho={ratio}"
                bias_key = f"{tag}|seed={seed}"
                core_copy = work / args.layout / f"seed{seed}-rho{ratio}-{bias_name}.h5"
                if bias_key not in results.data["biases"] or not core_copy.exists():
                    began = time.perf_counter()
                    ckpt = work / args.layout / f"{bias_key.replace('|', '-').replace(' ', '_')}.ckpt"
                    bias = distill.fit(
                        ds, teacher, form=spec["form"], rank=spec["rank"], dtype=spec["dtype"], lr=spec["lr"],
                        epochs=bias_epochs, batch_size=256, loss="kl", temperature=4.0,
                        teacher_outputs=logits, seed=seed,
                        checkpoint=ckpt, progress=False,
                    )  # fmt: skip
                    fit_seconds = time.perf_counter() - began
                    shutil.copyfile(ds.archive, core_copy)
                    distill.save_bias(bias, core_copy)
                    ckpt.unlink()  # dense checkpoints hold the bias and Adam's moments: 0.6 GB each
                    results.data["biases"][bias_key] = {"fit_seconds": fit_seconds, "log": bias.fit_log}
                loaded = distill.load_bias(core_copy)
                assert loaded is not None
                served = loaded.apply_uint8(mps_images[ratio], torch.arange(len(ds)))
                with torch.no_grad():
                    on_mps = teacher(mps_images[ratio].float() / 255)
                    on_served = teacher(served.float() / 255)
                info = distill.bias_info(core_copy)
                assert info is not None
                stats = {
                    "ratio": results.data["mps"][f"rho={ratio}"]["ratio"] + info["ratio"],
                    "bytes_ratio": core_copy.stat().st_size / raw_bytes,
                    "bias_ratio": info["ratio"],
                    "bias_bytes_ratio": info["bias_file_bytes"] / raw_bytes,
                    "psnr_mps": psnr(mps_images[ratio], train_x),
                    "psnr_served": psnr(served, train_x),
                    "teacher_kl_mps": float(distill.distill_loss(on_mps, logits)),
                    "teacher_kl_served": float(distill.distill_loss(on_served, logits)),
                    "teacher_agree_mps": float((on_mps.argmax(1) == logits.argmax(1)).double().mean()),
                    "teacher_agree_served": float((on_served.argmax(1) == logits.argmax(1)).double().mean()),
                }
                results.data["biases"][bias_key].update(stats)
                results.save()
                print(
                    f"{bias_key}: teacher KL {stats['teacher_kl_mps']:.3f} -> {stats['teacher_kl_served']:.3f}, "
                    f"PSNR {stats['psnr_mps']:.2f} -> {stats['psnr_served']:.2f} dB",
                    flush=True,
                )
                for arch in harness.ARCHS:
                    arm(tag, served, arch, seed, {k: stats[k] for k in ("ratio", "bytes_ratio")})
    print(table(results.data))


def _mean_std(values: list[float], sign: bool = False) -> str:
    """Mean ± sample standard deviation of fractions, in percent (points)."""
    values = [100 * v for v in values]
    fmt = "+.2f" if sign else ".2f"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:{fmt}}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:{fmt}} ± {std:.2f}"


def table(data: dict[str, Any]) -> str:
    """Markdown table: test accuracy mean ± sample std over seeds, with the budget of each arm."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for value in data["arms"].values():
        groups.setdefault((value["arch"], value["data"]), []).append(value)
    lines = [
        "| student | training data | param ratio (incl. bias) | bytes ratio (incl. bias) | test acc % "
        "| paired difference to MPS alone (points) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(v["arch"], v["data"], v["seed"]): v for v in data["arms"].values()}
    order = ["whole"] + [
        name for ratio in RATIOS for name in (f"mps rho={ratio}", *(f"mps+{b} rho={ratio}" for b in BIASES))
    ]
    for arch in harness.ARCHS:
        for name in order:
            rows = groups.get((arch, name))
            if not rows:
                continue
            ratio = sum(r["ratio"] for r in rows) / len(rows)
            bytes_ratio = sum(r["bytes_ratio"] for r in rows) / len(rows)
            cross = " (bias from CNN teacher)" if arch != "cnn" and "+" in name else ""
            paired = ""
            if "+" in name:  # same student seed and order, the bias the only change
                base = "mps " + name.split(" ", 1)[1]
                diffs = [
                    r["test_acc"] - by_key[(arch, base, r["seed"])]["test_acc"]
                    for r in rows
                    if (arch, base, r["seed"]) in by_key
                ]
                paired = _mean_std(diffs, sign=True) if diffs else ""
            lines.append(
                f"| {arch} | {name}{cross} | {ratio:.3f} | {bytes_ratio:.3f} | "
                f"{_mean_std([r['test_acc'] for r in rows])} | {paired} | {len(rows)} |"
            )
    teachers = [t["test_acc"] for t in data["teachers"].values()]
    if teachers:
        lines.append(f"\nTeachers (CNN on whole data, seeds 100+s): test acc {_mean_std(teachers)} %.")
    if data["biases"]:
        lines += [
            "",
            "| bias | PSNR of MPS (dB) | PSNR of MPS+bias (dB) | teacher KL, MPS -> +bias "
            "| teacher agreement, MPS -> +bias |",
            "|---|---|---|---|---|",
        ]
        by_tag: dict[str, list[dict[str, Any]]] = {}
        for key, value in data["biases"].items():
            if "psnr_served" in value:
                by_tag.setdefault(key.split("|")[0], []).append(value)
        for tag, rows in by_tag.items():

            def avg(name: str, rows: list[dict[str, Any]] = rows) -> float:
                return sum(r[name] for r in rows) / len(rows)

            lines.append(
                f"| {tag} | {avg('psnr_mps'):.2f} | {avg('psnr_served'):.2f} | "
                f"{avg('teacher_kl_mps'):.3f} -> {avg('teacher_kl_served'):.3f} | "
                f"{100 * avg('teacher_agree_mps'):.2f} -> {100 * avg('teacher_agree_served'):.2f} % |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
