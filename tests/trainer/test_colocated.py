"""Colocated == disaggregated: the in-process path (``LocalBus`` + ``mem://``) and the service
path (nats-server + ``file://``, or ``mooncake://`` on a real master + holder) train the same
draft from the same samples.

Both runs get the same captured samples (same tiny target, same seed) in the same order. They
must form the same batches (same prompts, bit-identical tensors), log the same loss at every
optimizer step and end with bit-identical weights after 3 steps.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from specforge_common.bus import Bus, LocalBus
from specforge_common.contracts import DraftSpec
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.featurestore import open_store
from specforge_common.step_log import trained_samples_path
from specforge_common.targets import make_tiny_target
from specforge_trainer.loop import Trainer
from tests.mooncake_support import mooncake_master, mooncake_uri  # noqa: F401 - fixture
from tests.support import TINY_DFLASH, seed_captured_run, tiny_run_spec
from tests.trainer import train_spec

STEPS = 3


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


async def train_three_steps(bus, spec):
    refs = await seed_captured_run(bus, spec, n_train=2 * STEPS + 1, n_eval=2, seed=7)
    trainer = Trainer(bus, spec.run_id)
    result = await trainer.run()
    prompt_of = {r.sample_id: r.prompt_id for r in refs["train"]}
    location_of = {r.sample_id: r.features for r in refs["train"]}
    store = open_store(spec.store_uri)
    steps = []
    path = trained_samples_path(spec.output_dir, spec.run_id)
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        tensors = [store.get(location_of[s]) for s in entry["samples"]]
        steps.append(([prompt_of[s] for s in entry["samples"]], tensors))
    weights = load_file(result.final.path / WEIGHTS_NAME)
    return result, steps, weights


@pytest.mark.parametrize(
    ("service_store", "algorithm"), [("file", "eagle3"), ("mooncake", "eagle3"), ("file", "dflash")]
)
async def test_in_process_and_service_paths_train_the_same_draft(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, service_store: str, algorithm: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    train = train_spec(total_steps=STEPS, checkpoint_every=100)
    draft = {"dflash": TINY_DFLASH}.get(algorithm, DraftSpec(draft_vocab_size=128))
    service_spec = tiny_run_spec(run_id, target, tmp_path / "service", train=train, draft=draft)
    if service_store == "mooncake":
        uri = mooncake_uri(request.getfixturevalue("mooncake_master"))
        service_spec = msgspec.structs.replace(service_spec, store_uri=uri)
    colocated_spec = tiny_run_spec(
        run_id, target, tmp_path / "colocated", train=train, draft=draft,
        store_uri=f"mem://colocated-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    assert service_spec.store_uri.startswith(f"{service_store}://")

    service, service_steps, service_weights = await train_three_steps(bus, service_spec)
    async with LocalBus() as local:
        colocated, colocated_steps, colocated_weights = await train_three_steps(
            local, colocated_spec
        )

    assert service.step == colocated.step == STEPS
    assert len(service_steps) == len(colocated_steps) == STEPS
    for (prompts_a, tensors_a), (prompts_b, tensors_b) in zip(
        service_steps, colocated_steps, strict=True
    ):
        assert prompts_a == prompts_b and len(prompts_a) == service_spec.train.batch_size
        for a, b in zip(tensors_a, tensors_b, strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    losses_a = [h["loss"] for h in service.history]
    losses_b = [h["loss"] for h in colocated.history]
    assert len(losses_a) == STEPS and losses_a == losses_b  # log_every=1: one per step
    assert service_weights.keys() == colocated_weights.keys()
    assert all(torch.equal(service_weights[k], colocated_weights[k]) for k in service_weights)
    # and training did something: the weights moved away from the step-0 draft
    step0 = load_file(service.checkpoints[0].path / WEIGHTS_NAME)
    assert any(not torch.equal(step0[k], service_weights[k]) for k in step0)
