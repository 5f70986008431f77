"""An EvalResult as tracker scalars (``specforge_common.tracking``), logged at its checkpoint's
step so it lines up with the trainer's ``train/*`` scalars of that step.

Both acceptance-length conventions keep their names: ``eval/simulated_acceptance_length``
(teacher-forced, no bonus token) and ``eval/serving_acceptance_length`` (tokens per target
verification, bonus included). Per position: ``eval/acc_pos<k>`` (offline) and
``eval/serving_acc_pos<k>`` (real decoding). ``eval/lossless`` is 1 or 0. Every other finite
metric of the result follows as ``eval/<name>`` (``eval/speedup``, ``eval/serving/steps``,
...), and the wall time of each phase as ``eval/seconds_<phase>``. What was not measured (no
serving prompts, no eval samples) is absent, never a made-up zero.
"""

from __future__ import annotations

import math
import re

from specforge_common.contracts import EvalResult

# Already logged under their explicit names above.
_DUPLICATES = re.compile(r"^eval/(acc_\d+|simulated_acc_len)$")


def eval_scalars(result: EvalResult) -> dict[str, float]:
    scalars: dict[str, float] = {}
    if result.simulated_acceptance_length is not None:
        scalars["eval/simulated_acceptance_length"] = result.simulated_acceptance_length
    if result.serving_acceptance_length is not None:
        scalars["eval/serving_acceptance_length"] = result.serving_acceptance_length
    for k, rate in enumerate(result.acceptance_rates):
        scalars[f"eval/acc_pos{k}"] = rate
    for k, rate in enumerate(result.serving_acceptance_rates):
        scalars[f"eval/serving_acc_pos{k}"] = rate
    if result.lossless is not None:
        scalars["eval/lossless"] = float(result.lossless)
    for name, value in result.metrics.items():
        if not _DUPLICATES.match(name):
            scalars[f"eval/{name.removeprefix('eval/')}"] = value
    for phase, seconds in result.wall_seconds.items():
        scalars[f"eval/seconds_{phase}"] = seconds
    return {tag: float(v) for tag, v in scalars.items() if math.isfinite(v)}
