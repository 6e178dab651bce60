"""Drop-in MPS versions of torchvision datasets."""

from ._base import MPSVisionDataset
from .cifar import MPSCIFAR10, MPSCIFAR100
from .folder import MPSImageFolder, MPSImageNet
from .mnist import MPSMNIST, MPSFashionMNIST

__all__ = [
    "MPSCIFAR10",
    "MPSCIFAR100",
    "MPSMNIST",
    "MPSFashionMNIST",
    "MPSImageFolder",
    "MPSImageNet",
    "MPSVisionDataset",
]
