"""Test helpers shared by service tests: a tiny run spec and a run whose capture already happened.

``seed_captured_run`` does what enqueue + capture do, directly with the library (tiny target,
real store, real bus), so trainer and evaluator tests do not depend on the capture service.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from specforge_common.batch import feature_keys
from specforge_common.bus import Bus
from specforge_common.contracts import (
    DraftSpec,
    EndOfSplit,
    EnqueueSummary,
    RunSpec,
    SampleRef,
    TargetSpec,
    TrainSpec,
)
from specforge_common.eagle3.vocab import TokenCounter, build_vocab_map, stored_tensors
from specforge_common.featurestore import open_store
from specforge_common.subjects import enqueue_key


def tiny_run_spec(
    run_id: str, target_dir: Path, workdir: Path, *, draft_vocab_size: int = 128, **over: Any
) -> RunSpec:
    """A RunSpec for a tiny target: fast on CPU, file store and checkpoints under ``workdir``."""
    fields: dict[str, Any] = dict(
        run_id=run_id,
        target=TargetSpec(path=str(target_dir)),
        draft=DraftSpec(draft_vocab_size=draft_vocab_size),
        train=TrainSpec(
            learning_rate=3e-3,
            ttt_length=3,
            warmup_ratio=0.0,
            checkpoint_every=4,
            log_every=1,
            batch_size=2,
        ),  # fmt: skip
        max_length=64,
        store_uri=f"file://{workdir / 'features'}",
        output_dir=str(workdir / "runs"),
    )
    return RunSpec(**(fields | over))


# A DFlash draft sized for the tiny targets: small blocks, few anchors.
TINY_DFLASH = DraftSpec(strategy="dflash", config={"block_size": 4, "num_anchors": 8})


def sample_id_for(run_id: str, prompt_id: str, spec_hash: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in prompt_id)[:64]
    digest = hashlib.sha256(f"{run_id}:{prompt_id}:{spec_hash}".encode()).hexdigest()[:16]
    return f"{safe}-{digest}"


async def seed_captured_run(
    bus: Bus,
    spec: RunSpec,
    *,
    n_train: int = 8,
    n_eval: int = 4,
    min_len: int = 12,
    max_len: int = 24,
    seed: int = 0,
) -> dict[str, list[SampleRef]]:
    """Store the spec, capture random prompts with the tiny target, publish everything a real
    enqueue + capture would (SampleRefs, vocab map, EnqueueSummary, EndOfSplit markers)."""
    from specforge_common.targets import HFTargetEngine

    subjects = await bus.ensure_streams(spec.run_id)
    await bus.put_run_spec(spec)
    spec_hash = spec.spec_hash()
    engine = HFTargetEngine.from_pretrained(
        spec.target.path, aux_layer_ids=spec.draft.aux_layer_ids, draft_config=spec.draft.config,
        capture_method=spec.capture_method,
    )  # fmt: skip
    keys = feature_keys(spec.capture_method)
    store = open_store(spec.store_uri)
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.info.vocab_size
    counter = TokenCounter()
    refs: dict[str, list[SampleRef]] = {"train": [], "eval": []}
    for i in range(n_train + n_eval):
        split = "train" if i < n_train else "eval"
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        input_ids = torch.randint(0, vocab, (length,), generator=gen)
        loss_mask = torch.zeros(length, dtype=torch.int64)
        loss_mask[length // 3 :] = 1  # the "assistant" part
        out = engine.capture(input_ids[None], torch.ones(1, length, dtype=torch.int64))
        prompt_id = f"p{i}"
        sample_id = sample_id_for(spec.run_id, prompt_id, spec_hash)
        tensors = {
            "input_ids": input_ids, "loss_mask": loss_mask,
            "aux_hidden_states": out.aux_hidden_states[0].clone(),
            "hidden_states": out.hidden_states[0].clone(),
        }  # fmt: skip
        location = store.put(sample_id, {k: tensors[k] for k in keys})
        ref = SampleRef(sample_id=sample_id, run_id=spec.run_id, prompt_id=prompt_id, split=split,
                        producer="seed", features=location, num_tokens=length,
                        run_spec_hash=spec_hash, method=spec.capture_method)  # fmt: skip
        await bus.publish(subjects.samples(split), ref, msg_id=sample_id)
        refs[split].append(ref)
        if split == "train":
            counter.update(input_ids, loss_mask)
    vocab_map = build_vocab_map(counter.counts, vocab, spec.draft_vocab_size(vocab))
    vocab_location = store.put(f"{spec.run_id}-vocab-map",
                               stored_tensors(vocab_map, counter.counts))  # fmt: skip
    summary = EnqueueSummary(
        run_id=spec.run_id,
        sources=["seed"],
        train=n_train,
        eval=n_eval,
        skipped=0,
        vocab_map=vocab_location,
        vocab_map_hash=vocab_map.hash(),
        tokens_counted=counter.num_tokens,
        run_spec_hash=spec_hash,
    )
    await bus.put_record(enqueue_key(spec.run_id), summary, create_only=True)
    for split in ("train", "eval"):
        marker = EndOfSplit(
            run_id=spec.run_id,
            split=split,
            producer="seed",
            samples_published=len(refs[split]),
            run_spec_hash=spec_hash,
        )
        await bus.publish(subjects.samples(split), marker, msg_id=f"end:{spec.run_id}:{split}")
    return refs


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``log_dir``, as TensorBoard itself reads
    them: ``{tag: [(step, value), ...]}`` in step order (needs the ``tensorboard`` package)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: sorted((e.step, e.value) for e in events.Scalars(tag))
        for tag in events.Tags()["scalars"]
    }
