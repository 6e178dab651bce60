"""The package's exception class."""

from __future__ import annotations

__all__ = ["MPSDataError"]


class MPSDataError(RuntimeError):
    """A problem with mpsdata's own data: a core file, an archive or a build that cannot be used.

    A ``RuntimeError``, like torchvision's "Dataset not found or corrupted". Wrong arguments raise
    ``TypeError`` or ``ValueError`` instead, as in torch and torchvision.
    """
