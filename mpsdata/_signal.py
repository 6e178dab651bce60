"""Small signal-processing pieces shared by the engine's companions: the orthonormal 2-D DCT and PSNR."""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["dct2", "dct_matrix", "psnr"]


def dct_matrix(size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C[k, j] = s_k cos(pi (2 j + 1) k / (2 size))``.

    Example:
        >>> c = dct_matrix(4)
        >>> bool(torch.allclose(c @ c.T, torch.eye(4, dtype=torch.float64)))
        True
    """
    return _dct_matrix(size).to(dtype=dtype, device=device, copy=True)


@functools.lru_cache(maxsize=64)
def _dct_matrix(size: int) -> torch.Tensor:
    """Cached: readers invert the DCT per item, and building the matrix costs far more than applying it."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    j = torch.arange(size, dtype=torch.float64)[None]
    mat = torch.cos(math.pi * (2 * j + 1) * k / (2 * size)) * math.sqrt(2 / size)
    mat[0] /= math.sqrt(2)
    return mat


def dct2(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of the last two dims (``inverse``: its transpose), in ``x``'s dtype and device.

    Example:
        >>> x = torch.rand(2, 3, 8, 6, dtype=torch.float64)
        >>> bool(torch.allclose(dct2(dct2(x), inverse=True), x))
        True
    """
    rows = dct_matrix(x.shape[-2], x.dtype, x.device)
    cols = dct_matrix(x.shape[-1], x.dtype, x.device)
    return rows.mT @ x @ cols if inverse else rows @ x @ cols.mT


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR per image on the uint8 scale, ``(N,)`` float64 on the CPU, capped at 100 dB for exact images.

    Example:
        >>> a = torch.zeros(2, 4, 4)
        >>> psnr(a, a + 255 * torch.tensor([[[0.1]], [[0.0]]])).tolist()
        [20.0, 100.0]
    """
    diff = x.to(torch.float64) - y.to(torch.float64)
    mse = diff.reshape(diff.shape[0], -1).square().mean(1)
    return (10 * torch.log10(255.0**2 / mse.clamp_min(1e-300))).clamp_max(100.0).cpu()
