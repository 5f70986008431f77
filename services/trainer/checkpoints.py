"""Checkpoint directories of a run: ``<output_dir>/<run>/checkpoints/step-XXXXXXXX/``.

Each step dir is an SGLang-layout draft (``config.json`` + ``model.safetensors``, written by
``save_draft``) with its model card ``README.md`` (``specforge_common.model_card``: what
the draft is, its training data, "not evaluated yet" until the evaluator rewrites it, the SGLang
command) plus ``trainer_state.json`` (step, samples consumed, stream position, vocab-map
and run-spec hashes, world size, strategy, the latest train metrics) and ``training_state.pt``
(the tensors a resume needs beyond the weights: optimizer ``state_dict()`` and RNG states; a
plain dict of tensors and numbers, read back only with ``torch.load(weights_only=True)``). A
step dir appears atomically, complete with all of them: it is assembled in a hidden staging dir
and renamed into place. The card is not part of the weights' sha256, so the evaluator's rewrite
leaves the checkpoint's identity alone. ``latest`` (a text file
naming the newest step dir) is replaced atomically after each save. Rotation keeps the newest
``keep_last`` step dirs plus step 0, every final checkpoint and the best one.

``best`` (a text file naming a step dir, replaced atomically like ``latest``) and
``best_meta.json`` point at the evaluated checkpoint with the highest simulated acceptance
length (``update_best``, fed the run's ``EvalResult``s before each save). An eval counts only
while its step dir exists and still holds the weights it scored (same sha256).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specforge_common import faults
from specforge_common.contracts import EvalResult
from specforge_common.durable import fsync_dir, fsync_file, sha256_file, temp_sibling, write_atomic
from specforge_common.eagle3.layout import CONFIG_NAME, WEIGHTS_NAME
from specforge_common.log import get_logger
from specforge_common.model_card import CARD_NAME, ModelCardFacts, render_model_card
from specforge_common.models import DraftModel

__all__ = [
    "BEST_META_NAME",
    "BEST_NAME",
    "LATEST_NAME",
    "STATE_NAME",
    "TENSORS_NAME",
    "CheckpointManager",
    "SavedCheckpoint",
    "checkpoints_root",
    "step_dir_name",
]

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "training_state.pt"
LATEST_NAME = "latest"
BEST_NAME = "best"
BEST_META_NAME = "best_meta.json"
STATE_FORMAT = 2  # of trainer_state.json with training_state.pt; a resume reads no other
STEP_DIR = re.compile(r"step-(\d{8,})")

log = get_logger(component="trainer.checkpoints")


def checkpoints_root(output_dir: str | Path, run_id: str) -> Path:
    return (Path(output_dir) / run_id / "checkpoints").absolute()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


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
        # weights path -> ((inode, size, mtime_ns), sha256): update_best hashes each file once
        self._sha_cache: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._remove_staging_leftovers()

    def _remove_staging_leftovers(self) -> None:
        for pattern in (".step-*", "..step-*"):  # a staging dir, or save_draft's temp dir in it
            for path in self.root.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)  # a crash mid-save; never a step dir
        for name in (LATEST_NAME, BEST_NAME, BEST_META_NAME):
            for path in self.root.glob(f".{name}.*.tmp"):
                path.unlink(missing_ok=True)  # a crash inside write_atomic

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

    def best(self) -> Path | None:
        """The step dir ``best`` names, or None."""
        try:
            name = (self.root / BEST_NAME).read_text().strip()
        except FileNotFoundError:
            return None
        return self.root / name if name else None

    def best_meta(self) -> dict[str, Any] | None:
        """``best_meta.json`` (step, acceptance, sha256 of the scored weights), or None."""
        try:
            return json.loads((self.root / BEST_META_NAME).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _weights_sha256(self, step_dir: Path) -> str | None:
        """sha256 of a step dir's weights (cached by inode, size and mtime), None if absent."""
        path = step_dir / WEIGHTS_NAME
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._sha_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        sha256 = sha256_file(path)
        self._sha_cache[path] = (key, sha256)
        return sha256

    def update_best(self, evals: Iterable[EvalResult]) -> Path | None:
        """Point ``best`` at the scored checkpoint with the highest simulated acceptance length.

        Ties go to the earlier step. Results without a (finite) simulated acceptance length are
        ignored, and so are those whose step dir is gone or holds other weights than the ones
        scored (sha256). ``best`` and ``best_meta.json`` are rewritten (atomically) only when
        the choice changes. With no usable result the current best is kept while its dir
        still holds the weights its meta names; otherwise both files are removed. Returns the
        best step dir, or None.
        """
        dirs = self.step_dirs()
        scored = [
            r for r in evals
            if r.simulated_acceptance_length is not None
            and math.isfinite(r.simulated_acceptance_length) and r.step in dirs
        ]  # fmt: skip
        scored.sort(key=lambda r: (-r.simulated_acceptance_length, r.step))
        chosen = next(
            (r for r in scored if self._weights_sha256(dirs[r.step]) == r.checkpoint_sha256), None
        )
        current, meta = self.best(), self.best_meta()
        if chosen is None:
            if current is not None and meta is not None and current.is_dir():
                if self._weights_sha256(current) == meta.get("checkpoint_sha256"):
                    return current
            self._clear_best()
            return None
        path = dirs[chosen.step]
        same = (
            current == path and meta is not None
            and meta.get("step") == chosen.step
            and meta.get("checkpoint_sha256") == chosen.checkpoint_sha256
            and meta.get("simulated_acceptance_length") == chosen.simulated_acceptance_length
        )  # fmt: skip
        if same:
            return path
        new_meta = {
            "step": chosen.step,
            "dir": path.name,
            "simulated_acceptance_length": chosen.simulated_acceptance_length,
            "serving_acceptance_length": chosen.serving_acceptance_length,
            "acceptance_rates": list(chosen.acceptance_rates),
            "checkpoint_sha256": chosen.checkpoint_sha256,
            "run_spec_hash": chosen.run_spec_hash,
            "updated_at": time.time(),
        }
        # meta first: a crash in between leaves the old pointer with new meta, which the next
        # update_best call (the meta's sha256 check) rewrites.
        write_atomic(self.root / BEST_META_NAME, json.dumps(new_meta, indent=2) + "\n")
        write_atomic(self.root / BEST_NAME, path.name + "\n")
        log.info("best checkpoint", step=chosen.step, path=str(path),
                 simulated_acceptance_length=chosen.simulated_acceptance_length,
                 previous=current.name if current is not None else None)  # fmt: skip
        return path

    def _clear_best(self) -> None:
        removed = False
        for name in (BEST_NAME, BEST_META_NAME):
            try:
                (self.root / name).unlink()
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            fsync_dir(self.root)
            log.info("best checkpoint cleared: no scored checkpoint is on disk")

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
        draft: DraftModel,
        step: int,
        state: dict[str, Any],
        *,
        final: bool = False,
        protect: Collection[int] = (),
        tensors: dict[str, Any] | None = None,
        card: ModelCardFacts | None = None,
    ) -> SavedCheckpoint:
        """Write ``step-XXXXXXXX`` (replacing one of the same step), update ``latest``, rotate.

        ``tensors`` (optimizer state, RNG states: tensors, numbers, strings and plain
        containers) go to ``training_state.pt`` in the same staging dir. ``card``: the facts of
        the draft's ``README.md``, completed here with the step, finality, weights sha256 and
        the exported config, and written into the staging dir (a failure to write it is logged
        and the checkpoint is written without it)."""
        name = step_dir_name(step)
        target = self.root / name
        staging = temp_sibling(target, "staging")
        old: Path | None = None
        try:
            draft.save(staging)
            full_state = {"format": STATE_FORMAT, "step": step, "final": final, **state}
            (staging / STATE_NAME).write_text(json.dumps(full_state, indent=2, sort_keys=True))
            fsync_file(staging / STATE_NAME)
            if tensors is not None:
                with open(staging / TENSORS_NAME, "wb") as file:
                    torch.save(tensors, file)
                fsync_file(staging / TENSORS_NAME)
            sha256 = sha256_file(staging / WEIGHTS_NAME)
            faults.point("trainer.mid_checkpoint")  # staging half-written, latest unchanged
            if card is not None:
                self._write_card(staging, target, card, step=step, final=final, sha256=sha256)
            fsync_dir(staging)
            if target.exists():
                old = temp_sibling(target, "old")
                os.replace(target, old)
            os.replace(staging, target)
            fsync_dir(self.root)
            st = (target / WEIGHTS_NAME).stat()
            self._sha_cache[target / WEIGHTS_NAME] = ((st.st_ino, st.st_size, st.st_mtime_ns),
                                                      sha256)  # fmt: skip
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        write_atomic(self.root / LATEST_NAME, name + "\n")
        removed = self.rotate(protect)
        log.info("checkpoint written", step=step, path=str(target), final=final,
                 sha256=sha256, rotated_out=[p.name for p in removed])  # fmt: skip
        return SavedCheckpoint(step, target, sha256, final)

    @staticmethod
    def _write_card(staging: Path, target: Path, card: ModelCardFacts, *, step: int, final: bool,
                    sha256: str) -> None:  # fmt: skip
        """The model card, in the staging dir; it names ``target``, where the draft will be."""
        path = staging / CARD_NAME
        try:
            config = json.loads((staging / CONFIG_NAME).read_text())
            facts = dataclasses.replace(card.with_config(config), step=step, final=final,
                                        weights_sha256=sha256)  # fmt: skip
            path.write_text(render_model_card(facts, draft_dir=target), encoding="utf-8")
            fsync_file(path)
        except Exception as exc:  # a card is documentation: never lose a checkpoint over it
            path.unlink(missing_ok=True)
            log.warning("model card not written; the checkpoint is saved without it",
                        step=step, error=repr(exc))  # fmt: skip

    def _is_final(self, step_dir: Path) -> bool:
        try:
            return bool(self.read_state(step_dir).get("final"))
        except (OSError, ValueError):
            return False

    def rotate(self, protect: Collection[int] = ()) -> list[Path]:
        """Delete step dirs beyond the newest ``keep_last``, sparing step 0, final ones, the
        ``best`` one and the ``protect``ed steps (those the evaluator has not scored yet)."""
        dirs = self.step_dirs()
        keep = set(list(dirs)[-self.keep_last :]) | {0} | set(protect)
        spared = {self.latest(), self.best()}
        removed = []
        for step, path in dirs.items():
            if step in keep or path in spared or self._is_final(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            self._sha_cache.pop(path / WEIGHTS_NAME, None)
            removed.append(path)
        return removed
