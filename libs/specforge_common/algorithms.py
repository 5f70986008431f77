"""The draft-training algorithms a run can name, and what each one needs from the others.

A run names its algorithm by its training strategy (``draft.strategy``). The strategy decides
which feature set capture stores (the *capture method*) and which draft architecture the
trainer builds, so a config that only says ``strategy = "dflash"`` is complete. This table is
read where no torch is loaded (config resolution, the bus contracts); the strategy and
architecture classes themselves live in their registries (``registry.py``).

Adding an algorithm: its draft architecture module (``models/``), its strategy package, a row
here, and, for a new feature set, its keys in ``batch.FEATURE_KEYS_BY_METHOD`` and its layer rule
in ``targets/engine.py``. No service changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    strategy: str  # registry name of the training strategy (what a run config names)
    capture_method: str  # the feature set its trainer reads
    architecture: str  # registry name of its default draft architecture
    reduced_vocab: bool  # drafts over ``draft.draft_vocab_size`` tokens (else the target's all)


ALGORITHMS: dict[str, Algorithm] = {
    a.strategy: a
    for a in (
        Algorithm(
            strategy="eagle3",
            capture_method="eagle3",
            architecture="llama_eagle3",
            reduced_vocab=True,
        ),
        Algorithm(
            strategy="dflash", capture_method="dflash", architecture="dflash", reduced_vocab=False
        ),
        Algorithm(
            strategy="domino", capture_method="dflash", architecture="domino", reduced_vocab=False
        ),
    )
}

CAPTURE_METHODS = tuple(sorted({a.capture_method for a in ALGORITHMS.values()}))


def algorithm(strategy: str) -> Algorithm:
    try:
        return ALGORITHMS[strategy]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown training strategy {strategy!r}; known: {known}") from None
