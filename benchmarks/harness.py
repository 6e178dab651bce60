"""One fixed training recipe for the accuracy benchmarks: train a fresh small network, evaluate the last epoch.

Every arm of every accuracy benchmark goes through :func:`train_and_evaluate`, so that arms differ only in
their training images. The recipe (stated in every benchmark's docs):

* architectures: ``"cnn"`` (two 3x3 conv blocks 1->8->16 channels with batch norm, ReLU and 2x2 max pooling,
  then 64 hidden units and dropout 0.2, 52k parameters on 28x28) and ``"mlp"`` (flatten, 256 and 128 hidden
  units with ReLU, 235k parameters on 28x28), a genuinely different inductive bias for cross-architecture arms;
* inputs: uint8 images divided by 255 (float images are taken as already in [0, 1]), then standardised by a
  fixed mean and std (Fashion-MNIST's training set: 0.2860, 0.3530) inside the model, so a model takes images
  in [0, 1] as the distillation code does;
* Adam, learning rate 1e-3 with a cosine decay to zero over all steps, batch 128, no weight decay, no
  augmentation, a fresh shuffle per epoch from a generator seeded by ``seed``; ``torch.manual_seed(seed)``
  before the network is built;
* the model after the last epoch is evaluated on the test set; nothing is selected on the test set.

Example:
    >>> import torch
    >>> x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    >>> y = torch.randint(0, 10, (64,))
    >>> result = train_and_evaluate(x, y, x, y, arch="mlp", epochs=1, seed=0)
    >>> 0.0 <= result["test_acc"] <= 1.0
    True
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "FASHION_MEAN", "FASHION_STD", "build_model", "evaluate", "to_unit", "train_and_evaluate"]

FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
ARCHS = ("cnn", "mlp")


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed constants, the first layer of every model."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


def build_model(
    arch: str,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    mean: float = FASHION_MEAN,
    std: float = FASHION_STD,
) -> nn.Module:
    """A fresh network of the recipe, taking float images in [0, 1] of shape ``(B, *image_shape)``.

    Args:
        arch: ``"cnn"`` or ``"mlp"``.
        image_shape: ``(C, H, W)`` of the inputs.
        num_classes: Number of logits.
        mean: Standardisation mean applied inside the model.
        std: Standardisation std applied inside the model.
    """
    channels, height, width = image_shape
    if arch == "cnn":
        body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (height // 4) * (width // 4), 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(64, num_classes),
        )
    elif arch == "mlp":
        body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return nn.Sequential(Standardize(mean, std), body)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """float32 images in [0, 1] ``(B, C, H, W)``: uint8 is divided by 255, ``(B, H, W)`` gains a channel."""
    if images.dim() == 3:
        images = images[:, None]
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (set to eval mode) on images (uint8 or float in [0, 1])."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_unit(images[start : start + batch_size]).to(device)
        pred = model(x).argmax(1).cpu()
        correct += int((pred == targets[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def train_and_evaluate(
    train_images: torch.Tensor,
    train_targets: torch.Tensor,
    test_images: torch.Tensor,
    test_targets: torch.Tensor,
    *,
    arch: str = "cnn",
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    num_threads: int = 1,
    return_model: bool = False,
) -> dict[str, Any]:
    """Train a fresh network of the recipe and evaluate the model after its last epoch.

    Args:
        train_images: ``(N, C, H, W)`` or ``(N, H, W)``, uint8 or float in [0, 1].
        train_targets: ``(N,)`` class indices.
        test_images: Test images, same conventions.
        test_targets: ``(M,)`` class indices.
        arch: ``"cnn"`` or ``"mlp"`` (see the module docstring).
        epochs: Passes over the training images.
        seed: Seeds the network's initialisation, dropout and the shuffles.
        batch_size: Images per step.
        lr: Peak Adam learning rate (cosine decay to zero over all steps).
        device: Where to train.
        num_threads: torch CPU threads. One by default: on the shared 2-core machine two threads made an epoch
            ten times slower than one (OpenMP threads spin while the cores are busy with other jobs).
        return_model: Put the trained model (eval mode) under ``"model"`` in the result.

    Returns:
        ``test_acc``, ``train_acc_last_epoch`` (running accuracy over the last epoch, dropout on),
        ``train_loss_last_epoch``, ``train_time`` (s), ``epoch_times`` (s), ``params`` and the recipe.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if len(train_images) != len(train_targets) or len(test_images) != len(test_targets):
        raise ValueError(
            f"images and targets must have the same length, got {len(train_images)} and {len(train_targets)} "
            f"(train), {len(test_images)} and {len(test_targets)} (test)"
        )
    torch.set_num_threads(num_threads)
    device = torch.device(device)
    train_targets = torch.as_tensor(train_targets, dtype=torch.int64)
    test_targets = torch.as_tensor(test_targets, dtype=torch.int64)
    shape = tuple(to_unit(train_images[:1]).shape[1:])
    num_classes = int(max(int(train_targets.max()), int(test_targets.max()))) + 1
    num_classes = max(num_classes, 10)
    torch.manual_seed(seed)
    model = build_model(arch, shape, num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1 + math.cos(math.pi * min(step, epochs * steps_per_epoch) / (epochs * steps_per_epoch))),
    )
    generator = torch.Generator().manual_seed(seed)
    epoch_times = []
    loss_sum = correct = seen = 0
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(train_images), generator=generator)
        loss_sum = correct = seen = 0
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]
            x = to_unit(train_images[idx]).to(device, non_blocking=True)
            y = train_targets[idx].to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        epoch_times.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "test_acc": evaluate(model, test_images, test_targets),
        "train_acc_last_epoch": correct / max(1, seen),
        "train_loss_last_epoch": loss_sum / max(1, seen),
        "train_time": sum(epoch_times),
        "epoch_times": epoch_times,
        "params": sum(p.numel() for p in model.parameters()),
        "recipe": {
            "arch": arch,
            "epochs": epochs,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": "adam, cosine to 0",
            "train_images": len(train_images),
        },
    }
    if return_model:
        result["model"] = model.eval()
    return result
