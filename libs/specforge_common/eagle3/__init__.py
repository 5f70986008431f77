"""EAGLE-3 training pieces around the draft model (``specforge_common.models.eagle3``).

``vocab``: the draft vocabulary map (``d2t``/``t2d``) and how it is built from token counts.
``layout``: the SGLang layout of a draft on disk (file and tensor names, shapes).
``export``: ``save_draft``, the SGLang export users serve with.
``load``: ``load_draft``, for our exports and published drafts (warm starts, evaluation).
``teacher``: the target's distribution at every position, restricted to the draft vocab.
``strategy``: the training-time-test unroll, its loss and metrics (registered as ``eagle3``).
"""

from specforge_common.eagle3.export import save_draft
from specforge_common.eagle3.layout import REQUIRED_KEYS, CheckpointError, expected_shapes
from specforge_common.eagle3.load import load_draft
from specforge_common.eagle3.strategy import Eagle3Metrics, Eagle3Strategy, StrategyOutput
from specforge_common.eagle3.teacher import Teacher, prepare_teacher
from specforge_common.eagle3.vocab import (
    TokenCounter,
    VocabMap,
    VocabMapMismatch,
    apply_vocab_map,
    build_vocab_map,
    vocab_map_of,
)

__all__ = [
    # checkpoint
    "REQUIRED_KEYS",
    "CheckpointError",
    "expected_shapes",
    "load_draft",
    "save_draft",
    # teacher and strategy
    "Eagle3Metrics",
    "Eagle3Strategy",
    "StrategyOutput",
    "Teacher",
    "prepare_teacher",
    # vocab
    "TokenCounter",
    "VocabMap",
    "VocabMapMismatch",
    "apply_vocab_map",
    "build_vocab_map",
    "vocab_map_of",
]
