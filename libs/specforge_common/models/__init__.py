"""Draft model architectures. Importing this package registers them."""

from .dflash import DFlashConfig, DFlashDraft
from .domino import DominoConfig, DominoDraft
from .draft import DraftModel
from .eagle3 import Eagle3Config, Eagle3Draft, TTTCache

__all__ = [
    "DFlashConfig",
    "DFlashDraft",
    "DominoConfig",
    "DominoDraft",
    "DraftModel",
    "Eagle3Config",
    "Eagle3Draft",
    "TTTCache",
]
