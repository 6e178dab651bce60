"""Type aliases shared by the package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

#: Row-major site dimensions (``[2, 4, 7, 7, 2]``) or hierarchical sites as ``(row, col)`` digit pairs
#: (``[(7, 7), (2, 2), (2, 2)]``), or the name of a default family.
SiteDims = Sequence[int] | Sequence[tuple[int, int]] | Literal["row", "hierarchical"] | None

#: How colour channels are handled: each channel its own MPS, or the channel as the last site.
ChannelMode = Literal["separate", "site"]
