"""The accuracy benchmark on a GPU: CIFAR-10/100 (or Fashion-MNIST) with ResNet18, VGG16 and MobileNetV2.

The same arms as ``benchmarks/accuracy.py`` (the same :class:`accuracy.Builder` makes and caches every training
set), trained with the paper's recipe or a faster one, tested on the ORIGINAL test set with the model after its
last epoch (no checkpoint is chosen on the test set). One command per dataset and recipe::

    python benchmarks/accuracy_gpu.py --dataset cifar10 --root /data --recipe fast \\
        --out benchmarks/results/accuracy_gpu-cifar10-fast.json
    python benchmarks/accuracy_gpu.py --dataset cifar100 --root /data --recipe paper \\
        --out benchmarks/results/accuracy_gpu-cifar100-paper.json
    python benchmarks/accuracy_gpu.py --dataset fashion --root ../shared/datasets/fashion-mnist --recipe paper

``--root`` is torchvision's root for CIFAR (``root/cifar-10-batches-py``; ``--download`` fetches it) and the
folder of the four idx ``.gz`` files for Fashion-MNIST. Resumable: finished runs are kept in the JSON and skipped;
training sets and MPS core files are cached under ``--cache``. ``--report FILE`` prints the tables.

Recipes (``RECIPES``), the same for every arm:

* ``paper``: SGD with momentum 0.9, weight decay 5e-4, learning rate 0.1, batch 128, 180 epochs (the paper's
  lr, batch and epochs; momentum, weight decay, the cosine decay to zero and the augmentation are the usual
  CIFAR defaults, which the paper calls "default hyper-parameters" without listing them);
* ``fast``: the same with 30 epochs.

Augmentation: random crop with 4 pixels of zero padding and horizontal flip, on the GPU. Fashion-MNIST images
are padded with 2 zero pixels per side to 32x32 (VGG16's five poolings need 32). bf16 autocast and channels-last
on CUDA. Models are the CIFAR variants (3x3 stem, no initial pooling): ResNet18 (11.2 M parameters for 10
classes), VGG16 with batch norm (14.7 M), MobileNetV2 (2.3 M, first strides 1).

"mpsdata best" is chosen per ratio on a validation split of the training set (5,000 original training images
held out, the candidates trained on the rest with ``--select-arch`` and ``--select-recipe``, seed 0); the test set
plays no part. MPS site layouts: CIFAR row-major ``[4, 4, 4, 4, 4]`` and hierarchical ``[(2, 2)] * 5`` per colour
channel (``channel_mode="separate"``), each with one term and ``residual=1``, and the two-site ``[32, 32]``
(``svd-layout``: the truncated SVD of each channel in float16 cores); Fashion-MNIST as the CPU protocol.

This script has not been run at scale: the project's machines had no GPU. ``tests/test_accuracy_harness.py``
runs it on CPU for one tiny step per arm on fake CIFAR files (``--device cpu --max-steps 1``; marked slow, about
a minute on the shared 2-core machine), the smoke path that shows it works without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy
from accuracy import Arm, Builder, DataSpec, Results

import mpsdata

__all__ = ["ARCHS", "RECIPES", "Recipe", "augment", "build_model", "load_dataset", "main", "train_gpu"]

ARCHS = ("resnet18", "vgg16", "mobilenetv2")
CIFAR_SITES_ROW = [4, 4, 4, 4, 4]
CIFAR_SITES_HIER = [(2, 2)] * 5
CIFAR_MPS_CONFIGS: dict[str, dict[str, Any]] = {
    "row": {"site_dims": CIFAR_SITES_ROW, "residual": 0},
    "row+res1": {"site_dims": CIFAR_SITES_ROW, "residual": 1},
    "hier": {"site_dims": CIFAR_SITES_HIER, "residual": 0},
    "hier+res1": {"site_dims": CIFAR_SITES_HIER, "residual": 1},
    "svd-layout": {"site_dims": [32, 32], "residual": 0},
}
#: Normalisation (mean, std) per channel: the usual constants of each training set.
NORMALIZE = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion": ((0.2860,), (0.3530,)),
}
#: The paper's numbers (%): Table 1 rows (ResNet18) and Table 2 (rho = 0.7) for the other architectures.
PAPER = {
    "cifar10": {
        "resnet18": {
            0.4: {"ice+dct": 89.49, "random": 91.67, "k-center": 77.42, "svd": 87.92, "cp": 83.94, "ours": 92.16},
            0.7: {"ice+dct": 91.67, "random": 92.27, "k-center": 79.93, "svd": 90.47, "cp": 87.21, "ours": 93.32},
            "whole": 94.81,
        },
        "vgg16": {0.7: {"ice+dct": 88.07, "ours": 92.21}},
        "mobilenetv2": {0.7: {"ice+dct": 85.91, "ours": 89.56}},
    },
    "cifar100": {
        "resnet18": {
            0.4: {"ice+dct": 60.89, "random": 62.15, "k-center": 47.63, "svd": 57.30, "cp": 51.77, "ours": 64.03},
            0.7: {"ice+dct": 64.06, "random": 68.76, "k-center": 54.27, "svd": 62.14, "cp": 54.24, "ours": 70.29},
            "whole": 76.48,
        },
        "vgg16": {0.7: {"ice+dct": 60.80, "ours": 67.71}},
        "mobilenetv2": {0.7: {"ice+dct": 61.05, "ours": 66.39}},
    },
    "fashion": {
        "resnet18": accuracy.PAPER_TABLE1,
        "vgg16": {0.7: {"ice+dct": 92.37, "ours": 93.21}},
        "mobilenetv2": {0.7: {"ice+dct": 92.73, "ours": 93.93}},
    },
}


@dataclass(frozen=True)
class Recipe:
    """One training recipe: SGD with momentum, cosine decay to zero over all steps, crop + flip augmentation."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


RECIPES = {"paper": Recipe(epochs=180), "fast": Recipe(epochs=30)}


# ---------------------------------------------------------------------------------------------------------
# Models (CIFAR variants)
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 32x32 inputs (He et al. 2016; 3x3 stem, no max pooling)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class VGG16(nn.Module):
    """VGG16 with batch norm for 32x32 inputs (Simonyan & Zisserman 2015): 13 conv layers, one linear layer."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_shortcut = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (Sandler et al. 2018): stem stride 1 and the second stage at stride 1."""

    # (expansion, channels, blocks, first stride)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for expansion, cout, blocks, stride in self.CFG:
            for i in range(blocks):
                layers.append(InvertedResidual(cin, cout, expansion, stride if i == 0 else 1))
                cin = cout
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build_model(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """A fresh CIFAR-variant network: ``"resnet18"``, ``"vgg16"`` or ``"mobilenetv2"``."""
    models = {"resnet18": ResNet18, "vgg16": VGG16, "mobilenetv2": MobileNetV2}
    if arch not in models:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return models[arch](in_channels, num_classes)


# ---------------------------------------------------------------------------------------------------------
# Training
def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (``pad`` zero pixels per side) and horizontal flip of a uint8 batch ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _prepare(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> normalised float, zero-padded (as pixels) to ``size`` x ``size``."""
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return (x.float().div_(255) - mean) / std


def _autocast(amp: bool):
    """bf16 autocast on CUDA; nothing elsewhere (``torch.autocast("cuda")`` warns on a machine without CUDA)."""
    return torch.autocast("cuda", torch.bfloat16) if amp else contextlib.nullcontext()


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep, amp: bool) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), 1000):
        with _autocast(amp):
            logits = model(prep(x[start : start + 1000]))
        correct += int((logits.argmax(1) == y[start : start + 1000]).sum())
    return correct / max(1, len(x))


def train_gpu(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    arch: str,
    recipe: Recipe,
    seed: int,
    normalize: tuple[Sequence[float], Sequence[float]],
    num_classes: int,
    device: str | torch.device = "cuda",
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train a fresh network with ``recipe`` on uint8 images and test the model after the last epoch.

    Args:
        train_x: uint8 ``(N, C, H, W)`` training images (any method's output).
        train_y: int64 ``(N,)``.
        test_x: uint8 original test images.
        test_y: int64 test labels.
        arch: ``"resnet18"``, ``"vgg16"`` or ``"mobilenetv2"``.
        recipe: The recipe.
        seed: Seeds the initialisation, the batch order and the augmentation.
        normalize: Per-channel (mean, std) on the [0, 1] scale.
        num_classes: Number of classes.
        device: Where to train; the whole dataset is kept there as uint8.
        max_steps: Stop after this many steps (smoke tests); ``None`` trains every epoch.

    Returns:
        ``test_acc``, ``train_loss_last_epoch``, ``train_acc_last_epoch``, ``steps``, ``epoch_times``,
        ``train_time``, ``params`` and the recipe.
    """
    device = torch.device(device)
    amp = device.type == "cuda"
    if amp:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    model = build_model(arch, train_x.shape[1], num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_x) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    mean = torch.tensor(normalize[0], device=device).view(1, -1, 1, 1)
    std = torch.tensor(normalize[1], device=device).view(1, -1, 1, 1)
    size = max(32, train_x.shape[-1])

    def prep(x: torch.Tensor) -> torch.Tensor:
        return _prepare(x, mean, std, size).contiguous(memory_format=torch.channels_last)

    xs, ys = train_x.to(device), train_y.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    steps, epoch_times, loss_sum, correct, seen = 0, [], 0.0, 0, 0
    for _ in range(recipe.epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(xs), generator=order_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        for first in range(0, len(order), recipe.batch_size):
            idx = order[first : first + recipe.batch_size]
            x = prep(augment(xs[idx], generator))
            y = ys[idx]
            with _autocast(amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if amp:
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - start)
        if max_steps is not None and steps >= max_steps:
            break
    test_acc = _evaluate(model, test_x.to(device), test_y.to(device), prep, amp)
    return {
        "test_acc": test_acc,
        "train_loss_last_epoch": float(loss_sum) / max(1, seen),
        "train_acc_last_epoch": float(correct) / max(1, seen),
        "steps": steps,
        "epoch_times": epoch_times,
        "train_time": sum(epoch_times),
        "params": sum(p.numel() for p in model.parameters()),
        "recipe": {**asdict(recipe), "arch": arch, "seed": seed, "train_images": len(train_x), "device": str(device)},
    }


# ---------------------------------------------------------------------------------------------------------
# Data
def load_dataset(
    name: str, root: Path, cache: Path, download: bool = False
) -> tuple[DataSpec, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(spec, train_x, train_y, test_x, test_y)``: uint8 ``(N, C, H, W)`` images, int64 labels."""
    if name == "fashion":
        train_x, train_y, test_x, test_y = accuracy.load_fashion(root)
        return accuracy.fashion_spec(accuracy.fashion_root(root, cache / "root")), train_x, train_y, test_x, test_y
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"dataset must be 'cifar10', 'cifar100' or 'fashion', got {name!r}")
    tv_cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    mps_cls = mpsdata.MPSCIFAR10 if name == "cifar10" else mpsdata.MPSCIFAR100
    splits = []
    for train in (True, False):
        raw = tv_cls(str(root), train=train, download=download)
        images = torch.from_numpy(np.ascontiguousarray(raw.data.transpose(0, 3, 1, 2)))
        splits += [images, torch.as_tensor(raw.targets, dtype=torch.int64)]
    spec = DataSpec(name, mps_cls, Path(root), CIFAR_MPS_CONFIGS, CIFAR_SITES_HIER, {"channel_mode": "separate"})
    return (spec, *splits)


# ---------------------------------------------------------------------------------------------------------
# The GPU protocol
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("cifar10", "cifar100", "fashion"), default="cifar10")
    parser.add_argument("--root", type=Path, default=None, help="torchvision root (CIFAR) or idx folder (fashion)")
    parser.add_argument("--download", action="store_true", help="download CIFAR through torchvision")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mpsdata_accuracy_gpu"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="fast")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+", default=list(accuracy.RATIOS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["whole", "ice+dct", "random", "k-center", "svd", "cp", "mps", "webp", "jpeg", "downsample"],
        help="arms to run (mps = every configuration; webp/jpeg/downsample/random also at equal bytes)",
    )
    parser.add_argument("--select-arch", choices=ARCHS, default="resnet18")
    parser.add_argument("--select-recipe", choices=sorted(RECIPES), default="fast")
    parser.add_argument("--val-count", type=int, default=5000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images (smoke tests)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test images (smoke tests)")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per run (smoke tests)")
    parser.add_argument("--report", type=Path, default=None, help="print the tables of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.report is not None:
        results = json.loads(args.report.read_text())
        dataset = results["config"]["dataset"]
        for arch in results["config"]["archs"]:
            print(accuracy.markdown(results, arch=arch, paper=PAPER.get(dataset, {}).get(arch, {}), other_archs=()))
        return
    if args.root is None:
        parser.error("give --root")
    recipe = RECIPES[args.recipe]
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    recipe = Recipe(**{**asdict(recipe), **overrides})
    select_recipe = Recipe(**{**asdict(RECIPES[args.select_recipe]), **overrides})
    out = args.out or Path(__file__).parent / "results" / f"accuracy_gpu-{args.dataset}-{args.recipe}.json"
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:7.0f} s] {msg}", flush=True)

    spec, train_x, train_y, test_x, test_y = load_dataset(args.dataset, args.root, args.cache, args.download)
    if args.train_limit is not None:
        train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]
    if args.test_limit is not None:
        test_x, test_y = test_x[: args.test_limit], test_y[: args.test_limit]
    num_classes = 100 if args.dataset == "cifar100" else 10
    normalize = NORMALIZE[args.dataset]
    methods = set(args.methods)
    config = {
        "dataset": args.dataset,
        "train_images": len(train_x),
        "test_images": len(test_x),
        "recipe": asdict(recipe),
        "recipe_name": args.recipe,
        "select": {"arch": args.select_arch, "recipe": asdict(select_recipe), "val_count": args.val_count},
        "archs": args.archs,
        "seeds": args.seeds,
        "ratios": args.ratios,
        "methods": sorted(methods),
        "max_steps": args.max_steps,
        "mps_configs": {
            k: {
                "site_dims": [list(d) if isinstance(d, tuple) else d for d in v["site_dims"]],
                "residual": v["residual"],
            }
            for k, v in spec.mps_configs.items()
        },
        "mps_bytes_per_param": accuracy.MPS_BYTES_PER_PARAM,
    }
    results = Results(out, config)
    results.data["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
    }
    builder = Builder(
        spec,
        train_x,
        train_y,
        args.cache / "arrays",
        log,
        kcenter_fraction=max(args.ratios),
        kcenter_device=args.device,
    )

    def run(arm: Arm, arch: str, seed: int) -> None:
        key = f"{arm.name}|{arch}|seed={seed}"
        ts = builder.training_set(arm, seed)
        results.data["data"].setdefault(arm.name, {**ts.info, "method": arm.method, "axis": arm.axis})
        if key in results.data["runs"]:
            return
        res = train_gpu(
            ts.images, ts.targets, test_x, test_y, arch=arch, recipe=recipe, seed=seed, normalize=normalize,
            num_classes=num_classes, device=args.device, max_steps=args.max_steps,
        )  # fmt: skip
        res.update(arm=arm.name, arch=arch, seed=seed)
        results.data["runs"][key] = res
        results.save()
        log(f"{key}: test acc {100 * res['test_acc']:.2f} % ({res['train_time']:.0f} s)")

    arms = [Arm("whole")] if "whole" in methods else []
    for ratio in args.ratios:
        arms += [Arm(m, ratio) for m in ("ice+dct", "random", "k-center", "svd", "cp") if m in methods]
        if "mps" in methods:
            arms += [Arm("mps", ratio, config=c) for c in spec.mps_configs]
    for arm in arms:
        if arm.method not in ("whole", "random"):
            builder.training_set(arm)
    if "mps" in methods:
        fit_idx, val_idx = accuracy.validation_split(len(train_x), min(args.val_count, len(train_x) // 10 or 1))
        for ratio in args.ratios:
            scores, nbytes = {}, {}
            for name in spec.mps_configs:
                ts = builder.training_set(Arm("mps", ratio, config=name))
                nbytes[name] = ts.info["bytes_ratio"]
                key = f"select mps {name} rho={ratio:g}|{args.select_arch}|seed=0"
                if key not in results.data["select_runs"]:
                    res = train_gpu(
                        ts.images[fit_idx], ts.targets[fit_idx], train_x[val_idx], train_y[val_idx],
                        arch=args.select_arch, recipe=select_recipe, seed=0, normalize=normalize,
                        num_classes=num_classes, device=args.device, max_steps=args.max_steps,
                    )  # fmt: skip
                    results.data["select_runs"][key] = {"val_acc": res["test_acc"], "train_time": res["train_time"]}
                    results.save()
                scores[name] = [results.data["select_runs"][key]["val_acc"]]
            ranking = accuracy.select_best(scores, nbytes)
            results.data["selection"][f"{ratio:g}"] = {
                "scores": scores, "ranking": ranking, "best": ranking[0], "bytes_budget": nbytes[ranking[0]],
            }  # fmt: skip
            results.save()
            log(f"rho={ratio:g}: mpsdata best = {ranking[0]}")
            b = nbytes[ranking[0]]
            arms += [Arm(m, bytes_ratio=b, axis="bytes") for m in ("webp", "jpeg") if m in methods]
            if b < 1:
                arms += [Arm(m, bytes_ratio=b, axis="bytes") for m in ("downsample", "random") if m in methods]
    for seed in args.seeds:
        for arch in args.archs:
            for arm in arms:
                run(arm, arch, seed)
    results.data["summary"] = accuracy.summarize(results.data["runs"])
    results.data["seconds_this_invocation"] = time.perf_counter() - began
    results.save()
    for arch in args.archs:
        print(accuracy.markdown(results.data, arch=arch, paper=PAPER[args.dataset].get(arch, {}), other_archs=()))
    log(f"done: {out}")


if __name__ == "__main__":
    main()
