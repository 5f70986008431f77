"""Helpers shared by the trainer tests (fixtures live in each module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats.js.errors
import torch

from specforge_common.bus import Bus
from specforge_common.contracts import EndOfSplit, SampleRef, TrainSpec, decode
from specforge_common.subjects import RunSubjects, StreamKind

FAST_TRAIN = dict(learning_rate=3e-3, ttt_length=3, warmup_ratio=0.0, checkpoint_every=4,
                  log_every=1, batch_size=2)  # fmt: skip


def train_spec(**over: Any) -> TrainSpec:
    """The tiny-run TrainSpec of ``tests.support.tiny_run_spec`` with some fields changed."""
    return TrainSpec(**(FAST_TRAIN | over))


async def stream_records(bus: Bus, run_id: str, kind: StreamKind, record_type: Any) -> list:
    """Every ``(seq, record)`` stored in one of a run's streams, in order."""
    stream = RunSubjects(run_id).stream(kind)
    info = await bus.js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        out.append((seq, decode(msg.data, record_type, subject=msg.subject)))
    return out


async def drop_end_markers(bus: Bus, run_id: str) -> None:
    """Delete the EndOfSplit markers: the samples log then looks like capture is still running."""
    stream = RunSubjects(run_id).stream("samples")
    for seq, record in await stream_records(bus, run_id, "samples", SampleRef | EndOfSplit):
        if isinstance(record, EndOfSplit):
            await bus.js.delete_msg(stream, seq)


class UpdateRecorder:
    """The learning rate and gradients of every optimizer step, as the optimizer sees them
    (all-reduced, clipped, full tensors under FSDP). Register after ``Trainer.setup``."""

    def __init__(self, trainer: Any) -> None:
        parts = trainer.parts
        self.names = {id(p): n for n, p in parts.draft.named_parameters() if p.requires_grad}
        self.steps: list[tuple[float, dict[str, torch.Tensor]]] = []
        parts.optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[self.names[id(p)]] = grad.detach().clone()
        self.steps.append((float(optimizer.param_groups[0]["lr"]), grads))

    def save(self, directory: Path) -> None:
        """One safetensors file per step, the lr in its metadata (for spawned ranks)."""
        from safetensors.torch import save_file

        for i, (lr, grads) in enumerate(self.steps):
            save_file(grads, directory / f"grads-{i}.safetensors", metadata={"lr": repr(lr)})

    @staticmethod
    def load(directory: Path) -> list[tuple[float, dict[str, torch.Tensor]]]:
        from safetensors import safe_open

        steps = []
        for path in sorted(directory.glob("grads-*.safetensors"),
                           key=lambda p: int(p.stem.split("-")[1])):  # fmt: skip
            with safe_open(path, "pt") as f:
                steps.append((float(f.metadata()["lr"]), {k: f.get_tensor(k) for k in f.keys()}))
        return steps


def adam_directions(steps: list[tuple[float, dict[str, torch.Tensor]]], betas=(0.9, 0.999),
                    eps: float = 1e-8) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Adam's bias-corrected update direction ``m̂ / (√v̂ + eps)`` of every step, in float64."""
    b1, b2 = betas
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    out = []
    for t, (_, grads) in enumerate(steps, start=1):
        directions = {}
        for name, grad in grads.items():
            g = grad.double()
            m[name] = b1 * m.get(name, torch.zeros_like(g)) + (1 - b1) * g
            v[name] = b2 * v.get(name, torch.zeros_like(g)) + (1 - b2) * g * g
            m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
            directions[name] = m_hat / (v_hat.sqrt() + eps)
        out.append(directions)
    return out


def assert_same_training(
    initial: dict[str, torch.Tensor],
    weights: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    steps: tuple[list, list],
    *,
    weight_decay: float = 0.0,
    grad_rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """Two trainings of the same model on the same data, summed in different orders (ranks vs
    one batch, DDP vs FSDP), made the same updates — on any CPU.

    fp32 gradients from different summation orders agree to roundoff, relative to each tensor's
    scale: that is checked to ``grad_rtol``. AdamW then divides by √v, which turns a gradient
    element of ±1e-9 (pure roundoff) into a step of ±lr, so the weights are not compared to a
    fixed tolerance: each run must match an independent float64 AdamW replay of its own recorded
    gradients, and the two runs may differ per element by at most what their update directions
    differ: ``|w_a - w_b| <= sum_t lr_t |u_a,t - u_b,t|`` (decoupled weight decay only shrinks
    the difference). Elements with real gradients have ``u_a ≈ u_b``, so this is tight there.
    """
    steps_a, steps_b = steps
    assert len(steps_a) == len(steps_b) > 0
    assert [lr for lr, _ in steps_a] == [lr for lr, _ in steps_b]
    for (_, grads_a), (_, grads_b) in zip(steps_a, steps_b, strict=True):
        assert grads_a.keys() == grads_b.keys()
        for name, ga in grads_a.items():
            scale = float(ga.abs().max())
            diff = float((ga - grads_b[name]).abs().max())
            assert diff <= grad_rtol * scale + 1e-12, (name, diff, scale)
    directions_a, directions_b = adam_directions(steps_a), adam_directions(steps_b)
    lrs = [lr for lr, _ in steps_a]
    for run, (w, directions) in enumerate(zip(weights, (directions_a, directions_b), strict=True)):
        for name in directions[0]:
            replay = initial[name].double()
            for lr, u in zip(lrs, directions, strict=True):
                replay = replay * (1 - lr * weight_decay) - lr * u[name]
            diff = float((w[name].double() - replay).abs().max())
            assert diff <= atol, (run, name, diff)
    for name in directions_a[0]:
        bound = sum(lr * (a[name] - b[name]).abs()
                    for lr, a, b in zip(lrs, directions_a, directions_b, strict=True))  # fmt: skip
        excess = (weights[0][name].double() - weights[1][name].double()).abs() - bound
        assert float(excess.max()) <= atol, (name, float(excess.max()))
