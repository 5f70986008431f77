"""DDP over NCCL at world size 1 and FSDP2 on one device: a training step runs, is checkpointed
and resumes to the same next step.

One process joins a one-rank group (``backend_for``: NCCL on CUDA, gloo in smoke mode) through a
file store in a temp dir: no port. The trainer's pieces do the work: ``DraftModule`` wrapped in
``DistributedDataParallel`` (``device_ids`` = this GPU), or ``shard_draft`` (FSDP2
``fully_shard``), AdamW and clipping as the trainer sets them, the checkpoint written by
``CheckpointManager.save`` (for FSDP through ``full_state`` into an unsharded CPU copy, as
rank 0 exports) and restored the way ``Checkpointer._restore`` does (``load_full_state`` under
FSDP). Per wrapper:

1. run A (seed 0): step 1, checkpoint, step 2;
2. run B (seed 5, so its own weights differ): restore the checkpoint (must equal A's weights
   exactly), step 2 on the same batch.

B's step 2 must match A's: loss within 1e-3 relative, and B's weight update within 1% of A's
(max |w_A - w_B| <= 0.01 max |w_A - w_ckpt|): CUDA kernels may add in another order, so
bit-equality is reported but not required.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.eagle3_step import (
    DraftDims,
    adamw,
    clip,
    make_strategy,
    random_batch,
    random_draft,
    random_head,
    trainer_options,
)
from bench.gpu.part import Context, main

DIMS = DraftDims(
    hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000, draft_vocab=8000
)
SMOKE_DIMS = DraftDims(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, draft_vocab=256)
LENGTH, SMOKE_LENGTH, TTT = 512, 32, 7
LOSS_RTOL, UPDATE_RTOL = 1e-3, 1e-2


class Run:
    """One wrapped draft with its optimizer, built as ``specforge_trainer.build`` does."""

    def __init__(self, ctx: Context, parallel: str, dims: DraftDims, seed: int) -> None:
        from specforge_trainer.distributed import DraftModule, shard_draft

        device = ctx.device
        self.cuda = device.type == "cuda"
        self.fsdp = parallel == "fsdp"
        self.draft = random_draft(dims, device, seed=seed)
        head = random_head(dims, device, ctx.lowp)
        strategy, self.dropped = make_strategy(self.draft, head, TTT, trainer_options(device))
        module = DraftModule(self.draft, strategy)
        self.export = copy.deepcopy(self.draft).cpu() if self.fsdp else None
        if self.fsdp:
            self.compute: torch.nn.Module = shard_draft(module)
        else:
            ids = [device.index] if self.cuda else None
            self.compute = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params)

    def step(self, batch) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):  # as the trainer
            loss, _metrics, _weight = self.compute(batch)
        loss.backward()
        clip(self.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def weights(self) -> dict[str, torch.Tensor]:
        """The full trainable weights on the CPU (a collective under FSDP)."""
        from specforge_trainer.distributed import full_state

        if self.fsdp:
            full, _ = full_state(self.compute, self.optimizer)
        else:
            full = self.draft.state_dict()
        keys = (
            self.export.trainable_state_dict() if self.export else self.draft.trainable_state_dict()
        )
        return {k: full[k].detach().float().cpu().clone() for k in keys}

    def save(self, manager, step: int) -> None:
        """What ``Checkpointer.save`` writes: the exported draft and the optimizer state."""
        from specforge_trainer.distributed import full_state

        if self.fsdp:
            weights, optim = full_state(self.compute, self.optimizer)
            assert self.export is not None
            self.export.load_state_dict(weights, strict=False)
            draft = self.export
        else:
            draft, optim = self.draft, self.optimizer.state_dict()
        manager.save(
            draft, step, {"parallel": "fsdp" if self.fsdp else "ddp"}, tensors={"optimizer": optim}
        )

    def restore(self, step_dir: Path, manager) -> None:
        """What ``Checkpointer._restore`` loads."""
        from safetensors.torch import load_file

        from specforge_common.eagle3.layout import WEIGHTS_NAME
        from specforge_trainer.distributed import load_full_state

        tensors = manager.read_tensors(step_dir)
        weights = load_file(step_dir / WEIGHTS_NAME)
        if self.fsdp:
            load_full_state(self.compute, self.optimizer, weights, tensors["optimizer"])
        else:
            with torch.no_grad():
                self.draft.load_state_dict(weights, strict=False)
            self.optimizer.load_state_dict(tensors["optimizer"])


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def step_and_resume(ctx: Context, parallel: str, root: Path) -> dict[str, Any]:
    from specforge_trainer.checkpoints import CheckpointManager

    dims = SMOKE_DIMS if ctx.smoke else DIMS
    length = SMOKE_LENGTH if ctx.smoke else LENGTH
    batches = [random_batch(dims, length, ctx.device, ctx.lowp, seed=s) for s in (11, 12)]
    manager = CheckpointManager(root / parallel, keep_last=2)
    first = Run(ctx, parallel, dims, seed=0)
    loss_1 = first.step(batches[0])
    first.save(manager, 1)
    saved = first.weights()
    loss_a = first.step(batches[1])
    continued = first.weights()
    del first

    resumed = Run(ctx, parallel, dims, seed=5)
    step_dir = manager.latest()
    assert step_dir is not None and step_dir.name.endswith("1"), step_dir
    resumed.restore(step_dir, manager)
    loaded = resumed.weights()
    loss_b = resumed.step(batches[1])
    after = resumed.weights()
    update = _max_diff(continued, saved)
    return {
        "dims": vars(dims),
        "length": length,
        "dropped_options": resumed.dropped,
        "loss_step_1": loss_1,
        "loss_step_2_continued": loss_a,
        "loss_step_2_resumed": loss_b,
        "restored_weights_max_diff": _max_diff(loaded, saved),
        "step_2_update_max": update,
        "resumed_vs_continued_max_diff": _max_diff(after, continued),
        "bit_identical": _max_diff(after, continued) == 0.0,
    }


def run(ctx: Context) -> None:
    from specforge_trainer.distributed import backend_for

    backend = backend_for(ctx.device)
    ctx.metric("backend", backend)
    with tempfile.TemporaryDirectory(prefix="gpu-check-dist-") as tmp:
        store = dist.FileStore(str(Path(tmp) / "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        try:
            for parallel in ("ddp", "fsdp"):
                name = f"{parallel.upper()} ({backend}, world size 1)"
                try:
                    result = step_and_resume(ctx, parallel, Path(tmp))
                except Exception as exc:  # the other wrapper still gets its check
                    ctx.metric(parallel, {"error": f"{type(exc).__name__}: {exc}"})
                    ctx.must(
                        f"{name}: step runs and resumes",
                        0.0,
                        "==",
                        1,
                        note=f"{type(exc).__name__}: {exc}"[:300],
                    )
                    ctx.save()
                    continue
                ctx.metric(parallel, result)
                print(f"distributed {name}: {result}", flush=True)
                loss_gap = abs(result["loss_step_2_resumed"] - result["loss_step_2_continued"])
                ok = (
                    result["restored_weights_max_diff"] == 0.0
                    and result["step_2_update_max"] > 0
                    and loss_gap <= LOSS_RTOL * abs(result["loss_step_2_continued"])
                    and result["resumed_vs_continued_max_diff"]
                    <= UPDATE_RTOL * result["step_2_update_max"]
                )
                ctx.must(
                    f"{name}: step runs and resumes",
                    float(ok),
                    "==",
                    1,
                    note=f"bit-identical: {result['bit_identical']}",
                )
                ctx.save()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main("distributed", run))
