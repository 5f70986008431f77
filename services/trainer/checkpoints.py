"""Checkpoint directories of a run: ``<output_dir>/<run>/checkpoints/step-XXXXXXXX/``.

Each step dir is an SGLang-layout draft (``config.json`` + ``model.safetensors``, written by
``save_draft``) plus ``trainer_state.json`` (step, samples consumed, stream position, vocab-map
and run-spec hashes, world size, strategy, the latest train metrics) and ``training_state.pt``
(the tensors a resume needs beyond the weights: optimizer ``state_dict()`` and RNG states; a
plain dict of tensors and numbers, read back only with ``torch.load(weights_only=True)``). A
step dir appears atomically, complete with all three: it is assembled in a hidden staging dir
and renamed into place. ``latest`` (a text file
naming the newest step dir) is replaced atomically after each save. Rotation keeps the newest
``keep_last`` step dirs plus step 0 and every final checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specforge_common.eagle3 import save_draft
from specforge_common.eagle3.checkpoint import WEIGHTS_NAME, sha256_file
from specforge_common.log import get_logger
from specforge_common.models.eagle3 import Eagle3Draft

__all__ = [
    "LATEST_NAME",
    "STATE_NAME",
    "TENSORS_NAME",
    "CheckpointManager",
    "SavedCheckpoint",
    "checkpoints_root",
    "sha256_file",
    "step_dir_name",
]

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "training_state.pt"
LATEST_NAME = "latest"
STATE_FORMAT = 2  # 2: + training_state.pt and the resume fields of trainer_state.json
STEP_DIR = re.compile(r"step-(\d{8,})")

log = get_logger(component="trainer.checkpoints")


def checkpoints_root(output_dir: str | Path, run_id: str) -> Path:
    return (Path(output_dir) / run_id / "checkpoints").absolute()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path  # absolute step dir
    sha256: str  # of its model.safetensors
    final: bool


class CheckpointManager:
    def __init__(self, root: str | Path, *, keep_last: int = 3) -> None:
        self.root = Path(root).absolute()
        self.keep_last = max(1, keep_last)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_staging_leftovers()

    def _remove_staging_leftovers(self) -> None:
        for path in self.root.glob(".step-*"):
            shutil.rmtree(path, ignore_errors=True)  # a crash mid-save; never a visible step dir

    def step_dirs(self) -> dict[int, Path]:
        """Complete step dirs, by step."""
        found = {}
        for path in self.root.iterdir():
            match = STEP_DIR.fullmatch(path.name)
            if match and path.is_dir() and (path / WEIGHTS_NAME).is_file():
                found[int(match.group(1))] = path
        return dict(sorted(found.items()))

    def latest(self) -> Path | None:
        """The step dir ``latest`` names, or None."""
        try:
            name = (self.root / LATEST_NAME).read_text().strip()
        except FileNotFoundError:
            return None
        return self.root / name if name else None

    @staticmethod
    def read_state(step_dir: Path) -> dict[str, Any]:
        return json.loads((step_dir / STATE_NAME).read_text())

    @staticmethod
    def read_tensors(step_dir: Path) -> dict[str, Any] | None:
        """The step's ``training_state.pt`` (optimizer + RNG), or None when it has none.

        Loaded with ``weights_only=True``: tensors and plain containers only, never objects.
        """
        path = step_dir / TENSORS_NAME
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save(
        self,
        draft: Eagle3Draft,
        step: int,
        state: dict[str, Any],
        *,
        final: bool = False,
        protect: Collection[int] = (),
        tensors: dict[str, Any] | None = None,
    ) -> SavedCheckpoint:
        """Write ``step-XXXXXXXX`` (replacing one of the same step), update ``latest``, rotate.

        ``tensors`` (optimizer state, RNG states: tensors, numbers, strings and plain
        containers) go to ``training_state.pt`` in the same staging dir."""
        name = step_dir_name(step)
        target = self.root / name
        staging = self.root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.staging"
        old: Path | None = None
        try:
            save_draft(draft, staging)
            full_state = {"format": STATE_FORMAT, "step": step, "final": final, **state}
            with open(staging / STATE_NAME, "w") as file:
                json.dump(full_state, file, indent=2, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            if tensors is not None:
                with open(staging / TENSORS_NAME, "wb") as file:
                    torch.save(tensors, file)
                    file.flush()
                    os.fsync(file.fileno())
            sha256 = sha256_file(staging / WEIGHTS_NAME)
            _fsync(staging)
            if target.exists():
                old = self.root / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.old"
                os.replace(target, old)
            os.replace(staging, target)
            _fsync(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        _write_atomic(self.root / LATEST_NAME, name + "\n")
        removed = self.rotate(protect)
        log.info("checkpoint written", step=step, path=str(target), final=final,
                 sha256=sha256, rotated_out=[p.name for p in removed])  # fmt: skip
        return SavedCheckpoint(step, target, sha256, final)

    def _is_final(self, step_dir: Path) -> bool:
        try:
            return bool(self.read_state(step_dir).get("final"))
        except (OSError, ValueError):
            return False

    def rotate(self, protect: Collection[int] = ()) -> list[Path]:
        """Delete step dirs beyond the newest ``keep_last``, sparing step 0, final ones and the
        ``protect``ed steps (those the evaluator has not scored yet)."""
        dirs = self.step_dirs()
        keep = set(list(dirs)[-self.keep_last :]) | {0} | set(protect)
        latest = self.latest()
        removed = []
        for step, path in dirs.items():
            if step in keep or path == latest or self._is_final(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed
