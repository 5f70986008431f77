"""Errors a feature store raises, so callers can dead-letter a bad sample without guessing."""

from __future__ import annotations


class FeatureStoreError(Exception):
    """Base: the store could not serve or keep a sample (I/O failure, foreign location, closed)."""


class FeatureMissingError(FeatureStoreError):
    """Nothing is stored at the location: never written, deleted, or evicted."""


class FeatureCorruptError(FeatureStoreError):
    """The stored bytes are not what the location describes: size, checksum, header or specs."""


class FeatureOutsideRootError(FeatureStoreError):
    """A location would resolve outside the store's root (``../``, absolute path, symlink out)."""
