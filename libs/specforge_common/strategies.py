"""Every training strategy, registered: import ``STRATEGIES`` from here, not from ``registry``,
so that a name in a run config always finds its class."""

from specforge_common.dflash import DFlashStrategy, DominoStrategy
from specforge_common.eagle3 import Eagle3Strategy
from specforge_common.registry import STRATEGIES

__all__ = ["STRATEGIES", "DFlashStrategy", "DominoStrategy", "Eagle3Strategy"]
