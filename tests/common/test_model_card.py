"""The model card of an exported draft: both acceptance-length conventions with their
definitions, the SGLang command with the recommended chain length, facts that survive a rewrite."""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch

from specforge_common.contracts import (
    CaptureSpec,
    DraftSpec,
    EvalResult,
    RunSpec,
    TargetSpec,
    TrainSpec,
)
from specforge_common.eagle3 import save_draft
from specforge_common.model_card import (
    CARD_NAME,
    DEFAULT_CHAIN_LENGTH,
    MIN_CUMULATIVE_ACCEPTANCE,
    SERVING_DEFINITION,
    SIMULATED_DEFINITION,
    Machine,
    ModelCardFacts,
    read_card_facts,
    recommend_chain_length,
    render_model_card,
    sglang_command,
)
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft

TARGET = "/models/SmolLM2-135M-Instruct"
DRAFT_DIR = "/runs/r1/checkpoints/step-00000024"


def spec(**over) -> RunSpec:
    fields = dict(run_id="r1", target=TargetSpec(path=TARGET),
                  train=TrainSpec(learning_rate=3e-4, epochs=2, ttt_length=4))  # fmt: skip
    return RunSpec(**(fields | over))


CONFIG = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 1,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "draft_vocab_size": 8192, "torch_dtype": "bfloat16",
    "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 14, 26]},
}  # fmt: skip


def facts(**over) -> ModelCardFacts:
    base = ModelCardFacts.from_spec(spec(), step=24, final=True, samples_trained=96,
                                    tokens_trained=31337, sources=["sharegpt"], train_loss=1.25,
                                    weights_sha256="ab" * 32, config=CONFIG)  # fmt: skip
    return ModelCardFacts(**(base.__dict__ | over))


def result(serving_rates=(0.9, 0.7, 0.6), offline=(0.8, 0.6, 0.5, 0.4), **over) -> EvalResult:
    fields = dict(
        run_id="r1", step=24, checkpoint_sha256="ab" * 32, acceptance_rates=list(offline),
        simulated_acceptance_length=1.4567, serving_acceptance_length=2.3456,
        serving_acceptance_rates=list(serving_rates), lossless=True,
        metrics={"k": 3.0, "temperature": 0.0, "serving/prompts": 8.0,
                 "serving/max_new_tokens": 32.0, "tokens_per_s_spec": 150.0,
                 "tokens_per_s_target": 100.0, "speedup": 1.5, "draft_ms_per_step": 2.0,
                 "target_ms_per_step": 9.0, "eval/samples": 16.0},
        run_spec_hash=spec().spec_hash(),
    )  # fmt: skip
    return EvalResult(**(fields | over))


MACHINE = Machine(processor="x86_64", system="Linux 6.1", cpu_count=2, torch_threads=2,
                  device="cpu")  # fmt: skip


def command_values(text: str) -> dict[str, str]:
    """The flags of the card's ``python -m sglang.launch_server`` line."""
    (line,) = [x for x in text.splitlines() if x.startswith("python -m sglang.launch_server")]
    words = shlex.split(line)[3:]
    return dict(zip(words[::2], words[1::2], strict=True))


def test_an_unevaluated_card_says_so_names_both_conventions_and_serves_with_k_3() -> None:
    text = render_model_card(facts(), draft_dir=DRAFT_DIR)
    assert "Not evaluated yet" in text
    # both conventions, each with its one-line definition
    assert f"**serving acceptance length**: {SERVING_DEFINITION}" in text
    assert f"**simulated acceptance length**: {SIMULATED_DEFINITION}" in text
    assert "bonus token included" in SERVING_DEFINITION and "no bonus token" in SIMULATED_DEFINITION
    assert "sum_k prod_{i<=k} acc_i" in SIMULATED_DEFINITION
    assert command_values(text) == {
        "--model-path": TARGET, "--speculative-algorithm": "EAGLE3",
        "--speculative-draft-model-path": DRAFT_DIR, "--speculative-num-steps": "3",
        "--speculative-eagle-topk": "1", "--speculative-num-draft-tokens": "4",
    }  # fmt: skip
    assert "flags are SGLang's EAGLE-3 speculative-decoding options" in text
    # what it is and what it was trained on
    assert f"# EAGLE-3 draft for `{TARGET}`" in text
    for fragment in ("hidden size 576", "1 decoder layer", "8,192 draft tokens of the target's "
                     "49,152", "target decoder layers 1, 14, 26", "`r1`",
                     f"spec hash `{spec().spec_hash()}`", "24 (final checkpoint of the run)",
                     "ab" * 32, "`sharegpt`", "the dataset's own assistant replies",
                     "2,048 tokens", "96 samples, 31,337 tokens", "| epochs | 2 |",
                     "4 unrolled draft steps", "0.0003", "1.2500"):  # fmt: skip
        assert fragment in text, fragment


def test_an_evaluated_card_reports_every_measurement() -> None:
    r = result()
    text = render_model_card(facts(), r, draft_dir=DRAFT_DIR, machine=MACHINE)
    assert "Not evaluated yet" not in text
    assert f"**Serving acceptance length: 2.346** — {SERVING_DEFINITION}." in text
    assert f"**Simulated acceptance length: 1.4567** — {SIMULATED_DEFINITION}" in text
    assert "Lossless: yes" in text
    assert "150.0 tokens/s speculative vs 100.0 tokens/s target only: **speedup 1.50x**" in text
    assert "k = 3 draft tokens per verification" in text and "temperature 0" in text
    assert "Measured on: x86_64 (Linux 6.1), 2 CPUs, 2 torch threads, device cpu" in text
    # per position: serving conditional rate, its running product, offline acc_k
    assert "| 1 | 0.9000 | 0.9000 | 0.8000 |" in text
    assert "| 2 | 0.7000 | 0.6300 | 0.6000 |" in text
    assert "| 3 | 0.6000 | 0.3780 | 0.5000 |" in text
    assert "| 4 | — | — | 0.4000 |" in text
    # chain: 0.9, 0.63, 0.378 (serving) then 0.378 * 0.4 = 0.151 (offline): k = 3
    values = command_values(text)
    assert values["--speculative-num-steps"] == "3"
    assert values["--speculative-num-draft-tokens"] == "4"
    assert values["--speculative-draft-model-path"] == DRAFT_DIR


def test_a_failed_losslessness_check_is_a_loud_warning() -> None:
    r = result(serving_rates=(), lossless=False, serving_acceptance_length=None)
    text = render_model_card(facts(), r, draft_dir=DRAFT_DIR, machine=MACHINE)
    assert "Lossless: **NO**" in text and "do not serve" in text
    assert "**Serving acceptance length: not measured**" in text


@pytest.mark.parametrize(
    "serving,offline,k,basis",
    [
        ((0.9, 0.8, 0.7), (0.9, 0.8, 0.7, 0.9, 0.5), 4, "offline acc_k for positions 4-5"),
        ((0.9, 0.5, 0.6), (0.9,) * 4, 2, "offline acc_k for position 4"),  # .9 .45 .27 .243
        ((0.2, 0.9), (0.9,) * 3, 1, "serving"),  # nothing worth it: still at least 1
        ((), (0.8, 0.5, 0.5), 2, "offline acc_k (no serving rates)"),  # 0.8, 0.4, 0.2
        ((0.9, math.nan, 0.9), (0.9,) * 3, 1, "serving"),  # position 2 never tried: stop
        ((), (), DEFAULT_CHAIN_LENGTH, "default"),
    ],
)
def test_the_chain_length_rule(serving, offline, k: int, basis: str) -> None:
    chain = recommend_chain_length(result(serving_rates=serving, offline=offline))
    assert chain.k == k and chain.num_draft_tokens == k + 1
    assert basis in chain.basis
    if chain.cumulative and chain.cumulative[0] >= MIN_CUMULATIVE_ACCEPTANCE:
        assert all(c >= MIN_CUMULATIVE_ACCEPTANCE for c in chain.cumulative[:k])
    if len(chain.cumulative) > k:
        assert chain.cumulative[k] < MIN_CUMULATIVE_ACCEPTANCE
    assert recommend_chain_length(None).k == DEFAULT_CHAIN_LENGTH


def test_the_threshold_is_inclusive() -> None:
    chain = recommend_chain_length(result(serving_rates=(0.5, 0.6), offline=(0.5, 0.6, 0.9)))
    assert chain.cumulative[:2] == pytest.approx((0.5, 0.3)) and chain.k == 2


def test_facts_survive_the_card_and_odd_names_are_quoted(tmp_path: Path) -> None:
    odd = facts(target="/models/my target|v2 é", sources=("a b.jsonl", "sharegpt"),
                aux_layer_ids=(2, 5, 9))  # fmt: skip
    card = tmp_path / CARD_NAME
    card.write_text(render_model_card(odd, result(), draft_dir=tmp_path / "step dir"))
    assert read_card_facts(tmp_path) == odd == read_card_facts(card)
    values = command_values(card.read_text())
    assert values["--model-path"] == "/models/my target|v2 é"
    assert values["--speculative-draft-model-path"] == str(tmp_path / "step dir")
    assert "my target\\|v2" in card.read_text()  # escaped inside the markdown table
    assert read_card_facts(tmp_path / "missing") is None
    card.write_text("# a hand-written card\n")
    assert read_card_facts(card) is None


def test_decode_mode_and_a_replay_say_where_the_replies_came_from() -> None:
    s = spec(capture=CaptureSpec(mode="decode", temperature=0.7, max_new_tokens=256),
             data_run="r0")  # fmt: skip
    f = ModelCardFacts.from_spec(s, step=3, final=False, samples_trained=None)
    text = render_model_card(f, draft_dir=DRAFT_DIR)
    assert "the target's own replies to the dataset's prompts (temperature 0.7, up to 256" in text
    assert "samples of run `r0`, replayed" in text
    assert "3 (intermediate checkpoint)" in text
    assert "| trained on | not recorded |" in text and "| dataset | not recorded" in text


def test_facts_from_a_real_export_and_the_machine(tmp_path: Path) -> None:
    config = Eagle3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=50, draft_vocab_size=20,
                          target_hidden_size=48, aux_layer_ids=(0, 2, 3))  # fmt: skip
    draft = Eagle3Draft(config)
    draft.d2t.zero_()
    draft.t2d.zero_()
    draft.t2d[:20] = True
    out = save_draft(draft, tmp_path / "export")
    f = ModelCardFacts.from_spec(spec(), step=1, final=False,
                                 config=json.loads((out / "config.json").read_text()))  # fmt: skip
    assert (f.hidden_size, f.num_layers, f.draft_vocab_size, f.vocab_size) == (32, 1, 20, 50)
    assert (f.target_hidden_size, f.aux_layer_ids, f.dtype) == (48, (0, 2, 3), "float32")
    machine = Machine.current("cpu")
    assert machine.cpu_count == os.cpu_count() and machine.torch_threads == torch.get_num_threads()
    assert machine.device == "cpu" and machine.processor
    assert sglang_command("t", "/d", 5).endswith(
        "--speculative-num-steps 5 --speculative-eagle-topk 1 --speculative-num-draft-tokens 6"
    )


@pytest.mark.parametrize("strategy", ["dflash", "domino"])
def test_a_block_drafter_card_names_its_algorithm_and_serves_with_dflash(strategy: str) -> None:
    config = {
        "architectures": ["DFlashDraftModel"], "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 2, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "block_size": 8, "torch_dtype": "float32",
        "dflash_config": {"target_layer_ids": [1, 27], "mask_token_id": 2},
    }  # fmt: skip
    block_spec = spec(draft=DraftSpec(strategy=strategy))
    f = ModelCardFacts.from_spec(block_spec, step=5, final=True, config=config)
    text = render_model_card(f, result(), draft_dir=DRAFT_DIR)
    name = {"dflash": "DFlash", "domino": "Domino"}[strategy]
    assert f"# {name} draft for `{TARGET}`" in text
    assert command_values(text) == {
        "--model-path": TARGET, "--speculative-algorithm": "DFLASH",
        "--speculative-draft-model-path": DRAFT_DIR, "--speculative-num-draft-tokens": "8",
    }  # fmt: skip
    for fragment in ("2 decoder layers", "blocks of 8 tokens", "target decoder layers 1, 27",
                     "49,152 draft tokens of the target's 49,152", "8 tokens per draft block",
                     f"- {strategy}\n", SERVING_DEFINITION, SIMULATED_DEFINITION):  # fmt: skip
        assert fragment in text, fragment
    assert "TTT length" not in text and "EAGLE3" not in text
