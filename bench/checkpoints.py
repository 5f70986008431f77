"""Trainer checkpoints on CPU: ``CheckpointManager.save`` and the resume load path, sizes.

Draft of the CPU bench config (as ``bench/train_step.py``: hidden 1024, intermediate 2816, 16/4
heads, target vocab 32000, draft vocab 8000), fp32, frozen embedding not exported, AdamW after
one ``step()`` so its ``exp_avg``/``exp_avg_sq`` exist. A save writes the SGLang-layout draft
(``config.json`` + ``model.safetensors``, checked and written atomically by ``save_draft``),
``trainer_state.json`` and ``training_state.pt`` (optimizer + RNG states), fsyncs them, hashes
the weights, renames the staged dir into place, updates ``latest`` and rotates (``keep_last=2``,
so from the third save on each save also deletes an old step dir, as in training). The load is
what a resume or an evaluator reads: ``load_draft`` + ``torch.load(weights_only=True)`` of the
training state. Baseline, timed in the same run with interleaved repetitions: a plain
``safetensors.torch.save_file`` / ``load_file`` of the same exported weights (no fsync, no
optimizer state, no checks). Ratios are baseline time / our time (higher is better; below 1
means ours is slower, which it must be: it writes ~3x the bytes and fsyncs them). Page cache
warm for loads; medians of ``REPS``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.report import BenchReport
from bench.train_step import CONFIG, bench_draft_config
from specforge_common.durable import sha256_file
from specforge_common.eagle3 import VocabMap, apply_vocab_map, load_draft, save_draft
from specforge_common.models.eagle3 import Eagle3Draft
from specforge_trainer.checkpoints import STATE_NAME, TENSORS_NAME, CheckpointManager

REPS = 5
MIB = 1 << 20


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _setup() -> tuple[Eagle3Draft, torch.Tensor, VocabMap, dict, torch.optim.Optimizer]:
    torch.manual_seed(0)
    c = CONFIG
    draft = Eagle3Draft(bench_draft_config()).float()
    kept = torch.randperm(c["vocab"])[: c["draft_vocab"]].sort().values  # a realistic sparse map
    t2d = torch.zeros(c["vocab"], dtype=torch.bool)
    t2d[kept] = True
    vocab_map = VocabMap(d2t=kept - torch.arange(c["draft_vocab"]), t2d=t2d)
    apply_vocab_map(draft, vocab_map)
    draft.embed_tokens.weight.requires_grad_(False)  # frozen, as in the trainer
    embedding = draft.embed_tokens.weight.detach().clone()
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # creates exp_avg / exp_avg_sq for every parameter
    optimizer.zero_grad(set_to_none=True)
    state = {  # what Trainer._state() hands to save (JSON)
        "run_id": "bench", "data_run": "bench", "rank": 0, "world_size": 1,
        "strategy": "eagle3", "global_step": 1, "samples_consumed": 8, "last_sequence": 8,
        "last_sequence_by_rank": {"0": 8}, "epoch": 0, "epoch_samples": 8, "total_steps": 100,
        "vocab_map_hash": vocab_map.hash(), "run_spec_hash": "0" * 16,
        "metrics": {"loss": 1.0, "acc": 0.5}, "created_at": time.time(),
    }  # fmt: skip
    return draft, embedding, vocab_map, state, optimizer


def _tensors(optimizer: torch.optim.Optimizer) -> dict:
    """What Trainer._tensors() hands to save (``training_state.pt``)."""
    return {"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}


def run() -> BenchReport:
    report = BenchReport("checkpoints")
    draft, embedding, vocab_map, state, optimizer = _setup()
    weights = {k: v.detach().contiguous() for k, v in draft.trainable_state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        manager = CheckpointManager(root / "checkpoints", keep_last=2)
        plain = root / "plain.safetensors"
        parts = root / "parts"
        times: dict[str, list[float]] = {k: [] for k in (
            "save", "plain_save", "load", "plain_load", "save_draft", "torch_save_state",
            "sha256", "load_draft", "torch_load_state")}  # fmt: skip
        saved = root
        for rep in range(REPS):  # interleaved, so drift hits ours and the baseline alike
            tensors = _tensors(optimizer)

            def save(step: int = rep + 1, tensors: dict = tensors) -> None:
                manager.save(draft, step, state, tensors=tensors)

            times["save"].append(_seconds(save))
            saved = manager.latest() or root
            plain.unlink(missing_ok=True)
            times["plain_save"].append(_seconds(lambda: save_file(weights, str(plain))))

            def read_draft(path: Path = saved) -> None:
                load_draft(path, embedding=embedding, vocab_map=vocab_map)

            def read_state(path: Path = saved) -> None:
                torch.load(path / TENSORS_NAME, map_location="cpu", weights_only=True)

            times["load"].append(_seconds(lambda: (read_draft(), read_state())))
            times["plain_load"].append(_seconds(lambda: load_file(str(plain))))
            # where the time goes
            times["load_draft"].append(_seconds(read_draft))
            times["torch_load_state"].append(_seconds(read_state))
            shutil.rmtree(parts, ignore_errors=True)
            times["save_draft"].append(_seconds(lambda: save_draft(draft, parts)))

            def torch_save(tensors: dict = tensors) -> None:
                with open(root / "state.pt", "wb") as file:
                    torch.save(tensors, file)
                    file.flush()
                    os.fsync(file.fileno())

            times["torch_save_state"].append(_seconds(torch_save))
            weights_file = saved / "model.safetensors"
            times["sha256"].append(_seconds(lambda path=weights_file: sha256_file(path)))
        names = ("model.safetensors", TENSORS_NAME, STATE_NAME, "config.json")
        sizes = {name: (saved / name).stat().st_size / MIB for name in names}
        plain_size = plain.stat().st_size / MIB
        kept = sorted(manager.step_dirs())

    med = {k: statistics.median(v) for k, v in times.items()}
    ms = {k: 1000 * v for k, v in med.items()}
    total = sum(sizes.values())
    report.add("save: CheckpointManager.save (draft + training state)", ms["save"], "ms")
    report.add("save throughput", total / med["save"], "MiB/s")
    report.add("load: load_draft + torch.load(training_state.pt)", ms["load"], "ms")
    report.add("load throughput", total / med["load"], "MiB/s")
    report.add("baseline: safetensors save_file of the weights", ms["plain_save"], "ms")
    report.add("baseline: safetensors load_file of the weights", ms["plain_load"], "ms")
    report.add("save part: save_draft (checked, fsynced, atomic)", ms["save_draft"], "ms")
    report.add("save part: torch.save training state + fsync", ms["torch_save_state"], "ms")
    report.add("save part: sha256 of model.safetensors", ms["sha256"], "ms")
    report.add("load part: load_draft", ms["load_draft"], "ms")
    report.add("load part: torch.load training_state.pt", ms["torch_load_state"], "ms")
    for name, mib in sizes.items():
        report.add(f"size: {name}", mib, "MiB")
    report.add("size: step dir total", total, "MiB")
    report.add("size: baseline plain safetensors", plain_size, "MiB")
    report.ratios["save vs plain safetensors save"] = med["plain_save"] / med["save"]
    report.ratios["load vs plain safetensors load"] = med["plain_load"] / med["load"]
    report.notes.append(
        f"draft: hidden {CONFIG['hidden']}, intermediate {CONFIG['intermediate']}, heads "
        f"{CONFIG['heads']}/{CONFIG['kv_heads']}, vocab {CONFIG['vocab']}, draft vocab "
        f"{CONFIG['draft_vocab']}; fp32; {sum(v.numel() for v in weights.values()):,} exported "
        f"parameters; AdamW state after one step; medians of {REPS}, "
        f"{torch.get_num_threads()} torch threads"
    )
    report.notes.append(
        "ours writes weights + optimizer state (~3x the baseline's bytes), fsyncs files and "
        "dirs, hashes the weights and rotates; the baseline writes the weights only, no fsync"
    )
    report.notes.append(
        "load_file (baseline and inside load_draft) maps the file: its pages are read on first "
        "use, so the load times are page-cache-warm setup cost, mostly torch.load's copy of the "
        "optimizer state"
    )
    report.notes.append(f"rotation with keep_last=2 left steps {kept} after {REPS} saves")
    return report
