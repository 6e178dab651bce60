"""Task-specific residual bias: the paper's information supplementation (Section 4.2, Eq. 6).

Every training sample ``i`` gets a trainable bias ``S~_i``, initialised to zero, that is added to its decoded
(compressed) image. The bias is learned by knowledge distillation with a fixed network ``f``:

    L_KD = sum_i L( f(MPS_total(S_i) + S~_i), f(S_i) )

so that ``f`` sees on the compressed sample what it sees on the original. (The paper's text writes
``MPS_Total(S~_i) + S~_i``; Eq. 6 shows that the MPS is of the original ``S_i``.) The teacher outputs
``f(S_i)`` are computed once and can be stored, so the originals are not needed afterwards.

The bias lives on the scale of float images in ``[0, 1]`` (decoded uint8 divided by 255). Two forms:

* ``"dense"`` (the paper): one value per pixel and channel, ``C*H*W`` parameters per sample. Stored at float16
  it takes twice the bytes of the raw uint8 image: it undoes the compression, and the budget says so.
* ``"lowrank"``: ``S~_i[c] = U_i[c] @ V_i[c]`` with ``U_i[c]`` of shape ``(H, r)`` and ``V_i[c]`` of shape
  ``(r, W)`` (a two-site MPS of bond ``r``), ``C*r*(H+W)`` parameters per sample: 56 per rank on 28x28, 7% of
  the pixels. ``U`` starts at zero and ``V`` at random values (as LoRA does), so the bias starts at exactly zero
  and still receives gradients.

Storage precision (``dtype``): ``"float16"`` (default), ``"float32"``, or ``"int8"`` with one float32 scale per
sample and factor (symmetric, absolute maximum over the sample). :func:`fit` ends by rounding the parameters to
the storage precision, so the bias it returns is exactly the one :func:`save_bias` stores.

Only the rows of a batch get gradients: with ``sparse=True`` (default) the gradients are sparse (use
``torch.optim.SparseAdam`` or ``SGD``); with ``sparse=False`` they are dense tensors that are zero
outside the batch rows (any optimiser, at the cost of a full-size gradient per step).

Example:
    >>> import torch
    >>> from mpsdata import distill
    >>> bias = distill.ResidualBias(10, (1, 4, 4), form="lowrank", rank=1)
    >>> x = torch.rand(2, 1, 4, 4)
    >>> bool(torch.equal(bias(x, torch.tensor([3, 7])), x))  # zero at the start: the identity
    True
    >>> bias.params_per_sample, bias.nbytes_per_sample
    (8, 16)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import operator
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._archive import FORMAT as _CORE_FORMAT
from ._archive import temporary_path
from ._errors import MPSDataError

__all__ = [
    "BIAS_FORMAT_VERSION",
    "ResidualBias",
    "bias_info",
    "distill_loss",
    "fit",
    "load_bias",
    "remove_bias",
    "save_bias",
    "teacher_logits",
]

BIAS_FORMAT_VERSION = 1
FORMS = ("dense", "lowrank")
STORAGE_DTYPES = ("float16", "float32", "int8")
LOSSES = ("kl", "mse")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks along the sample axis, as the cores
_CHECKPOINT_VERSION = 1

Form = Literal["dense", "lowrank"]
StorageDtype = Literal["float16", "float32", "int8"]
IndexLike = torch.Tensor | np.ndarray | Sequence[int]


# ---------------------------------------------------------------------------------------------------
# The bias
class ResidualBias(nn.Module):
    """One trainable bias per sample, added to decoded images: the paper's ``S~_i`` (Section 4.2).

    Args:
        num_samples: Number of samples ``N`` (one bias each).
        image_shape: ``(C, H, W)`` of the images.
        form: ``"dense"`` (one parameter per pixel value, the paper) or ``"lowrank"`` (``U_i @ V_i`` per channel).
        rank: Rank ``r`` of the low-rank form, ``1 <= r <= min(H, W)``; not allowed with ``"dense"``.
        dtype: Storage precision: ``"float16"``, ``"float32"`` or ``"int8"`` (per-sample scales).
        sparse: Sparse gradients (only the batch rows, for ``SparseAdam`` or ``SGD``); ``False`` gives
            dense gradients, zero outside the batch rows, for any optimiser (a dense optimiser's momentum then
            moves rows between their visits; :func:`fit`'s ``"adam"`` takes sparse gradients either way).
        seed: Seeds the random initial ``V`` of the low-rank form.
        device: Where the parameters live.

    Attributes:
        params_per_sample: Parameters stored per sample.
        nbytes_per_sample: Bytes stored per sample at the storage precision (scales included).
        ratio: ``params_per_sample`` over the values of an image, the bias's share of the paper's ``rho``.
    """

    def __init__(
        self,
        num_samples: int,
        image_shape: Sequence[int],
        *,
        form: Form = "dense",
        rank: int | None = None,
        dtype: StorageDtype = "float16",
        sparse: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        shape = tuple(int(v) for v in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
        channels, height, width = shape
        if form == "dense":
            if rank is not None:
                raise ValueError(f"rank applies to form='lowrank' only, got rank={rank} with form='dense'")
        elif rank is None or isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise ValueError(f"form='lowrank' needs an integer rank between 1 and {min(height, width)}, got {rank!r}")
        elif not 1 <= rank <= min(height, width):
            raise ValueError(f"rank must be between 1 and min(H, W) = {min(height, width)}, got {rank}")
        self.num_samples = int(num_samples)
        self.image_shape: tuple[int, int, int] = (channels, height, width)
        self.form: str = form
        self.rank: int | None = None if rank is None else int(rank)
        self.dtype_name: str = dtype
        self.sparse = bool(sparse)
        self._row_gradients = False  # fit's "adam": sparse gradients whatever ``sparse`` says (not in the config)
        self.meta: dict[str, Any] = {}
        self.fit_log: list[dict[str, Any]] = []
        if form == "dense":
            self.weight = nn.Parameter(torch.zeros(num_samples, channels * height * width, device=device))
        else:
            r = int(rank)  # type: ignore[arg-type]
            generator = torch.Generator().manual_seed(seed)
            v = torch.randn(num_samples, channels * r * width, generator=generator) / math.sqrt(r)
            self.u = nn.Parameter(torch.zeros(num_samples, channels * height * r, device=device))
            self.v = nn.Parameter(v.to(device))

    # -- description ---------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """What is needed to build an empty bias of the same kind (stored in checkpoints)."""
        return {
            "num_samples": self.num_samples,
            "image_shape": list(self.image_shape),
            "form": self.form,
            "rank": self.rank,
            "dtype": self.dtype_name,
            "sparse": self.sparse,
        }

    @property
    def params_per_sample(self) -> int:
        channels, height, width = self.image_shape
        if self.form == "dense":
            return channels * height * width
        return channels * int(self.rank) * (height + width)  # type: ignore[arg-type]

    @property
    def nbytes_per_sample(self) -> int:
        itemsize = np.dtype(self.dtype_name).itemsize
        scales = 4 * len(self._factor_names()) if self.dtype_name == "int8" else 0
        return self.params_per_sample * itemsize + scales

    @property
    def ratio(self) -> float:
        return self.params_per_sample / math.prod(self.image_shape)

    def _factor_names(self) -> tuple[str, ...]:
        return ("weight",) if self.form == "dense" else ("u", "v")

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank is not None else ""
        return (
            f"num_samples={self.num_samples}, image_shape={self.image_shape}, form={self.form!r}{rank}, "
            f"dtype={self.dtype_name!r}, params_per_sample={self.params_per_sample}, "
            f"nbytes_per_sample={self.nbytes_per_sample}"
        )

    # -- values --------------------------------------------------------------------------------------
    def _indices(self, indices: IndexLike, count: int | None = None) -> torch.Tensor:
        """Validated int64 indices in ``[0, N)`` on the parameters' device (negatives count from the end)."""
        if isinstance(indices, torch.Tensor):
            idx = indices
        else:
            array = np.asarray(indices)
            if array.dtype.kind not in "iu" and array.size:
                raise TypeError(f"indices must be integers, got an array of {array.dtype}")
            idx = torch.from_numpy(array.astype(np.int64, copy=False).reshape(array.shape))
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D (one per image), got shape {tuple(idx.shape)}")
        if count is not None and idx.shape[0] != count:
            raise ValueError(f"got {idx.shape[0]} indices for a batch of {count} images; give one index per image")
        if idx.numel():
            low, high = int(idx.min()), int(idx.max())
            if low < -self.num_samples or high >= self.num_samples:
                raise IndexError(
                    f"indices must be in [-{self.num_samples}, {self.num_samples}) for a bias of "
                    f"{self.num_samples} samples, got values in [{low}, {high}]"
                )
        device = self._param_device()
        return idx.to(device=device, dtype=torch.int64).remainder(self.num_samples)

    def _param_device(self) -> torch.device:
        return (self.weight if self.form == "dense" else self.u).device

    def values(self, indices: IndexLike) -> torch.Tensor:
        """The biases of some samples, float32 ``(len(indices), C, H, W)`` on the image scale ``[0, 1]``."""
        idx = self._indices(indices)
        channels, height, width = self.image_shape
        sparse = self.sparse or self._row_gradients
        if self.form == "dense":
            return F.embedding(idx, self.weight, sparse=sparse).view(-1, channels, height, width)
        r = int(self.rank)  # type: ignore[arg-type]
        u = F.embedding(idx, self.u, sparse=sparse).view(-1, channels, height, r)
        v = F.embedding(idx, self.v, sparse=sparse).view(-1, channels, r, width)
        return u @ v

    def _check_images(self, images: torch.Tensor, *, floating: bool) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if floating and not images.dtype.is_floating_point:
            raise TypeError(
                f"images must be floating point in [0, 1], got {images.dtype}; "
                "divide uint8 images by 255, or use apply_uint8"
            )
        if not floating and images.dtype != torch.uint8:
            raise TypeError(f"apply_uint8 takes uint8 images, got {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must have shape (B, {', '.join(map(str, self.image_shape))}) to match the bias, "
                f"got {tuple(images.shape)}"
            )

    def forward(self, images: torch.Tensor, indices: IndexLike, *, quantize: bool = False) -> torch.Tensor:
        """``images + S~[indices]``.

        Args:
            images: float ``(B, C, H, W)`` on the scale ``[0, 1]`` (decoded uint8 / 255).
            indices: ``(B,)`` sample indices, one per image.
            quantize: Return what the dataset serves: clamped to ``[0, 1]`` and rounded to the uint8 grid
                (``k / 255``), with a straight-through gradient for the rounding.

        Returns:
            Tensor of the images' shape and dtype.
        """
        self._check_images(images, floating=True)
        bias = self.values(self._indices(indices, images.shape[0]))
        out = images + bias.to(device=images.device, dtype=images.dtype)
        if quantize:
            out = out.clamp(0, 1)
            rounded = torch.floor(out * 255 + 0.5) / 255  # round half up, as the core files decode
            out = out + (rounded - out).detach()
        return out

    @torch.no_grad()
    def apply_uint8(self, images: torch.Tensor | np.ndarray, indices: IndexLike) -> torch.Tensor | np.ndarray:
        """Add the bias to uint8 images on the ``[0, 255]`` scale, round half up and clamp: the dataset items.

        Args:
            images: uint8 ``(B, C, H, W)``, a tensor or a numpy array.
            indices: ``(B,)`` sample indices.

        Returns:
            uint8 images of the input's type, shape and device.
        """
        as_numpy = isinstance(images, np.ndarray)
        tensor = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        self._check_images(tensor, floating=False)
        bias = self.values(self._indices(indices, tensor.shape[0])).to(tensor.device)
        out = torch.floor(tensor.float() + bias * 255 + 0.5).clamp_(0, 255).to(torch.uint8)
        return out.numpy() if as_numpy else out

    def apply_uint8_item(self, image: np.ndarray, index: int) -> np.ndarray:
        """:meth:`apply_uint8` for one item in the layout of a dataset's per-item decoder (2x to 3x faster).

        Args:
            image: uint8 numpy array ``(H, W)`` for one channel, ``(H, W, C)`` for several.
            index: The sample index.

        Returns:
            uint8 array of the same shape, equal to what :meth:`apply_uint8` gives for the same image.
        """
        channels, height, width = self.image_shape
        expected = (height, width) if channels == 1 else (height, width, channels)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != expected:
            seen = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"apply_uint8_item takes a uint8 numpy array of shape {expected}, got {seen}")
        i = operator.index(index)
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index must be in [-{self.num_samples}, {self.num_samples}), got {i}")
        if self.form == "dense" and self.weight.device.type == "cpu":  # numpy: same float32 operations, faster
            values = self.weight.detach().numpy()[i].reshape(channels, height, width) * np.float32(255)
        else:
            with torch.no_grad():
                if self.form == "dense":
                    bias = self.weight[i].view(channels, height, width)
                else:  # the same batched matmul as values(), so the rounding matches apply_uint8 exactly
                    r = int(self.rank)  # type: ignore[arg-type]
                    bias = self.u[i].view(1, channels, height, r) @ self.v[i].view(1, channels, r, width)
                values = (bias.reshape(channels, height, width) * 255).cpu().numpy()
        values = values[0] if channels == 1 else values.transpose(1, 2, 0)
        out = image.astype(np.float32)
        out += values
        out += np.float32(0.5)
        np.floor(out, out=out)
        np.maximum(out, 0, out=out)  # np.clip costs several microseconds more on one small image
        np.minimum(out, 255, out=out)
        return out.astype(np.uint8)

    # -- storage precision ---------------------------------------------------------------------------
    def _stored(self) -> dict[str, np.ndarray]:
        """The parameters as stored: arrays at the storage precision (plus ``<name>_scale`` for int8)."""
        channels, height, width = self.image_shape
        r = self.rank or 0
        shapes = {"weight": (channels, height, width), "u": (channels, height, r), "v": (channels, r, width)}
        arrays = {}
        for name in self._factor_names():
            data = getattr(self, name).detach().float().cpu()
            if self.dtype_name == "int8":
                scale = data.abs().amax(1) / 127
                safe = torch.where(scale > 0, scale, torch.ones_like(scale))
                q = torch.round(data / safe[:, None]).clamp_(-127, 127).to(torch.int8)
                arrays[f"{name}_scale"] = scale.numpy().astype(np.float32)
                data_np = q.numpy()
            else:
                data_np = data.numpy().astype(self.dtype_name)
            arrays[name] = data_np.reshape(self.num_samples, *shapes[name])
        return arrays

    def _load_stored(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name in self._factor_names():
                param = getattr(self, name)
                data = torch.from_numpy(np.asarray(arrays[name]).astype(np.float32)).reshape(param.shape)
                if self.dtype_name == "int8":
                    data = data * torch.from_numpy(np.asarray(arrays[f"{name}_scale"], np.float32))[:, None]
                param.copy_(data.to(param.device))

    def round_to_storage_(self) -> ResidualBias:
        """Round the parameters in place to what :func:`save_bias` stores; returns ``self``."""
        if self.dtype_name != "float32":
            self._load_stored(self._stored())
        return self


# ---------------------------------------------------------------------------------------------------
# Losses and teacher outputs
def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str = "kl", temperature: float = 4.0
) -> torch.Tensor:
    """The distillation loss ``L`` of Eq. 6, averaged over the batch.

    Args:
        student_logits: ``(B, K)`` outputs of the fixed network on the compressed images plus bias.
        teacher_logits: ``(B, K)`` outputs of the same network on the originals.
        loss: ``"kl"``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al. 2015), or ``"mse"``
            between the logits.
        temperature: ``T`` of the KL loss.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be (B, K), got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    teacher_logits = teacher_logits.to(student_logits.dtype)
    if loss == "mse":
        return F.mse_loss(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def _unit_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32 ``(B, C, H, W)`` in [0, 1] from uint8 or float ``(B, C, H, W)`` / ``(B, H, W)``."""
    tensor = torch.as_tensor(images)
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255)
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"images must be uint8 or floating point in [0, 1], got {tensor.dtype}")
    return tensor.float()


def _original_batches(originals: Any, batch_size: int):
    """``(start, float images)`` batches of the originals: a tensor/array or a dataset of untransformed items."""
    if hasattr(originals, "decode_batch") and hasattr(originals, "archive"):
        raise ValueError(
            "originals must be the original images (a tensor, or a dataset such as torchvision's), "
            f"got an MPS dataset ({type(originals).__name__}) whose images are the compressed ones"
        )
    if isinstance(originals, (torch.Tensor, np.ndarray)):
        for start in range(0, len(originals), batch_size):
            yield start, _unit_images(originals[start : start + batch_size])
        return
    import torchvision.transforms.v2.functional as TF

    items = []
    for i in range(len(originals)):
        item = originals[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        items.append(TF.pil_to_tensor(image) if not isinstance(image, torch.Tensor) else image)
        if len(items) == batch_size or i == len(originals) - 1:
            yield i + 1 - len(items), _unit_images(torch.stack(items))
            items = []


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module,
    originals: Any,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Outputs of the fixed network on the original images, float32 ``(N, K)`` on the CPU.

    Args:
        teacher: The fixed network; it takes float images in ``[0, 1]`` (after ``preprocess``).
        originals: uint8 or float tensor/array ``(N, C, H, W)`` or ``(N, H, W)``, or a dataset whose items are
            ``(image, target)`` with an untransformed PIL image or tensor, in the order of the compressed dataset.
        batch_size: Images per forward pass.
        device: Where to run (default: the teacher's device).
        preprocess: Applied to the float images before the teacher (e.g. a normalisation).
        progress: Show a progress bar.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = _device_of(teacher, device)
    was_training = teacher.training
    teacher.eval()
    outputs = []
    try:
        bar = tqdm(total=len(originals), desc="teacher outputs", unit="img", disable=not progress or None)
        for _, images in _original_batches(originals, batch_size):
            x = images.to(device)
            if preprocess is not None:
                x = preprocess(x)
            outputs.append(teacher(x).float().cpu())
            bar.update(len(images))
        bar.close()
    finally:
        teacher.train(was_training)
    if not outputs:
        raise ValueError("originals hold no images")
    return torch.cat(outputs)


def _device_of(module: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# Fitting
class _Compressed:
    """The compressed images of a dataset (``decode_batch``) or of a tensor, as float ``[0, 1]`` batches."""

    def __init__(self, source: Any) -> None:
        if hasattr(source, "decode_batch"):
            self.dataset = source
            self.tensor = None
            self.num_samples = len(source)
            # The bias is learned on the plain decoded images, even from a dataset that serves a stored bias.
            self.kwargs = {"bias": False} if "bias" in inspect.signature(source.decode_batch).parameters else {}
            first = source.decode_batch(np.zeros(1, np.int64), **self.kwargs)
        elif isinstance(source, (torch.Tensor, np.ndarray)):
            self.dataset = None
            self.tensor = torch.as_tensor(source)
            if self.tensor.dim() == 3:
                self.tensor = self.tensor[:, None]
            if self.tensor.is_floating_point() and self.tensor.numel():
                low, high = (float(v) for v in torch.aminmax(self.tensor))
                if not (low >= 0 and high <= 1):  # NaN fails both
                    raise ValueError(
                        f"float compressed images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                        "divide 0..255 images by 255, or pass uint8"
                    )
            self.num_samples = len(self.tensor)
            first = self.tensor[:1]
        else:
            raise TypeError(
                "dataset must be an MPS dataset (with decode_batch) or a tensor of compressed images "
                f"(N, C, H, W), got {type(source).__name__}"
            )
        if first.dim() != 4:
            raise ValueError(f"compressed images must be (N, C, H, W), got a batch of shape {tuple(first.shape)}")
        self.image_shape = tuple(int(v) for v in first.shape[1:])

    def batch(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.dataset is not None:
            if device.type == "cpu":
                images = self.dataset.decode_batch(indices, **self.kwargs)
            else:
                images = self.dataset.decode_batch(indices, device=device, **self.kwargs)
        else:
            images = self.tensor[indices]  # type: ignore[index]
        return _unit_images(images.to(device, non_blocking=True))


def _resolve_teacher_outputs(
    teacher_outputs: Any, originals: Any, teacher: nn.Module, num_samples: int, kwargs: dict[str, Any]
) -> torch.Tensor:
    path = None
    if isinstance(teacher_outputs, (str, os.PathLike)):
        path = Path(teacher_outputs)
        teacher_outputs = None
        if path.is_file():
            loaded = torch.load(path, weights_only=True)
            if not (isinstance(loaded, dict) and "logits" in loaded):
                raise ValueError(
                    f"{path} is not a teacher-outputs file written by fit (a dict with 'logits'); pass the tensor "
                    "itself as teacher_outputs, or a new path for fit to write"
                )
            teacher_outputs = loaded["logits"]
    if teacher_outputs is None:
        if originals is None:
            raise ValueError(
                "fit needs the teacher's outputs on the originals: give teacher_outputs (a tensor, or a file "
                "written by an earlier fit) or originals to compute them once"
            )
        teacher_outputs = teacher_logits(teacher, originals, **kwargs)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(path)
            torch.save({"logits": teacher_outputs, "num_samples": num_samples}, tmp)
            os.replace(tmp, path)
    if not isinstance(teacher_outputs, (torch.Tensor, np.ndarray)):
        where = f" in {path}" if path is not None else ""
        raise TypeError(f"teacher outputs must be a tensor (N, K){where}, got {type(teacher_outputs).__name__}")
    outputs = torch.as_tensor(teacher_outputs).detach()  # the fixed network's outputs are constants
    if not outputs.dtype.is_floating_point or outputs.dim() != 2 or outputs.shape[0] != num_samples:
        raise ValueError(
            f"teacher outputs must be floating point (N, K) with N = {num_samples} samples, got "
            f"{outputs.dtype} {tuple(outputs.shape)}" + (f" from {path}" if path is not None else "")
        )
    if not bool(torch.isfinite(outputs).all()):
        raise ValueError("teacher outputs contain NaN or infinite values; check the teacher and its inputs")
    return outputs.float()


def _make_optimizer(optimizer: str | Callable, params: list[nn.Parameter], lr: float, sparse: bool):
    if callable(optimizer):
        return optimizer(params)
    if optimizer == "adam":
        return torch.optim.SparseAdam(params, lr=lr) if sparse else torch.optim.Adam(params, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be 'adam', 'sgd' or a callable params -> optimizer, got {optimizer!r}")


def fit(
    dataset: Any,
    teacher: nn.Module,
    *,
    bias: ResidualBias | None = None,
    form: Form = "dense",
    rank: int | None = None,
    dtype: StorageDtype = "float16",
    epochs: int = 3,
    batch_size: int = 256,
    lr: float = 0.02,
    schedule: str = "cosine",
    optimizer: str | Callable = "adam",
    loss: str = "kl",
    temperature: float = 4.0,
    quantize: bool = True,
    teacher_outputs: torch.Tensor | str | os.PathLike | None = None,
    originals: Any = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ResidualBias:
    """Learn a residual bias by distillation from a fixed network (Eq. 6 of the paper).

    Each epoch visits every sample once, in an order drawn from a generator seeded by ``seed`` and the epoch,
    so a run resumed from a checkpoint repeats the uninterrupted run exactly.

    Args:
        dataset: An MPS dataset (its ``decode_batch`` gives the compressed images) or a tensor of compressed
            images, uint8 or float in ``[0, 1]``, ``(N, C, H, W)``.
        teacher: The fixed network ``f``; it takes float images in ``[0, 1]`` (after ``preprocess``). It is put
            in eval mode with its parameters frozen for the fit, and restored afterwards.
        bias: A bias to continue training; by default a new one of ``form``/``rank``/``dtype`` (zero).
        form: Form of a new bias, ``"dense"`` or ``"lowrank"``.
        rank: Rank of a new low-rank bias.
        dtype: Storage precision of a new bias.
        epochs: Passes over the samples.
        batch_size: Samples per step.
        lr: Peak learning rate. With Adam, each visit of a sample moves its pixels by a few ``lr`` on the
            ``[0, 1]`` scale whatever the size of the gradient.
        schedule: ``"cosine"`` (decay from ``lr`` to zero over all steps, so that the last visits refine rather
            than overshoot) or ``"constant"``.
        optimizer: ``"adam"`` (``SparseAdam``: each step moves only the batch's rows, of a dense bias too),
            ``"sgd"``, or a callable ``params -> optimizer``.
        loss: ``"kl"`` (temperature-scaled KL divergence) or ``"mse"`` on logits.
        temperature: Temperature of the KL loss.
        quantize: Train on what the dataset serves: the biased image clamped to ``[0, 1]`` and rounded to the
            uint8 grid (straight-through gradient).
        teacher_outputs: The teacher's outputs on the originals, ``(N, K)``; or a file path: read if it exists,
            else computed from ``originals`` and written there, so later fits need no originals.
        originals: The original images in the dataset's order (see :func:`teacher_logits`); needed only to
            compute the teacher outputs.
        preprocess: Applied to float images before the teacher, for originals and compressed images alike.
        checkpoint: A file saved after every epoch; when it exists the fit resumes from it.
        device: Where to train (default: the teacher's device).
        seed: Seeds the sample order and a new bias's initialisation.
        progress: Show a progress bar.

    Returns:
        The bias, rounded to its storage precision, with ``fit_log`` (per-epoch mean loss and time) and ``meta``
        (the fit's settings, stored by :func:`save_bias`).
    """
    from tqdm.auto import tqdm

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "kl" and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got epochs={epochs}, batch_size={batch_size}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not callable(optimizer) and optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam', 'sgd' or a callable params -> optimizer, got {optimizer!r}")
    source = _Compressed(dataset)
    num_samples = source.num_samples
    device = _device_of(teacher, device)
    if bias is None:
        bias = ResidualBias(num_samples, source.image_shape, form=form, rank=rank, dtype=dtype, seed=seed)
    elif not isinstance(bias, ResidualBias):
        raise TypeError(f"bias must be a ResidualBias, got {type(bias).__name__}")
    if bias.num_samples != num_samples or bias.image_shape != source.image_shape:
        raise ValueError(
            f"the bias holds {bias.num_samples} samples of shape {bias.image_shape} but the dataset has "
            f"{num_samples} of shape {source.image_shape}; create the bias for this dataset"
        )
    bias.to(device)
    outputs = _resolve_teacher_outputs(
        teacher_outputs,
        originals,
        teacher,
        num_samples,
        {"batch_size": max(batch_size, 512), "device": device, "preprocess": preprocess, "progress": progress},
    )
    params = list(bias.parameters())
    # Adam's moments would keep moving every row of a dense bias between its visits, against the promise that a
    # visit moves a sample by a few lr: "adam" is SparseAdam on sparse gradients, which the bias gives for the fit
    # whatever its ``sparse`` (so no full-size gradient is made either).
    rows_only = not bias.sparse and optimizer == "adam"
    opt = _make_optimizer(optimizer, params, lr, bias.sparse or rows_only)
    base_lrs = [group["lr"] for group in opt.param_groups]
    steps_per_epoch = math.ceil(num_samples / batch_size)
    settings = {
        "loss": loss,
        "temperature": temperature,
        "lr": lr,
        "schedule": schedule,
        "epochs": epochs,
        "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
        "batch_size": batch_size,
        "seed": seed,
        "quantize": quantize,
        "num_classes": int(outputs.shape[1]),
    }
    if rows_only:  # a checkpoint of the dense Adam used before cannot be resumed with this one
        settings["adam_rows_only"] = True
    start_epoch, log = 0, list[dict[str, Any]]()
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        start_epoch, log = _resume(checkpoint, bias, opt, settings)

    frozen = [(p, p.requires_grad) for p in teacher.parameters()]
    was_training = teacher.training
    teacher.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    bias.train()
    bias._row_gradients = rows_only
    try:
        for epoch in range(start_epoch, epochs):
            order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
            total, began = 0.0, time.perf_counter()
            bar = tqdm(total=num_samples, desc=f"bias epoch {epoch + 1}/{epochs}", unit="img",
                       disable=not progress or None)  # fmt: skip
            for step, first in enumerate(range(0, num_samples, batch_size)):
                if schedule == "cosine":  # a function of the position only, so a resumed fit follows it exactly
                    done = (epoch * steps_per_epoch + step) / max(1, epochs * steps_per_epoch)
                    for group, base in zip(opt.param_groups, base_lrs):
                        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * done))
                idx = order[first : first + batch_size]
                x = bias(source.batch(idx, device), idx, quantize=quantize)
                if preprocess is not None:
                    x = preprocess(x)
                value = distill_loss(teacher(x), outputs[idx].to(device), loss, temperature)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                total += float(value.detach()) * len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{total / min(num_samples, first + len(idx)):.4f}", refresh=False)
            bar.close()
            log.append({"epoch": epoch + 1, "loss": total / num_samples, "seconds": time.perf_counter() - began})
            if checkpoint is not None:
                _save_checkpoint(checkpoint, epoch + 1, bias, opt, settings, log)
    finally:
        bias._row_gradients = False
        for p, flag in frozen:
            p.requires_grad_(flag)
        teacher.train(was_training)
    bias.eval()
    bias.round_to_storage_()
    bias.fit_log = log
    bias.meta = {**settings, "teacher": type(teacher).__name__, "log": log}
    return bias


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + epoch) % (2**63)


def _save_checkpoint(path: Path, epoch: int, bias: ResidualBias, opt, settings: dict, log: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    state = {
        "version": _CHECKPOINT_VERSION,
        "epoch": epoch,
        "config": bias.config,
        "settings": settings,
        "bias": bias.state_dict(),
        "optimizer": opt.state_dict(),
        "log": log,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(path: Path, bias: ResidualBias, opt, settings: dict) -> tuple[int, list]:
    state = torch.load(path, weights_only=True, map_location=bias._param_device())
    if state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has version {state.get('version')}, expected {_CHECKPOINT_VERSION}")
    if state["config"] != bias.config or state["settings"] != settings:
        raise ValueError(
            f"checkpoint {path} was written by another fit (bias {state['config']}, settings {state['settings']}) "
            f"than this one (bias {bias.config}, settings {settings}); delete it or pass another checkpoint path"
        )
    bias.load_state_dict(state["bias"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["log"])


# ---------------------------------------------------------------------------------------------------
# Core files
def _image_shape_of(f: h5py.File) -> tuple[int, int, int]:
    settings = json.loads(f.attrs["settings"])
    if "image_shape" in settings:
        return tuple(int(v) for v in settings["image_shape"])  # type: ignore[return-value]
    layout = json.loads(f.attrs["layout"])
    channels = int(json.loads(f.attrs["meta"]).get("channels", layout["channels"]))
    return channels, int(layout["height"]), int(layout["width"])


def _open_core(path: Path, mode: str) -> h5py.File:
    try:
        f = h5py.File(path, mode, locking=False)
    except OSError as error:
        raise MPSDataError(f"cannot open core file {path} ({error})") from None
    if f.attrs.get("format") != _CORE_FORMAT:
        f.close()
        raise MPSDataError(f"{path} is not an mpsdata core file (format attribute missing or wrong)")
    return f


def _digest(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def save_bias(bias: ResidualBias, path: str | os.PathLike, *, meta: dict[str, Any] | None = None) -> Path:
    """Store a bias in a core file as the group ``/bias``, atomically (replacing any bias already there).

    The file is copied to a temporary file in the same folder, the group is added (one dataset per factor at the
    storage precision, chunked along samples, each with its ``sha256``; attributes ``form``, ``rank``,
    ``dtype``, ``shape``, ``cores_sha256`` of the cores it was learned on, ``meta``), and the copy replaces the
    file. The cores and their checksums are untouched.

    Args:
        bias: The bias to store; its sample count and image shape must match the file.
        path: The core file (``dataset.archive``).
        meta: Extra JSON-serialisable facts to store (default: ``bias.meta``, the fit's settings).

    Returns:
        The path.
    """
    if not isinstance(bias, ResidualBias):
        raise TypeError(f"bias must be a ResidualBias, got {type(bias).__name__}")
    path = Path(path)
    with _open_core(path, "r") as f:
        num_samples = int(f["targets"].shape[0])
        image_shape = _image_shape_of(f)
        has_bias = "bias" in f
    if (num_samples, image_shape) != (bias.num_samples, bias.image_shape):
        raise ValueError(
            f"the bias holds {bias.num_samples} samples of shape {bias.image_shape} but core file {path} holds "
            f"{num_samples} of shape {image_shape}; learn the bias on this file's dataset"
        )
    arrays = bias._stored()
    tmp = temporary_path(path)
    try:
        if has_bias:
            _copy_without_bias(path, tmp)
        else:
            shutil.copyfile(path, tmp)
        bytes_without = tmp.stat().st_size
        with h5py.File(tmp, "r+", locking=False) as f:
            group = f.create_group("bias", track_order=True)
            total = hashlib.sha256()
            for name, data in arrays.items():
                per_sample = max(1, data[0].nbytes)
                target = max(1, min(num_samples, _CHUNK_BYTES // per_sample))
                # equal chunks: HDF5 allocates the last chunk whole, so a mostly empty one would cost bytes
                chunk = math.ceil(num_samples / math.ceil(num_samples / target))
                ds = group.create_dataset(name, data=data, chunks=(chunk, *data.shape[1:]), track_times=False)
                digest = _digest(data)
                ds.attrs["sha256"] = digest
                total.update(f"{name}:{digest};".encode())
            group.attrs["format_version"] = BIAS_FORMAT_VERSION
            group.attrs["form"] = bias.form
            group.attrs["rank"] = 0 if bias.rank is None else bias.rank
            group.attrs["dtype"] = bias.dtype_name
            group.attrs["shape"] = np.asarray([num_samples, *image_shape], np.int64)
            group.attrs["params_per_sample"] = bias.params_per_sample
            group.attrs["nbytes_per_sample"] = bias.nbytes_per_sample
            group.attrs["file_bytes_without_bias"] = bytes_without
            group.attrs["cores_sha256"] = str(f.attrs["content_sha256"])
            group.attrs["content_sha256"] = total.hexdigest()
            group.attrs["meta"] = json.dumps(bias.meta if meta is None else meta, sort_keys=True, default=str)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _copy_without_bias(src: Path, dst: Path) -> None:
    """A copy of a core file without its ``/bias`` group (deleting in place would leave the space in the file)."""
    with (
        h5py.File(src, "r", locking=False) as f,
        h5py.File(dst, "w", libver=("v110", "v110"), locking=False, track_order=True) as g,
    ):
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for name in f:
            if name != "bias":
                f.copy(f[name], g, name=name)


def remove_bias(path: str | os.PathLike) -> bool:
    """Remove the ``/bias`` group of a core file, atomically; returns whether there was one."""
    path = Path(path)
    with _open_core(path, "r") as f:
        if "bias" not in f:
            return False
    tmp = temporary_path(path)
    try:
        _copy_without_bias(path, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True


def load_bias(path: str | os.PathLike, *, device: torch.device | str | None = None) -> ResidualBias | None:
    """The bias stored in a core file (checksums verified), or ``None`` when the file holds none.

    Raises:
        MPSDataError: The group is corrupted, of a newer format, or was learned on other cores.
    """
    path = Path(path)
    with _open_core(path, "r") as f:
        if "bias" not in f:
            return None
        group = f["bias"]
        try:
            version = int(group.attrs["format_version"])
            if version > BIAS_FORMAT_VERSION:
                raise MPSDataError(
                    f"the bias in {path} has format version {version}, newer than this mpsdata reads "
                    f"({BIAS_FORMAT_VERSION}); upgrade mpsdata"
                )
            if str(group.attrs["cores_sha256"]) != str(f.attrs["content_sha256"]):
                raise MPSDataError(
                    f"the bias in {path} was learned on other cores than the file holds now; "
                    "learn it again (distill.fit) or remove it (distill.remove_bias)"
                )
            shape = [int(v) for v in group.attrs["shape"]]
            rank = int(group.attrs["rank"]) or None
            form, dtype = str(group.attrs["form"]), str(group.attrs["dtype"])
            bias = ResidualBias(shape[0], shape[1:], form=form, rank=rank, dtype=dtype)  # type: ignore[arg-type]
            arrays = {}
            for name in group:
                data = group[name][:]
                if _digest(data) != group[name].attrs.get("sha256"):
                    raise MPSDataError(f"bias dataset {name!r} of {path} fails its checksum: the file is corrupted")
                arrays[name] = data
            bias._load_stored(arrays)
            bias.meta = json.loads(group.attrs["meta"])
        except MPSDataError:
            raise
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as error:
            raise MPSDataError(f"the bias group of {path} is incomplete or corrupted ({error})") from None
    bias.eval()
    return bias.to(device) if device is not None else bias


def bias_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """Attributes of the stored bias without reading it, or ``None``: form, rank, dtype, params and bytes."""
    path = Path(path)
    with _open_core(path, "r") as f:
        if "bias" not in f:
            return None
        attrs = f["bias"].attrs
        shape = [int(v) for v in attrs["shape"]]
        file_bytes = path.stat().st_size
        return {
            "form": str(attrs["form"]),
            "rank": int(attrs["rank"]) or None,
            "dtype": str(attrs["dtype"]),
            "shape": shape,
            "params_per_sample": int(attrs["params_per_sample"]),
            "nbytes_per_sample": int(attrs["nbytes_per_sample"]),
            "ratio": int(attrs["params_per_sample"]) / math.prod(shape[1:]),
            "file_bytes": file_bytes,
            "bias_file_bytes": file_bytes - int(attrs["file_bytes_without_bias"]),
        }
