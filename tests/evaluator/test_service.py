"""The evaluator service against a real nats-server, a real file store and a seeded capture."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from specforge_common.contracts import DeadLetter, EvalResult, EvalSpec
from specforge_common.durable import sha256_file
from specforge_common.eagle3 import load_draft
from specforge_common.featurestore import open_store
from specforge_common.model_card import (
    CARD_NAME,
    ModelCardFacts,
    read_card_facts,
    recommend_chain_length,
    render_model_card,
)
from specforge_common.targets import load_embedding, load_lm_head, make_tiny_target
from specforge_evaluator import service as service_module
from specforge_evaluator.offline import evaluate_draft
from specforge_evaluator.service import DURABLE, Evaluator
from tests.evaluator import (
    build_draft,
    eval_samples,
    overfit,
    publish_checkpoint,
    read_stream,
    vocab_map_of_run,
)
from tests.support import seed_captured_run, tiny_run_spec

K = 3  # tiny_run_spec's ttt_length


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)


def evaluator(bus, spec, **kw) -> Evaluator:
    return Evaluator(bus, spec, open_store(spec.store_uri),
                     fetch_timeout=0.2, **kw)  # fmt: skip


async def test_evaluates_each_checkpoint_and_exits_after_the_final_one(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target_dir, tmp_path)
    await bus.ensure_streams(run_id)
    # Started before capture produced anything: it must wait for the eval split.
    service = evaluator(bus, spec, exit_when_final=True)
    task = asyncio.create_task(service.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    refs = await seed_captured_run(bus, spec, n_train=4, n_eval=5)
    samples = eval_samples(spec, refs["eval"])
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    untrained = await publish_checkpoint(bus, spec, draft, 0)
    trained = await publish_checkpoint(bus, spec, overfit(draft, samples, spec), 8, final=True)

    report = await asyncio.wait_for(task, timeout=30)
    assert report.evaluated == [0, 8] and report.final_evaluated and not report.dead_lettered

    results = await read_stream(bus, run_id, "evals", EvalResult)
    assert [(r.step, r.checkpoint_sha256) for r in results] == [
        (0, untrained.checkpoint_sha256),
        (8, trained.checkpoint_sha256),
    ]
    first, last = results
    for r in results:
        assert len(r.acceptance_rates) == K
        assert r.run_spec_hash == spec.spec_hash()
        assert set(r.wall_seconds) == {"load", "offline", "serving"}
        # real speculative decoding on the eval prompts: lossless, >= 1 token per verification
        assert r.lossless is True and r.serving_acceptance_length >= 1.0
        assert len(r.serving_acceptance_rates) == spec.eval.num_draft_tokens
        assert r.metrics["serving/prompts"] == 5 and r.metrics["k"] == spec.eval.num_draft_tokens
        assert r.metrics["speedup"] > 0 and r.metrics["tokens_per_s_target"] > 0
        m, sal = r.metrics, r.serving_acceptance_length
        assert m["ideal_speedup"] == pytest.approx(
            sal * m["plain_step_ms"] / (m["verify_ms_per_step"] + m["k"] * m["draft_ms_per_token"])
        )
        assert 0 < m["speedup_vs_ideal"] < 1.5
        assert r.metrics["eval/samples"] == 5 and r.metrics["eval/samples_skipped"] == 0
        assert {"eval/acc_0", "eval/loss", "eval/simulated_acc_len"} <= set(r.metrics)
        assert r.metrics["eval/acc_0"] == r.acceptance_rates[0]
    assert last.acceptance_rates[0] > first.acceptance_rates[0]
    assert last.simulated_acceptance_length > first.simulated_acceptance_length
    shown = {f.label: f.value for f in report.figures()}  # what a live progress bar shows
    assert shown["evaluated"] == 2 and shown["last step"] == 8
    assert shown["accept-len"] == last.simulated_acceptance_length

    # The published numbers are the offline metrics of the checkpoint as stored.
    stored = load_draft(trained.checkpoint_uri, embedding=load_embedding(target_dir))
    direct = evaluate_draft(stored, load_lm_head(target_dir).float(), samples, ttt_length=K,
                            batch_size=spec.eval.batch_size)  # fmt: skip
    assert last.acceptance_rates == direct.accuracies()
    assert last.simulated_acceptance_length == pytest.approx(direct.simulated_acceptance_length())

    lag = await bus.consumer_lag(run_id, "checkpoints", DURABLE)
    assert lag.num_pending == 0 and lag.num_ack_pending == 0

    # A restarted evaluator finds the final checkpoint settled and exits without waiting.
    again = await asyncio.wait_for(evaluator(bus, spec, exit_when_final=True).run(), timeout=10)
    assert again.evaluated == [] and len(await read_stream(bus, run_id, "evals", EvalResult)) == 2


async def test_bad_events_are_dead_lettered_and_the_next_one_is_evaluated(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target_dir, tmp_path, eval=EvalSpec(max_samples=2, batch_size=2))
    refs = await seed_captured_run(bus, spec, n_train=4, n_eval=4)
    open_store(spec.store_uri).delete(refs["eval"][0].features)  # lost: skipped, not fatal
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 4, checkpoint_sha256="0" * 64)
    await publish_checkpoint(bus, spec, draft, 6, run_spec_hash="not-this-spec")
    good = await publish_checkpoint(bus, spec, draft, 8, final=True)

    report = await asyncio.wait_for(evaluator(bus, spec, exit_when_final=True).run(), timeout=30)
    assert report.evaluated == [8] and report.dead_lettered == [4, 6]

    letters = await read_stream(bus, run_id, "dlq", DeadLetter)
    assert [letter.service for letter in letters] == ["evaluator", "evaluator"]
    assert "sha256" in letters[0].reason and "0" * 64 in letters[0].reason
    assert "not-this-spec" in letters[1].reason
    results = await read_stream(bus, run_id, "evals", EvalResult)
    assert [(r.step, r.checkpoint_sha256) for r in results] == [(8, good.checkpoint_sha256)]
    assert results[0].metrics["eval/samples"] == 2  # max_samples stops before the marker
    assert results[0].metrics["eval/samples_skipped"] == 1
    lag = await bus.consumer_lag(run_id, "checkpoints", DURABLE)
    assert lag.num_pending == 0 and lag.num_ack_pending == 0


async def test_empty_eval_split_publishes_no_rates_and_stop_returns(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target_dir, tmp_path)
    await seed_captured_run(bus, spec, n_train=4, n_eval=0)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    service = evaluator(bus, spec)  # no exit_when_final: runs until stopped
    task = asyncio.create_task(service.run())
    await publish_checkpoint(bus, spec, draft, 0)
    for _ in range(100):
        if await bus.stream_depth(run_id, "evals"):
            break
        await asyncio.sleep(0.1)
    service.stop()
    report = await asyncio.wait_for(task, timeout=5)
    assert report.evaluated == [0] and report.final_step is None

    (result,) = await read_stream(bus, run_id, "evals", EvalResult)
    assert result.acceptance_rates == [] and result.simulated_acceptance_length is None
    assert result.metrics["eval/samples"] == 0 and result.metrics["eval/no_data"] == 1
    assert not any(k.startswith("eval/acc") for k in result.metrics)


async def test_each_evaluated_checkpoint_gets_its_model_card_filled_in_and_keeps_its_weights(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target_dir, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=4, n_eval=3)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    # step 0: a bare export, no card: the evaluator writes one from the spec and the event
    bare = await publish_checkpoint(bus, spec, draft, 0)
    # step 4: the card a trainer writes, with what only the trainer knows (tokens, sources)
    trained = overfit(draft, eval_samples(spec, refs["eval"]), spec, steps=10)
    carded = await publish_checkpoint(bus, spec, trained, 4)
    carded_dir = Path(carded.checkpoint_uri)
    config = json.loads((carded_dir / "config.json").read_text())
    facts = ModelCardFacts.from_spec(
        spec, step=4, final=False, samples_trained=8, tokens_trained=4321, sources=["seed"],
        weights_sha256=carded.checkpoint_sha256, config=config,
    )  # fmt: skip
    (carded_dir / CARD_NAME).write_text(render_model_card(facts, draft_dir=carded_dir))
    # step 8: a card describing other weights (its dir was replaced): left as it is
    other = await publish_checkpoint(bus, spec, trained, 8, final=True)
    other_dir = Path(other.checkpoint_uri)
    stale = ModelCardFacts.from_spec(spec, step=8, final=True, weights_sha256="0" * 64)
    stale_text = render_model_card(stale, draft_dir=other_dir)
    (other_dir / CARD_NAME).write_text(stale_text)

    report = await asyncio.wait_for(evaluator(bus, spec, exit_when_final=True).run(), timeout=60)
    assert report.evaluated == [0, 4, 8] and not report.dead_lettered
    results = {r.step: r for r in await read_stream(bus, run_id, "evals", EvalResult)}

    for event in (bare, carded):
        step_dir = Path(event.checkpoint_uri)
        r = results[event.step]
        text = (step_dir / CARD_NAME).read_text()
        # the measured numbers of the published EvalResult, each convention with its definition
        assert r.serving_acceptance_length is not None and r.serving_acceptance_length >= 1.0
        assert f"**Serving acceptance length: {r.serving_acceptance_length:.3f}** — " in text
        assert f"**Simulated acceptance length: {r.simulated_acceptance_length:.4f}** — " in text
        assert "bonus token included" in text and "no bonus token" in text
        assert "Not evaluated yet" not in text and "Lossless: yes" in text
        assert f"speedup {r.metrics['speedup']:.2f}x" in text
        cpus, threads = os.cpu_count(), torch.get_num_threads()
        assert (f"{cpus} CPU{'s' * (cpus != 1)}, "
                f"{threads} torch thread{'s' * (threads != 1)}, device cpu") in text  # fmt: skip
        k = recommend_chain_length(r).k
        command = (
            f"--speculative-draft-model-path {step_dir} --speculative-num-steps {k} "
            f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}"
        )
        assert command in text
        # the card is not the weights: their sha256 is the announced and the scored one
        assert sha256_file(step_dir / "model.safetensors") == event.checkpoint_sha256
        assert r.checkpoint_sha256 == event.checkpoint_sha256
        card = read_card_facts(step_dir)
        assert card is not None and card.weights_sha256 == event.checkpoint_sha256
    assert read_card_facts(Path(bare.checkpoint_uri)).samples_trained == bare.samples_consumed
    kept = read_card_facts(carded_dir)
    assert kept.tokens_trained == 4321 and kept.sources == ("seed",)
    assert "4,321 tokens" in (carded_dir / CARD_NAME).read_text()
    assert (other_dir / CARD_NAME).read_text() == stale_text
    assert sha256_file(other_dir / "model.safetensors") == other.checkpoint_sha256


async def test_a_card_that_cannot_be_written_never_fails_the_evaluation(
    bus, run_id: str, target_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise OSError("read-only checkpoint")

    monkeypatch.setattr(service_module, "render_model_card", broken)
    spec = tiny_run_spec(
        run_id, target_dir, tmp_path, eval=EvalSpec(max_samples=2, serving_prompts=1)
    )
    await seed_captured_run(bus, spec, n_train=2, n_eval=2)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    event = await publish_checkpoint(bus, spec, draft, 0, final=True)
    report = await asyncio.wait_for(evaluator(bus, spec, exit_when_final=True).run(), timeout=60)
    assert report.evaluated == [0] and report.final_evaluated
    (result,) = await read_stream(bus, run_id, "evals", EvalResult)
    assert result.checkpoint_sha256 == event.checkpoint_sha256
    assert not (Path(event.checkpoint_uri) / CARD_NAME).exists()
    lag = await bus.consumer_lag(run_id, "checkpoints", DURABLE)
    assert lag.num_pending == 0 and lag.num_ack_pending == 0
