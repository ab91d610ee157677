"""The vision model's token grid: grid_h x grid_w patches, one token each (row-major).

Worked out in one place, `Grid.of`, from how many tokens a frame has: the model client
from the served model's metadata; a stream's feature cache from its first tokens, where
the model did not say. The tokens records of a stream carry its grid.
"""

from __future__ import annotations

from typing import NamedTuple


class Grid(NamedTuple):
    h: int
    w: int

    @property
    def known(self) -> bool:
        return self.h > 0

    @property
    def size(self) -> int:
        return self.h * self.w

    @staticmethod
    def of(patches: int) -> Grid:
        """The grid of a frame's `patches` tokens: as square as they divide, else one row
        (a record's kept mask must cover every token; the served models' grids are square)."""
        if patches <= 0:
            return UNKNOWN
        side = int(round(patches**0.5))
        return Grid(side, patches // side) if side * (patches // side) == patches else Grid(1, patches)


UNKNOWN = Grid(0, 0)
