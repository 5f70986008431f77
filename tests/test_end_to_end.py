"""The product end to end: `specforge run` starts capture x2, trainer and evaluator as separate
OS processes against a real nats-server; the test then reads what they left on the bus and disk.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from specforge_common.batch import sample_seed
from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent, EndOfSplit, EvalResult
from specforge_common.drafts import algorithm_of_draft, load_any_draft
from specforge_common.featurestore import open_store
from specforge_common.strategies import STRATEGIES
from specforge_common.targets.head import load_embedding, load_lm_head
from specforge_common.targets.tiny import make_tiny_target
from specforge_evaluator.offline import evaluate_strategy
from tests.mooncake_support import needs_mooncake
from tests.support import sample_id_for

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def write_dataset(path: Path, n: int) -> list[str]:
    """Conversations with a learnable pattern: the assistant repeats the user's words in order."""
    ids = []
    with path.open("w") as out:
        for i in range(n):
            words = [WORDS[(i + j) % len(WORDS)] for j in range(6)]
            record = {"id": f"conv-{i}", "conversations": [
                {"role": "user", "content": "repeat: " + " ".join(words)},
                {"role": "assistant", "content": " ".join(words) + " " + " ".join(words)},
            ]}  # fmt: skip
            out.write(json.dumps(record) + "\n")
            ids.append(f"conv-{i}")
    return ids


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "tiny", arch="llama", seed=0)


def write_config(path: Path, target: Path) -> Path:
    path.write_text(f"""
max_length = 64
eval_fraction = 0.25
[target]
path = "{target}"
[draft]
draft_vocab_size = 128
[train]
ttt_length = 3
learning_rate = 3e-3
warmup_ratio = 0.0
batch_size = 2
epochs = 4
checkpoint_every = 8
log_every = 2
[capture]
batch_size = 4
[eval]
max_samples = 10
""")
    return path


# Per algorithm, the overrides that size its draft for the tiny target.
ALGORITHMS = {
    "eagle3": [],
    "dflash": ["strategy=dflash", "draft.config.block_size=4", "draft.config.num_anchors=16"],
    "domino": ["strategy=domino", "draft.config.block_size=4", "draft.config.num_anchors=16",
               "draft.config.gru_hidden_dim=32", "draft.config.correction_dim=32"],
}  # fmt: skip


# Domino runs DFlash's services path with a GRU on top: its run is in --runslow to keep make test
# inside its time budget (tests/common/dflash/ and the block-decoding tests cover Domino itself).
@pytest.mark.parametrize(
    "algorithm",
    [pytest.param(a, marks=pytest.mark.slow) if a == "domino" else a for a in sorted(ALGORITHMS)],
)
async def test_specforge_run_end_to_end(
    tmp_path: Path, tiny_target: Path, nats_server, bus: Bus, run_id: str, algorithm: str
) -> None:
    data = tmp_path / "conversations.jsonl"
    prompt_ids = write_dataset(data, 40)
    config = write_config(tmp_path / "run.toml", tiny_target)
    command = [sys.executable, "-m", "specforge_cli", "run", "--config", str(config),
               "--run", run_id, "--source", str(data), "--limit", "100",
               "--workdir", str(tmp_path / "work"), "--captures", "2",
               "--no-embedded", "--nats", nats_server.url]  # fmt: skip
    for override in ALGORITHMS[algorithm]:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    spec = await bus.get_run_spec(run_id)
    assert spec is not None and spec.draft.strategy == algorithm

    # Every prompt became exactly one SampleRef, with the deterministic id.
    refs = {"train": [], "eval": []}
    for split in refs:
        async for _, record in bus.replay(run_id, split):
            if not isinstance(record, EndOfSplit):
                refs[split].append(record)
    all_refs = refs["train"] + refs["eval"]
    assert sorted(r.prompt_id for r in all_refs) == sorted(prompt_ids)
    assert {r.sample_id for r in all_refs} == {
        sample_id_for(run_id, p, spec.spec_hash()) for p in prompt_ids
    }
    assert refs["eval"], "the eval split should not be empty"
    assert {r.producer for r in all_refs} <= {"capture-0", "capture-1"}
    assert {r.method for r in all_refs} == {spec.capture_method}
    assert await bus.stream_depth(run_id, "prompts") == 0

    # Every checkpoint got an EvalResult; training helped on the held-out split.
    checkpoints = [r async for _, r in bus.records(run_id, "checkpoints", CheckpointEvent)]
    evals = {r.step: r async for _, r in bus.records(run_id, "evals", EvalResult)}
    assert [c.step for c in checkpoints][0] == 0 and checkpoints[-1].final
    assert sorted(evals) == sorted(c.step for c in checkpoints)
    first, last = evals[0], evals[checkpoints[-1].step]
    assert last.metrics["eval/loss"] < first.metrics["eval/loss"]
    assert last.simulated_acceptance_length > first.simulated_acceptance_length
    for r in evals.values():  # both conventions on every checkpoint, from real decoding
        assert r.lossless is True and r.serving_acceptance_length >= 1.0
        assert r.simulated_acceptance_length is not None
    report = Path(spec.output_dir) / run_id / "report"
    assert f"report   {report / 'index.html'}" in done.stdout
    html = (report / "index.html").read_text()
    for png in ("loss.png", "acceptance_per_position.png", "acceptance_length.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in html

    # The exported drafts load back in the SGLang layout of their algorithm, and the training
    # loss on the train samples (same data, same batching) is lower at the end than at the start.
    embedding, head = load_embedding(tiny_target).float(), load_lm_head(tiny_target).float()
    store = open_store(spec.store_uri)
    train_samples = [store.get(r.features) for r in refs["train"]]
    seeds = [sample_seed(spec.seed, r.prompt_id, 0) for r in refs["train"]]
    losses = []
    for event in (checkpoints[0], checkpoints[-1]):
        assert algorithm_of_draft(event.checkpoint_uri) == algorithm
        draft = load_any_draft(event.checkpoint_uri, embedding=embedding)
        if algorithm == "eagle3":
            assert draft.config.draft_vocab_size == 128
        strategy = STRATEGIES.get(algorithm).from_spec(
            spec, draft, target_head=head, target_embedding=embedding, total_steps=event.step + 1
        )
        metrics = evaluate_strategy(strategy, draft, train_samples, batch_size=2, seeds=seeds)
        losses.append(metrics.summary()["loss"])
    assert losses[1] < losses[0]
    assert "exported draft" in done.stdout


def test_specforge_run_colocated(tmp_path: Path, tiny_target: Path, run_id: str) -> None:
    """The same run in one process: in-process bus, mem:// store, no nats-server at all."""
    data = tmp_path / "conversations.jsonl"
    prompt_ids = write_dataset(data, 40)
    config = write_config(tmp_path / "run.toml", tiny_target)
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "specforge_cli", "run", "--colocated",
               "--config", str(config), "--run", run_id, "--source", str(data),
               "--limit", "100", "--workdir", str(workdir)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    run_dir = workdir / run_id
    assert not (run_dir / "jetstream").exists() and not (run_dir / "features").exists()
    checkpoints = run_dir / "checkpoints"
    final = checkpoints / (checkpoints / "latest").read_text().strip()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["final"]
    trained = [json.loads(line) for line in (run_dir / "trained_samples.jsonl").open()]
    seen = {s for entry in trained for s in entry["samples"]}
    # 4 epochs over the train split: every train prompt trained on, each 4 times
    assert len(seen) == state["samples_consumed"] // 4
    assert 0 < len(seen) < len(prompt_ids)
    assert "is better than the untrained one" in done.stdout
    assert f"exported draft (SGLang layout): {final}" in done.stdout
    assert (run_dir / "report" / "acceptance_length.png").is_file()
    assert "LOSSLESSNESS FAILED" not in done.stdout


@needs_mooncake
async def test_specforge_run_on_an_embedded_mooncake_store(
    tmp_path: Path, tiny_target: Path, nats_server, bus: Bus, run_id: str
) -> None:
    """``--set store_uri=mooncake://auto``: the run starts its own Mooncake master + holder, the
    services move features through it, consume-once training empties it of train samples, and
    both processes are gone when the run ends."""
    data = tmp_path / "conversations.jsonl"
    write_dataset(data, 40)
    config = write_config(tmp_path / "run.toml", tiny_target)
    command = [sys.executable, "-m", "specforge_cli", "run", "--config", str(config),
               "--run", run_id, "--source", str(data), "--limit", "100",
               "--workdir", str(tmp_path / "work"), "--no-embedded", "--nats", nats_server.url,
               "--set", "store_uri=mooncake://auto?holder=256MiB",
               "--set", "train.epochs=1", "--set", "train.consume_features=true"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    spec = await bus.get_run_spec(run_id)
    master = urlsplit(spec.store_uri)
    assert master.scheme == "mooncake" and master.hostname == "127.0.0.1" and master.port
    refs = [r async for _, r in bus.replay(run_id, "train") if not isinstance(r, EndOfSplit)]
    assert refs and all(r.features.uri.startswith("mooncake:") for r in refs)
    checkpoints = [r async for _, r in bus.records(run_id, "checkpoints", CheckpointEvent)]
    evals = {r.step: r async for _, r in bus.records(run_id, "evals", EvalResult)}
    assert checkpoints[-1].final and sorted(evals) == [c.step for c in checkpoints]
    first, last = evals[0], evals[checkpoints[-1].step]
    assert last.metrics["eval/loss"] < first.metrics["eval/loss"]
    assert all(r.lossless is True for r in evals.values())
    # Consume-once: every train sample's features were removed after a checkpoint covered it.
    trainer_log = tmp_path / "work" / run_id / "logs" / "trainer.log"
    removed = [json.loads(line) for line in trainer_log.read_text().splitlines()
               if '"consumed features removed"' in line]  # fmt: skip
    assert sum(entry["removed"] for entry in removed) == len(refs)
    assert sum(entry["bytes"] for entry in removed) == sum(r.features.nbytes for r in refs)
    # The embedded master and holder stopped with the run.
    assert "embedded mooncake store stopped" in done.stdout + done.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", master.port), timeout=2).close()
