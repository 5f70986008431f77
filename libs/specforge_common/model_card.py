"""The model card (``README.md``) of an exported draft (EAGLE-3, DFlash or Domino): what it is,
what it was trained on, how well it measured and how to serve it with SGLang.

``render_model_card`` is pure: it turns plain facts (``ModelCardFacts``, what the trainer knows
when it saves a checkpoint), an optional ``EvalResult`` (what the evaluator measured on that
checkpoint) and the ``Machine`` it was measured on into markdown. The trainer writes the card
into a checkpoint's staging dir (no measurements yet: "not evaluated yet"); the evaluator
rewrites it once it has scored the checkpoint. The facts travel in the card itself, as one JSON
line of its YAML front matter (``read_card_facts``), so the rewrite keeps what only the trainer
knew (tokens trained, dataset sources) without another file. The card is never part of the
weights: the checkpoint's sha256 is of ``model.safetensors`` only.

The recommended chain length ``k`` (``recommend_chain_length``): the last draft position ``j``
whose cumulative acceptance ``prod_{i<=j} r_i`` is at least ``MIN_CUMULATIVE_ACCEPTANCE``
(0.3). That product is the expected number of tokens drafting position ``j`` adds per target
verification; one more draft step costs a draft forward and a wider verification, which a
position accepted less than ~30% of the time rarely repays. ``r_i`` are the serving per-position
rates (real speculative decoding) for the positions they cover, continued by the offline
``acc_k`` beyond them; ``k`` is at least 1 and at most the positions measured. Without a
measurement ``k = DEFAULT_CHAIN_LENGTH`` (3).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specforge_common.contracts import EvalResult, RunSpec

__all__ = [
    "CARD_NAME",
    "DEFAULT_CHAIN_LENGTH",
    "MIN_CUMULATIVE_ACCEPTANCE",
    "ChainRecommendation",
    "Machine",
    "ModelCardFacts",
    "read_card_facts",
    "recommend_chain_length",
    "render_model_card",
    "sglang_command",
]

CARD_NAME = "README.md"
CARD_FORMAT = 1
FACTS_KEY = "specforge_model_card"  # the front-matter line holding the facts as JSON
MIN_CUMULATIVE_ACCEPTANCE = 0.3
DEFAULT_CHAIN_LENGTH = 3

SERVING_DEFINITION = (
    "tokens emitted per target verification step in real speculative decoding with the "
    "target, **bonus token included** (the correction after a rejection, or the bonus after "
    "a full accept); the convention of SGLang, vLLM and the EAGLE papers, always >= 1"
)
SIMULATED_DEFINITION = (
    "`sum_k prod_{i<=k} acc_i` over the offline per-position accuracies `acc_k` on the "
    "captured eval split, **no bonus token** (roughly serving - 1)"
)


@dataclass(frozen=True)
class ModelCardFacts:
    """What is known about a draft when it is saved. ``None``: not known."""

    run_id: str
    target: str  # the target model's path or name (``spec.target.path``)
    step: int
    final: bool = False
    spec_hash: str = ""
    weights_sha256: str = ""  # of model.safetensors
    target_revision: str = ""
    data_run: str = ""  # the run whose samples were trained, when it is another (a replay)
    sources: tuple[str, ...] = ()  # the datasets enqueued (EnqueueSummary.sources)
    capture_mode: str = "prefill"  # prefill: the dataset's replies; decode: the target's own
    capture_temperature: float = 0.0
    capture_max_new_tokens: int | None = None
    max_length: int | None = None
    samples_trained: int | None = None  # over all epochs and ranks
    tokens_trained: int | None = None  # sequence tokens of those samples
    epochs: int | None = None
    ttt_length: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None  # per rank and micro-batch
    train_loss: float | None = None  # the latest logged training loss
    # the draft's config.json
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None
    draft_vocab_size: int | None = None
    target_hidden_size: int | None = None
    aux_layer_ids: tuple[int, ...] | None = None
    dtype: str = ""
    eval_num_draft_tokens: int | None = None  # the evaluator's k (spec.eval.num_draft_tokens)
    algorithm: str = "eagle3"  # the run's strategy: eagle3 | dflash | domino
    block_size: int | None = None  # block drafters: tokens per draft block

    @classmethod
    def from_spec(
        cls,
        spec: RunSpec,
        *,
        step: int,
        final: bool,
        samples_trained: int | None = None,
        tokens_trained: int | None = None,
        sources: Sequence[str] = (),
        train_loss: float | None = None,
        weights_sha256: str = "",
        config: Mapping[str, Any] | None = None,
    ) -> ModelCardFacts:
        """The facts a run spec gives, plus what the caller knows; ``config``: config.json."""
        facts = cls(
            run_id=spec.run_id,
            target=spec.target.path,
            step=step,
            final=final,
            spec_hash=spec.spec_hash(),
            weights_sha256=weights_sha256,
            target_revision=spec.target.revision,
            data_run=spec.data_run if spec.data_run != spec.run_id else "",
            sources=tuple(sources),
            capture_mode=spec.capture.mode,
            capture_temperature=spec.capture.temperature,
            capture_max_new_tokens=spec.capture.max_new_tokens,
            max_length=spec.max_length,
            samples_trained=samples_trained,
            tokens_trained=tokens_trained,
            epochs=spec.train.epochs,
            ttt_length=spec.train.ttt_length if spec.draft.strategy == "eagle3" else None,
            algorithm=spec.draft.strategy,
            learning_rate=spec.train.learning_rate,
            batch_size=spec.train.batch_size,
            train_loss=train_loss,
            eval_num_draft_tokens=spec.eval.num_draft_tokens,
        )
        return facts.with_config(config) if config is not None else facts

    def with_config(self, config: Mapping[str, Any]) -> ModelCardFacts:
        """These facts with the draft summary of a ``config.json`` dict."""

        def number(key: str) -> int | None:
            value = config.get(key)
            return int(value) if isinstance(value, int | float) else None

        eagle = config.get("eagle_config") or {}
        aux = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
        block = config.get("dflash_config")
        if isinstance(block, dict):  # block drafters read the target's whole vocabulary
            aux = block.get("target_layer_ids")
            config = {**config, "draft_vocab_size": config.get("vocab_size")}
        return dataclasses.replace(
            self,
            hidden_size=number("hidden_size"),
            intermediate_size=number("intermediate_size"),
            num_layers=number("num_hidden_layers") or 1,
            num_attention_heads=number("num_attention_heads"),
            num_key_value_heads=number("num_key_value_heads"),
            vocab_size=number("vocab_size"),
            draft_vocab_size=number("draft_vocab_size"),
            target_hidden_size=number("target_hidden_size"),
            aux_layer_ids=tuple(int(i) for i in aux) if aux else None,
            dtype=str(config.get("torch_dtype") or config.get("dtype") or ""),
            block_size=number("block_size") if isinstance(block, dict) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"format": CARD_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCardFacts:
        """Facts from ``to_dict`` output; unknown keys are ignored, missing ones default."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        for key in ("sources", "aux_layer_ids"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        return cls(**fields)


@dataclass(frozen=True)
class Machine:
    """Where a measurement ran (tokens/s depend on it)."""

    processor: str
    system: str
    cpu_count: int | None
    torch_threads: int | None
    device: str

    @classmethod
    def current(cls, device: Any = "cpu") -> Machine:
        """This process's machine; ``device``: the torch device the measurement used."""
        import torch

        name = str(device)
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available():
            name = f"{name} ({torch.cuda.get_device_name(dev)})"
        return cls(
            processor=platform.processor() or platform.machine() or "unknown",
            system=f"{platform.system()} {platform.release()}".strip(),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            device=name,
        )

    def describe(self) -> str:
        cpus = _plural(self.cpu_count, "CPU") if self.cpu_count else "unknown CPU count"
        threads = f", {_plural(self.torch_threads, 'torch thread')}" if self.torch_threads else ""
        return f"{self.processor} ({self.system}), {cpus}{threads}, device {self.device}"


@dataclass(frozen=True)
class ChainRecommendation:
    k: int
    cumulative: tuple[float, ...]  # prod_{i<=j} r_i of the chain the rule looked at
    basis: str  # what the rates came from, in words

    @property
    def num_draft_tokens(self) -> int:
        return self.k + 1


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _span(first: int, last: int) -> str:
    return f"position {first}" if first == last else f"positions {first}-{last}"


def recommend_chain_length(result: EvalResult | None) -> ChainRecommendation:
    """The chain length ``k`` to serve with (the rule is in the module docstring)."""
    serving = list(result.serving_acceptance_rates) if result is not None else []
    offline = list(result.acceptance_rates) if result is not None else []
    rates = serving + offline[len(serving) :]
    cumulative: list[float] = []
    running = 1.0
    for rate in rates:
        if not _finite(rate):  # a position never tried: the chain stops being measured there
            break
        running *= min(max(float(rate), 0.0), 1.0)
        cumulative.append(running)
    if not cumulative:
        return ChainRecommendation(DEFAULT_CHAIN_LENGTH, (), "default (nothing measured)")
    if serving and len(offline) > len(serving) and len(cumulative) > len(serving):
        basis = (
            f"serving rates for {_span(1, len(serving))}, offline acc_k for "
            f"{_span(len(serving) + 1, len(cumulative))}"
        )
    elif serving:
        basis = "serving per-position rates"
    else:
        basis = "offline acc_k (no serving rates)"
    worth = sum(1 for c in cumulative if c >= MIN_CUMULATIVE_ACCEPTANCE)
    return ChainRecommendation(max(1, worth), tuple(cumulative), basis)


ALGORITHM_NAMES = {
    "eagle3": ("EAGLE-3", "LlamaForCausalLMEagle3"),
    "dflash": ("DFlash", "DFlashDraftModel"),
    "domino": ("Domino", "DFlashDraftModel` with `projector_type: domino"),
}


def _names(facts: ModelCardFacts) -> tuple[str, str]:
    return ALGORITHM_NAMES.get(facts.algorithm, ALGORITHM_NAMES["eagle3"])


def sglang_block_command(target: str, draft_dir: str | Path, block_size: int) -> str:
    """SGLang's DFLASH speculative decoding with a block drafter (DFlash or Domino)."""
    return (
        f"python -m sglang.launch_server --model-path {_shell(target)} "
        f"--speculative-algorithm DFLASH --speculative-draft-model-path {_shell(str(draft_dir))} "
        f"--speculative-num-draft-tokens {block_size}"
    )


def sglang_command(target: str, draft_dir: str | Path, k: int) -> str:
    """The SGLang server command serving ``target`` with this draft as a ``k``-token chain."""
    return (
        f"python -m sglang.launch_server --model-path {_shell(target)} "
        f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {_shell(str(draft_dir))} "
        f"--speculative-num-steps {k} --speculative-eagle-topk 1 "
        f"--speculative-num-draft-tokens {k + 1}"
    )


def _shell(word: str) -> str:
    import shlex

    return shlex.quote(word)


def read_card_facts(path: str | Path) -> ModelCardFacts | None:
    """The facts stored in a card's front matter; None if the card is missing or has none."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    if not lines or lines[0] != "---":
        return None
    for line in lines[1:]:
        if line == "---":
            break
        if line.startswith(f"{FACTS_KEY}: "):
            try:
                data = json.loads(line.removeprefix(f"{FACTS_KEY}: "))
                return ModelCardFacts.from_dict(data) if isinstance(data, dict) else None
            except (ValueError, TypeError):
                return None
    return None


# --- rendering -------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "—"


def _num(x: int | None) -> str:
    return f"{x:,}" if x is not None else "not recorded"


def _code(text: str) -> str:
    return f"`{text}`" if text else "not recorded"


def _table(rows: Sequence[tuple[str, str]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    out += ["| " + key + " | " + value.replace("|", "\\|") + " |" for key, value in rows]
    return out


def _front_matter(facts: ModelCardFacts) -> list[str]:
    data = json.dumps(facts.to_dict(), sort_keys=True, ensure_ascii=True)
    return [
        "---",
        "tags:",
        f"- {facts.algorithm}",
        "- speculative-decoding",
        "- sglang",
        f"{FACTS_KEY}: {data}",
        "---",
        "",
    ]


def _what(facts: ModelCardFacts, draft_dir: str) -> list[str]:
    target = facts.target + (
        f" (revision {facts.target_revision})" if facts.target_revision else ""
    )
    kind = "final checkpoint of the run" if facts.final else "intermediate checkpoint"
    heads = ""
    if facts.num_attention_heads:
        kv = f" ({facts.num_key_value_heads} KV)" if facts.num_key_value_heads else ""
        heads = f", {facts.num_attention_heads} attention heads{kv}"
    layers = facts.num_layers or 1
    draft = (
        f"hidden size {_num(facts.hidden_size)}, {layers} decoder layer"
        f"{'s' if layers != 1 else ''}{heads}, MLP {_num(facts.intermediate_size)}"
    )
    vocab = f"{_num(facts.draft_vocab_size)} draft tokens"
    if facts.vocab_size:
        vocab += f" of the target's {facts.vocab_size:,}"
    name, architecture = _names(facts)
    block = f", blocks of {facts.block_size} tokens" if facts.block_size else ""
    aux = (
        "target decoder layers "
        + ", ".join(str(i) for i in facts.aux_layer_ids)
        + " (0-based layer outputs)"
        if facts.aux_layer_ids
        else "not recorded"
    )
    rows = [
        ("target", _code(target)),
        ("draft", draft + block + (f", weights {facts.dtype}" if facts.dtype else "")),
        ("target hidden size", _num(facts.target_hidden_size or facts.hidden_size)),
        ("draft vocabulary", vocab),
        ("target layers read" if facts.algorithm != "eagle3" else "aux layers", aux),
        (
            "run",
            _code(facts.run_id) + (f", spec hash `{facts.spec_hash}`" if facts.spec_hash else ""),
        ),
        ("step", f"{facts.step} ({kind})"),
        (
            "weights",
            f"`model.safetensors`, sha256 `{facts.weights_sha256}`"
            if facts.weights_sha256
            else "`model.safetensors`",
        ),
        ("path", f"`{draft_dir}`"),
    ]
    return [
        f"# {name} draft for `{facts.target}`",
        "",
        f"A {name} speculative-decoding draft model (`{architecture}`) for the target "
        f"model `{facts.target}`, in the layout SGLang loads (`config.json` + "
        "`model.safetensors`). It only proposes tokens: the target verifies every one of them, "
        "so the output is the target's own. It works with this target only (it reads the "
        "target's hidden states and uses its embedding"
        + (" and lm_head" if facts.algorithm != "eagle3" else "")
        + ").",
        "",
        *_table(rows),
        "",
    ]


def _data(facts: ModelCardFacts) -> list[str]:
    if facts.capture_mode == "decode":
        sampling = (
            "greedy"
            if facts.capture_temperature == 0
            else f"temperature {facts.capture_temperature:g}"
        )
        limit = (
            f", up to {facts.capture_max_new_tokens:,} new tokens"
            if facts.capture_max_new_tokens
            else ""
        )
        replies = f"`decode`: the target's own replies to the dataset's prompts ({sampling}{limit})"
    else:
        replies = f"`{facts.capture_mode}`: the dataset's own assistant replies"
    sources = ", ".join(f"`{s}`" for s in facts.sources) if facts.sources else "not recorded"
    if facts.data_run:
        sources += f" (samples of run `{facts.data_run}`, replayed)"
    tokens = f", {facts.tokens_trained:,} tokens" if facts.tokens_trained is not None else ""
    trained = (
        f"{facts.samples_trained:,} samples{tokens} (all epochs)"
        if facts.samples_trained is not None
        else "not recorded"
    )
    lr = f"{facts.learning_rate:g}" if facts.learning_rate is not None else "not recorded"
    if facts.batch_size:
        lr += f" (batch size {facts.batch_size} per rank)"
    rows = [
        ("dataset", sources),
        ("replies trained on", replies),
        ("max length", f"{facts.max_length:,} tokens" if facts.max_length else "not recorded"),
        ("trained on", trained),
        ("epochs", _num(facts.epochs)),
        (
            ("TTT length", f"{facts.ttt_length} unrolled draft steps")
            if facts.algorithm == "eagle3"
            else ("block size", f"{_num(facts.block_size)} tokens per draft block")
        ),
        ("learning rate", lr),
        (
            "last training loss",
            _fmt(facts.train_loss) if facts.train_loss is not None else "not logged yet",
        ),
    ]
    return ["## Training data", "", *_table(rows), ""]


def _speed(metrics: Mapping[str, float]) -> str:
    spec, target = metrics.get("tokens_per_s_spec"), metrics.get("tokens_per_s_target")
    if not (_finite(spec) and _finite(target)):
        return "not measured"
    text = f"{spec:.1f} tokens/s speculative vs {target:.1f} tokens/s target only"
    if _finite(metrics.get("speedup")):
        text += f": **speedup {metrics['speedup']:.2f}x**"
    draft_ms, target_ms = metrics.get("draft_ms_per_step"), metrics.get("target_ms_per_step")
    if _finite(draft_ms) and _finite(target_ms):
        text += f" (draft {draft_ms:.1f} ms + target {target_ms:.1f} ms per verification)"
    return text


def _lossless(result: EvalResult) -> str:
    if result.lossless is True:
        return "yes: every speculative output equals the target's greedy output, token for token"
    if result.lossless is False:
        return (
            "**NO**: a speculative output differed from the target's greedy output; do not "
            "serve this checkpoint before the cause is found (see the evaluator's log)"
        )
    return (
        "not checked token for token (temperature > 0: speculative sampling keeps the "
        "target's distribution) or serving not measured"
    )


def _positions(result: EvalResult) -> list[str]:
    serving, offline = list(result.serving_acceptance_rates), list(result.acceptance_rates)
    n = max(len(serving), len(offline))
    if n == 0:
        return ["No per-position acceptance was measured.", ""]
    out = [
        "| draft position | serving r_j | serving cumulative prod r_i | offline acc_k |",
        "|---|---|---|---|",
    ]
    running: float | None = 1.0
    for j in range(n):
        r = serving[j] if j < len(serving) else None
        if running is not None and _finite(r):
            running *= r
        else:
            running = None
        acc = offline[j] if j < len(offline) else None
        cum = _fmt(running) if r is not None and running is not None else "—"
        out.append(f"| {j + 1} | {_fmt(r)} | {cum} | {_fmt(acc)} |")
    out += [
        "",
        "serving r_j: P(draft position j accepted | positions before j accepted), measured by "
        "real speculative decoding (— where not measured or never tried). offline acc_k: how "
        "often the draft's argmax equals the target's at unroll step k on the eval split "
        "(a target token outside the draft vocabulary counts as a miss).",
        "",
    ]
    return out


def _measured(result: EvalResult | None, machine: Machine | None) -> list[str]:
    out = ["## Measured quality", ""]
    if result is None:
        return out + [
            "**Not evaluated yet.** The evaluator rewrites this section once it has scored this "
            "checkpoint. It will report two acceptance lengths:",
            "",
            f"- **serving acceptance length**: {SERVING_DEFINITION};",
            f"- **simulated acceptance length**: {SIMULATED_DEFINITION}.",
            "",
        ]
    metrics = result.metrics
    k = metrics.get("k", metrics.get("serving/k"))
    temperature = metrics.get("temperature", metrics.get("serving/temperature"))
    prompts, new = metrics.get("serving/prompts"), metrics.get("serving/max_new_tokens")
    setup = []
    if _finite(prompts):
        setup.append(
            f"{int(prompts)} prompts of the run's eval split"
            + (f", up to {int(new)} new tokens each" if _finite(new) else "")
        )
    if _finite(k):
        setup.append(f"k = {int(k)} draft tokens per verification")
    if _finite(temperature):
        setup.append(f"temperature {temperature:g}")
    samples = metrics.get("eval/samples")
    sal = result.serving_acceptance_length
    sim = result.simulated_acceptance_length
    out += [
        f"Measured by the specforge evaluator at step {result.step}"
        + (f" ({'; '.join(setup)})" if setup else "")
        + ".",
        "",
        f"- **Serving acceptance length: {_fmt(sal, 3) if sal is not None else 'not measured'}**"
        f" — {SERVING_DEFINITION}.",
        f"- **Simulated acceptance length: {_fmt(sim, 4) if sim is not None else 'not measured'}"
        f"** — {SIMULATED_DEFINITION}"
        + (f" ({int(samples)} eval samples)" if _finite(samples) else "")
        + ".",
        f"- Lossless: {_lossless(result)}.",
        f"- Speed: {_speed(metrics)}.",
        f"- Measured on: {machine.describe() if machine is not None else 'not recorded'}. "
        "Speeds depend on this machine and on the evaluator's plain implementation; SGLang on "
        "a GPU will differ, acceptance much less so.",
        "",
        "Per-position acceptance:",
        "",
        *_positions(result),
    ]
    return out


def _serve_block(facts: ModelCardFacts, draft_dir: str) -> list[str]:
    block = facts.block_size or 16
    return [
        "## Serve it with SGLang",
        "",
        "```bash",
        sglang_block_command(facts.target, draft_dir, block),
        "```",
        "",
        "`--speculative-algorithm DFLASH` selects block drafting (DFlash and Domino drafts "
        "alike; a Domino draft needs an SGLang build with Domino support and bf16 weights), "
        "`--speculative-draft-model-path` is this directory, and "
        f"`--speculative-num-draft-tokens` is the block size ({block}): one draft forward "
        "proposes the block, one target forward verifies it. SGLang runs DFLASH on CUDA only.",
        "",
    ]


def _serve(facts: ModelCardFacts, result: EvalResult | None, draft_dir: str) -> list[str]:
    if facts.algorithm != "eagle3":
        return _serve_block(facts, draft_dir)
    chain = recommend_chain_length(result)
    if chain.cumulative:
        shown = ", ".join(f"{c:.3f}" for c in chain.cumulative)
        why = (
            f"k = {chain.k}: the cumulative acceptance per position is [{shown}] "
            f"({chain.basis}), and the rule keeps the positions with at least "
            f"{MIN_CUMULATIVE_ACCEPTANCE:g}."
        )
        if chain.cumulative[0] < MIN_CUMULATIVE_ACCEPTANCE:
            why += (
                f" Even the first position is accepted only {chain.cumulative[0]:.1%} of "
                "the time: this draft is unlikely to speed decoding up; train it longer."
            )
    else:
        why = (
            f"k = {chain.k}: the default, since this checkpoint has no measured per-position "
            "acceptance yet."
        )
    return [
        "## Serve it with SGLang",
        "",
        "```bash",
        sglang_command(facts.target, draft_dir, chain.k),
        "```",
        "",
        "These flags are SGLang's EAGLE-3 speculative-decoding options: "
        "`--speculative-algorithm EAGLE3` selects EAGLE-3, `--speculative-draft-model-path` is "
        "this directory, `--speculative-num-steps` is the chain length k (draft steps per "
        "verification), `--speculative-eagle-topk 1` makes the draft a chain (no tree) and "
        "`--speculative-num-draft-tokens` is k + 1 (the tokens one verification checks).",
        "",
        f"Recommended {why} Rule: k is the last draft position j whose cumulative acceptance "
        f"`prod_{{i<=j}} r_i` is at least {MIN_CUMULATIVE_ACCEPTANCE:g} (the expected tokens that "
        "drafting position j adds per verification; below that it rarely repays one more draft "
        "step and a wider verification), using the serving per-position rates r_j and, beyond "
        "the positions they cover, the offline acc_k; at least 1, at most the positions "
        f"measured; {DEFAULT_CHAIN_LENGTH} when nothing is measured yet.",
        "",
    ]


def render_model_card(
    facts: ModelCardFacts,
    result: EvalResult | None = None,
    *,
    draft_dir: str | Path,
    machine: Machine | None = None,
) -> str:
    """The card's markdown. ``result``: this checkpoint's EvalResult (None: not evaluated yet);
    ``draft_dir``: where the draft is served from (the step dir, not a staging dir);
    ``machine``: where ``result`` was measured."""
    path = str(draft_dir)
    lines = [
        *_front_matter(facts),
        *_what(facts, path),
        *_data(facts),
        *_measured(result, machine),
        *_serve(facts, result, path),
        "Files: `config.json` and `model.safetensors` are the draft; `trainer_state.json` and "
        "`training_state.pt`, when present, are the trainer's resume state and not part of it. "
        "Written by specforge-services.",
    ]
    return "\n".join(lines) + "\n"
