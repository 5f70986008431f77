"""Draft model architectures. Importing this package registers them."""

from .eagle3 import Eagle3Config, Eagle3Draft, TTTCache

__all__ = ["Eagle3Config", "Eagle3Draft", "TTTCache"]
