#!/usr/bin/env bash
# The GPU check: every part with its own time cap, one table, one JSON (bench/gpu/README.md).
#
#   bash bench/gpu/check.sh               on a CUDA machine (device run: <= 8 min on an H200)
#   bash bench/gpu/check.sh --cpu-smoke   every part at tiny dims on the CPU (fp32, gloo)
#   ... --parts decode,distributed        only these parts
#
# PYTHON picks the interpreter (default: python3; in smoke mode .venv/bin/python when present).
# On the device the carried wheels (bench/gpu/wheels/*.whl, made by bench/gpu/stage.sh) are
# installed into a private site dir first (GPU_CHECK_WHEELS=DIR: those, in smoke mode too). Results: bench/results/gpu.json (smoke: gpu-cpu-smoke.json; override
# with GPU_CHECK_RESULTS), and $OUT/gpu.json + $OUT/check.log when $OUT is set (the device
# tool). Exit status 0 only when every part finished and every enforced must-check passed.
set -uo pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

SMOKE=0
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && SMOKE=1
ONLY=""  # --parts a,b: run only these (a rerun of what failed, inside what is left of a lease)
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --parts) ONLY="${2:-}"; shift ;;
    *) echo "usage: $0 [--cpu-smoke] [--parts train_step,capture,decode,distributed,cuda_tests]" >&2
       exit 2 ;;
  esac
  shift
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

run_check() {
  if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ "$SMOKE" = 1 ] && [ -x .venv/bin/python ] && PYTHON="$ROOT/.venv/bin/python"
  fi
  mkdir -p "$WORK/parts"

  # Carried wheels: what the device image lacks (bench/gpu/wheels.txt), into a private site dir;
  # on the device only, unless GPU_CHECK_WHEELS names a folder (a device-like CPU rehearsal).
  shopt -s nullglob
  wheels=()
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    wheels=("$GPU_CHECK_WHEELS"/*.whl)
  elif [ "$SMOKE" = 0 ]; then
    wheels=(bench/gpu/wheels/*.whl)
  fi
  if [ "${#wheels[@]}" -gt 0 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "${wheels[@]}" || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed ${#wheels[@]} carried wheels into $WORK/site"
  fi
  # The project's packages straight from this tree when they are not installed (the device).
  if ! "$PYTHON" -c "import specforge_common, specforge_trainer, specforge_evaluator" 2>/dev/null; then
    mkdir -p "$WORK/src"
    ln -s "$ROOT/libs/specforge_common" "$WORK/src/specforge_common"
    ln -s "$ROOT/services/cli" "$WORK/src/specforge_cli"
    ln -s "$ROOT/services/capture" "$WORK/src/specforge_capture"
    ln -s "$ROOT/services/trainer" "$WORK/src/specforge_trainer"
    ln -s "$ROOT/services/evaluator" "$WORK/src/specforge_evaluator"
    export PYTHONPATH="$WORK/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi

  if [ "$SMOKE" = 1 ]; then
    MODE=cpu-smoke
    SMOKE_FLAG=(--smoke)
    RESULTS="${GPU_CHECK_RESULTS:-bench/results/gpu-cpu-smoke.json}"
    # part:cap seconds (a shared 2-core machine; the parts take ~5-20 s each there)
    CAPS=(train_step:150 capture:150 decode:150 distributed:150 cuda_tests:150)
  else
    MODE=device
    SMOKE_FLAG=()
    RESULTS="${GPU_CHECK_RESULTS:-bench/results/gpu.json}"
    # 450 s in all at most, so the whole check stays under 8 min with the installs and report.
    CAPS=(train_step:180 capture:60 decode:90 distributed:60 cuda_tests:60)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
      --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
  fi
  "$PYTHON" -c "import sys, torch, transformers; print('python', sys.version.split()[0],
    'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers',
    transformers.__version__, 'device',
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" || exit 1

  codes=()
  for entry in "${CAPS[@]}"; do
    part="${entry%%:*}"
    cap="${entry##*:}"
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$part,"* ]]; then
      continue
    fi
    budget=$((cap - 20))
    echo
    echo "=== $part (cap ${cap} s) ==="
    started=$SECONDS
    timeout -k 10 "$cap" "$PYTHON" -m "bench.gpu.$part" ${SMOKE_FLAG[@]+"${SMOKE_FLAG[@]}"} \
      --out "$WORK/parts/$part.json" --budget-s "$budget"
    code=$?
    echo "=== $part: exit $code after $((SECONDS - started)) s ==="
    codes+=(--exit-code "$part=$code")
  done

  outs=(--out "$RESULTS")
  [ -n "${OUT:-}" ] && outs+=(--out "$OUT/gpu.json")
  echo
  [ -n "$ONLY" ] && outs+=(--select "$ONLY")
  "$PYTHON" -m bench.gpu.report --parts "$WORK/parts" --mode "$MODE" "${outs[@]}" \
    ${codes[@]+"${codes[@]}"}
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  run_check 2>&1 | tee "$OUT/check.log"
  exit "${PIPESTATUS[0]}"
fi
run_check
