#!/usr/bin/env bash
# Download the wheels bench/gpu/check.sh installs on the device (bench/gpu/wheels.txt) into the
# git-ignored bench/gpu/wheels/, for CPython 3.12 on x86-64 Linux (the device's python3), and
# check that they fit, with the working tree, into the 64 MiB a device call carries.
#
#   bash bench/gpu/stage.sh     (PYTHON: the pip to use, default .venv/bin/python;
#                                STAGE_PYTHON_VERSION: default 3.12)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-.venv/bin/python}"
VERSION="${STAGE_PYTHON_VERSION:-3.12}"
DEST=bench/gpu/wheels
LIMIT=$((64 * 1024 * 1024))

rm -rf "$DEST"
mkdir -p "$DEST"
mapfile -t wanted < <(grep -vE '^\s*(#|$)' bench/gpu/wheels.txt)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" \
  --implementation cp "${platforms[@]}" -d "$DEST" "${wanted[@]}"

echo "staged wheels ($DEST):"
wheel_bytes=0
for wheel in "$DEST"/*.whl; do
  size=$(stat -c %s "$wheel")
  wheel_bytes=$((wheel_bytes + size))
  awk -v n="$(basename "$wheel")" -v b="$size" 'BEGIN {printf "  %-60s %8.1f KiB\n", n, b / 1024}'
done
# What a device call sends: tracked and untracked-not-ignored files, plus the carried folder.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((tree_bytes + wheel_bytes))
awk -v w="$wheel_bytes" -v t="$tree_bytes" 'BEGIN {
  m = 1048576
  printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB", w / m, t / m, (w + t) / m
  print " of the 64 MiB a device call carries"
}'
if [ "$total" -gt "$LIMIT" ]; then
  echo "too large: trim the wheels or the working tree" >&2
  exit 1
fi
