"""mpsdata: compress image datasets with matrix product states (tensor trains).

Public names only; the implementation lives in private modules.
"""

from ._errors import MPSDataError
from ._mps import MPS, decompose, entanglement_entropy
from .transforms import MPSCompress

__version__ = "0.1.0"

__all__ = ["MPS", "MPSCompress", "MPSDataError", "decompose", "entanglement_entropy", "__version__"]
