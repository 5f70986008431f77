"""Block drafters' training (DFlash, Domino) around the drafts in ``specforge_common.models``.

``anchors``: where blocks start, drawn per sample from its seed.
``blocks``: block token ids, positions, the attention mask, labels and loss weights.
``metrics``: per-position conditional acceptance, simulated acceptance length, losses.
``strategy``: the DFlash strategy (registered as ``dflash``).
``domino``: the Domino strategy and its lambda schedule (registered as ``domino``).
"""

from specforge_common.dflash.anchors import anchor_candidates, sample_anchors
from specforge_common.dflash.blocks import (
    BlockTargets,
    block_attention_mask,
    block_positions,
    block_targets,
    block_token_ids,
    previous_tokens,
)
from specforge_common.dflash.domino import DominoStrategy, lambda_schedule
from specforge_common.dflash.metrics import BlockMetrics, DominoMetrics
from specforge_common.dflash.strategy import DFlashStrategy, DraftedBlocks

__all__ = [
    "BlockMetrics",
    "BlockTargets",
    "DFlashStrategy",
    "DominoMetrics",
    "DominoStrategy",
    "DraftedBlocks",
    "anchor_candidates",
    "block_attention_mask",
    "block_positions",
    "block_targets",
    "block_token_ids",
    "lambda_schedule",
    "previous_tokens",
    "sample_anchors",
]
