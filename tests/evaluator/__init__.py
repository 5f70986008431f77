"""Helpers of the evaluator tests: drafts for a seeded run, checkpoints and their events.

The trainer is not used here: the tests build, (over)train and save drafts with the library and
publish the CheckpointEvents a trainer would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from specforge_common.batch import collate
from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent, EnqueueSummary, RunSpec, decode
from specforge_common.eagle3 import Eagle3Strategy, VocabMap, apply_vocab_map, save_draft
from specforge_common.featurestore import open_store
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft
from specforge_common.subjects import RunSubjects, StreamKind, enqueue_key
from specforge_common.targets import load_embedding, load_lm_head, resolve_aux_layer_ids


async def vocab_map_of_run(bus: Bus, spec: RunSpec) -> VocabMap:
    summary = await bus.get_record(enqueue_key(spec.run_id), EnqueueSummary)
    assert summary is not None and summary.vocab_map is not None
    tensors = open_store(spec.store_uri).get(summary.vocab_map)
    return VocabMap(d2t=tensors["d2t"], t2d=tensors["t2d"])


def build_draft(spec: RunSpec, vocab_map: VocabMap, *, seed: int = 0) -> Eagle3Draft:
    """An untrained fp32 draft for the run's target, with the target embedding and the map."""
    target_config = json.loads((Path(spec.target.path) / "config.json").read_text())
    aux = resolve_aux_layer_ids(spec.draft.aux_layer_ids, None, target_config["num_hidden_layers"])
    config = Eagle3Config.from_target(
        target_config, draft_vocab_size=spec.draft.draft_vocab_size, aux_layer_ids=aux
    )
    torch.manual_seed(seed)
    draft = Eagle3Draft(config).float()
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(load_embedding(spec.target.path))
    apply_vocab_map(draft, vocab_map)
    return draft


def overfit(
    draft: Eagle3Draft,
    samples: list[dict[str, torch.Tensor]],
    spec: RunSpec,
    *,
    steps: int = 30,
    lr: float = 1e-2,
) -> Eagle3Draft:
    """A few full-batch Adam steps on ``samples`` (the eval samples themselves, on purpose)."""
    head = load_lm_head(spec.target.path).float()
    strategy = Eagle3Strategy(draft, head, ttt_length=spec.train.ttt_length)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    batch = collate(samples)
    draft.train()
    for _ in range(steps):
        optimizer.zero_grad()
        strategy(batch).loss.backward()
        optimizer.step()
    draft.eval()
    return draft


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def publish_checkpoint(
    bus: Bus,
    spec: RunSpec,
    draft: Eagle3Draft,
    step: int,
    *,
    final: bool = False,
    **override: Any,
) -> CheckpointEvent:
    """Save ``draft`` where the trainer would and publish its CheckpointEvent (``override``
    replaces event fields, e.g. a wrong sha)."""
    out = Path(spec.output_dir) / spec.run_id / "checkpoints" / f"step-{step:08d}"
    save_draft(draft, out)
    fields: dict[str, Any] = dict(
        run_id=spec.run_id,
        step=step,
        final=final,
        samples_consumed=step * spec.train.batch_size,
        last_sequence={0: step},
        checkpoint_uri=str(out.absolute()),
        checkpoint_sha256=sha256_of(out / "model.safetensors"),
        metrics={"loss": 1.0},
        run_spec_hash=spec.spec_hash(),
    )
    event = CheckpointEvent(**(fields | override))
    await bus.publish(
        RunSubjects(spec.run_id).checkpoints, event, msg_id=f"ckpt:{spec.run_id}:{step}"
    )
    return event


async def read_stream(bus: Bus, run_id: str, kind: StreamKind, record_type: Any) -> list[Any]:
    """Every record on one of the run's streams, in order (without consuming anything)."""
    stream = RunSubjects(run_id).stream(kind)
    info = await bus.js.stream_info(stream)
    out = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg(stream, seq)
        out.append(decode(msg.data, record_type, subject=msg.subject))
    return out


def eval_samples(spec: RunSpec, refs: list) -> list[dict[str, torch.Tensor]]:
    store = open_store(spec.store_uri)
    return [dict(store.get(ref.features)) for ref in refs]
