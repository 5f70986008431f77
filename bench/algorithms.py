"""One train step of each algorithm (EAGLE-3, DFlash, Domino) at the real SmolLM2-135M dims.

Random features and a random target head of SmolLM2's shape (hidden 576, 9 heads / 3 KV heads,
MLP 1536, vocab 49152), one sequence of 512 tokens whose last 384 are supervised, fp32, the
configs the recipes use: EAGLE-3 with TTT 3 and a draft vocab of 8192; DFlash and Domino with one
layer, blocks of 8 and 64 anchors (Domino: GRU 256, correction 128). Each case runs in its own
process (its peak RSS is its own); ratios are against EAGLE-3 measured in the same run.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time

from bench.report import BenchReport

TARGET = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
              num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152,
              rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
              pad_token_id=2, eos_token_id=2)  # fmt: skip
SEQ, SUPERVISED, STEPS = 512, 384, 3
ALGORITHMS = ("eagle3", "dflash", "domino")


def _case(algorithm: str, queue: multiprocessing.Queue) -> None:
    import torch

    from specforge_common.batch import collate
    from specforge_common.dflash import DFlashStrategy, DominoStrategy
    from specforge_common.eagle3 import Eagle3Strategy, VocabMap
    from specforge_common.models import (
        DFlashConfig,
        DFlashDraft,
        DominoConfig,
        DominoDraft,
        Eagle3Config,
        Eagle3Draft,
    )

    torch.manual_seed(0)
    H, V = TARGET["hidden_size"], TARGET["vocab_size"]
    head, embedding = torch.randn(V, H) * 0.02, torch.randn(V, H) * 0.02
    layers = (1, 14, 26)
    if algorithm == "eagle3":
        config = Eagle3Config.from_target(TARGET, draft_vocab_size=8192, aux_layer_ids=layers)
        draft = Eagle3Draft(config)
        d2t = torch.zeros(8192, dtype=torch.int64)
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[:8192] = True
        draft.attach_target(embedding, VocabMap(d2t=d2t, t2d=t2d))
        strategy = Eagle3Strategy(draft, head, ttt_length=3)
    else:
        block = dict(aux_layer_ids=layers, block_size=8, num_anchors=64)
        if algorithm == "dflash":
            draft = DFlashDraft(DFlashConfig.from_target(TARGET, **block))
            strategy = DFlashStrategy(draft, head, embedding, num_anchors=64)
        else:
            draft = DominoDraft(DominoConfig.from_target(TARGET, **block, gru_hidden_dim=256,
                                                         correction_dim=128))  # fmt: skip
            strategy = DominoStrategy(draft, head, embedding, total_steps=100, num_anchors=64)
    loss_mask = torch.zeros(SEQ, dtype=torch.int64)
    loss_mask[SEQ - SUPERVISED :] = 1
    sample = {
        "input_ids": torch.randint(0, V, (SEQ,)),
        "loss_mask": loss_mask,
        "aux_hidden_states": torch.randn(SEQ, 3 * H),
        "hidden_states": torch.randn(SEQ, H),
    }
    if algorithm != "eagle3":
        del sample["hidden_states"]
    batch = collate([sample], seeds=[0])
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = strategy(batch)
        loss = out.loss if out.loss_weight is None else out.loss / out.loss_weight
        loss.backward()
        optimizer.step()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up: allocator, optimizer state, the checkpointing machinery
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    elapsed = (time.perf_counter() - started) / STEPS
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(json.dumps({"seconds": elapsed, "peak_mib": (after - before) / 1024,
                          "params": sum(p.numel() for p in params)}))  # fmt: skip


def _measure(algorithm: str) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(algorithm, queue))
    proc.start()
    result = json.loads(queue.get(timeout=1200))
    proc.join()
    return result


def run() -> BenchReport:
    report = BenchReport("algorithms")
    results = {name: _measure(name) for name in ALGORITHMS}
    for name, r in results.items():
        report.add(f"{name}: train step tokens/s", SEQ / r["seconds"], "tok/s")
        report.add(f"{name}: step peak memory above setup", r["peak_mib"], "MiB")
        report.add(f"{name}: trainable parameters", r["params"] / 1e6, "M")
    for name in ALGORITHMS[1:]:
        report.ratios[f"{name}_vs_eagle3_speed"] = (
            results["eagle3"]["seconds"] / results[name]["seconds"]
        )
    report.notes.append(
        f"SmolLM2-135M dims, seq {SEQ} ({SUPERVISED} supervised), batch 1, fp32, {STEPS} timed "
        "steps after one warm-up; EAGLE-3 TTT 3 / V_d 8192; DFlash and Domino 1 layer, block 8, "
        "64 anchors"
    )
    return report
