"""Capture overhead: ``HFTargetEngine.capture`` (hooks on the 3 aux layers, one [B, T, 3H] copy)
next to a bare ``model.model(...)`` forward of the same batch, and the alternative that keeps
every layer (``output_hidden_states=True``).

Target: a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152,
tied) with a seeded random init, no download; batch 4 x 256 tokens, fp32, CPU. Timings are
interleaved repetitions in this process, medians. Peak memory of each way of getting the
features is measured in fresh subprocesses (one per variant, 1 thread each): the Linux peak-RSS
mark (VmHWM) is reset right before the forward and read after, minus the RSS before it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.report import BenchReport

BATCH, SEQ = 4, 256
REPS = 5
GOAL = 1 / 1.10  # capture may cost at most 10% more than the bare forward
ROOT = Path(__file__).resolve().parent.parent
MEMORY_VARIANTS = ("bare", "hooks", "all_hidden_states", "hf_selected_hidden_states", "logits")


def smollm2_config():
    """SmolLM2-135M-Instruct's architecture (the real target's config.json), for random inits."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _engine(random_init: bool = True):
    """The target; ``random_init=False`` zero-fills the weights (memory probes: 3 s faster)."""
    from transformers import LlamaForCausalLM

    from specforge_common.targets import HFTargetEngine

    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(smollm2_config())
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(smollm2_config())
        model.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.zero_()
        model.model.rotary_emb.__init__(model.config)  # inv_freq must be real, not zeros
        model.tie_weights()
    return HFTargetEngine(model)


def _batch(batch: int = BATCH, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, seq * 3 // 4 :] = 0  # right padding, as capture sees it
    return ids, mask


def _variants(engine, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable[[], object]]:
    aux = engine.aux_layer_ids

    @torch.inference_mode()
    def bare():
        return engine.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def all_hidden_states():
        out = engine.base(
            input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True
        )
        states = out.hidden_states
        return torch.cat([states[i + 1] for i in aux], dim=-1), out.last_hidden_state

    @torch.inference_mode()
    def hf_selected_hidden_states():  # transformers >= 5 can keep only chosen indices
        out = engine.base(
            input_ids=ids,
            attention_mask=mask,
            use_cache=False,
            output_hidden_states=[i + 1 for i in aux],
        )
        states = out.hidden_states
        return torch.cat([states[i + 1] for i in aux], dim=-1), out.last_hidden_state

    @torch.inference_mode()
    def logits():
        return engine.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return {
        "bare": bare,
        "hooks": lambda: engine.capture(ids, mask),
        "all_hidden_states": all_hidden_states,
        "hf_selected_hidden_states": hf_selected_hidden_states,
        "logits": logits,
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _child(variant: str) -> None:
    """Subprocess body: peak RSS above the loaded model of one variant, printed as JSON."""
    import gc

    torch.set_num_threads(1)
    engine = _engine(random_init=False)
    small = _batch(1, 16)
    _variants(engine, *small)[variant]()  # lazy init (thread pool, kernels) outside the peak
    fn = _variants(engine, *_batch())[variant]
    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux >= 4.0)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    del result
    print(json.dumps({"peak_mb": (peak - before) / 1024, "seconds": seconds}))


def _memory(report: BenchReport) -> None:
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "bench.capture", "_child", name],
            cwd=ROOT,
            # Big allocations go straight to mmap and back to the OS when freed, so RSS follows
            # the live tensors instead of glibc's heap reuse (which made runs differ by ~20 MB).
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in MEMORY_VARIANTS
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            report.notes.append(f"memory of {name} not measured: {err.strip()[-300:]}")
            continue
        measured = json.loads(out.strip().splitlines()[-1])
        report.add(f"peak_rss_above_model_{name}", measured["peak_mb"], "MB")


def run() -> BenchReport:
    report = BenchReport("capture")
    threads = torch.get_num_threads()
    engine = _engine()
    ids, mask = _batch()
    variants = _variants(engine, ids, mask)
    timed = {name: variants[name] for name in ("bare", "hooks", "all_hidden_states")}
    small = _variants(engine, *_batch(1, 16))
    for name in timed:  # warm the code paths cheaply
        small[name]()

    times: dict[str, list[float]] = {name: [] for name in timed}
    first: dict[str, object] = {}
    for rep in range(REPS):
        order = list(timed.items())
        for name, fn in order if rep % 2 == 0 else order[::-1]:  # cancel drift within a rep
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            first.setdefault(name, result)
            del result
    # The captured features must be the ones output_hidden_states gives, or timing means nothing.
    captured, (reference_aux, reference_final) = first["hooks"], first["all_hidden_states"]
    assert torch.equal(captured.aux_hidden_states, reference_aux)
    assert torch.equal(captured.hidden_states, reference_final)
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = BATCH * SEQ
    for name in timed:
        report.add(f"{name}_forward_{BATCH}x{SEQ}", median[name] * 1e3, "ms")
    report.add("capture_throughput", tokens / median["hooks"], "tok/s")
    report.ratios["capture_vs_bare_forward"] = median["bare"] / median["hooks"]
    report.ratios["all_hidden_states_vs_bare_forward"] = (
        median["bare"] / median["all_hidden_states"]
    )
    report.goals["capture_vs_bare_forward"] = GOAL
    del engine, variants, timed, small, first, captured, reference_aux, reference_final

    _memory(report)
    report.notes.append(
        f"SmolLM2-135M-shaped Llama, random init, {BATCH}x{SEQ} tokens fp32, {threads} threads, "
        f"median of {REPS} interleaved reps (order alternating); "
        "ratios = bare time / variant time (higher is better)"
    )
    report.notes.append(
        "peak_rss_*: fresh subprocess per variant, 1 thread, MALLOC_MMAP_THRESHOLD_=64K, "
        "VmHWM reset before the forward; includes the returned features"
    )
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        _child(sys.argv[2])
    else:
        report = run()
        report.print()
