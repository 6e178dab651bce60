"""mpsdata: compress image datasets with matrix product states (tensor trains).

Public names only; the implementation lives in private modules.
"""

from ._errors import MPSDataError
from ._mps import MPS, decompose, entanglement_entropy
from ._version import __version__
from .datasets import MPSCIFAR10, MPSCIFAR100, MPSMNIST, MPSFashionMNIST, MPSImageFolder, MPSImageNet
from .transforms import MPSCompress

__all__ = [
    "MPS",
    "MPSCIFAR10",
    "MPSCIFAR100",
    "MPSCompress",
    "MPSDataError",
    "MPSFashionMNIST",
    "MPSImageFolder",
    "MPSImageNet",
    "MPSMNIST",
    "decompose",
    "entanglement_entropy",
    "__version__",
]
