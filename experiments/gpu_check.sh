#!/usr/bin/env bash
# One prepared accelerator check (issue 15, item 5): experiments/gpu_check.py's three checks, each in
# its own process under a time limit, so that a crash or a hang loses one row, not the table.
#
#   bash experiments/gpu_check.sh [--small] [--mfu-impl dense|ragged|blocked] [--mfu-batch N]
#
# With a GPU (nvidia-smi lists one) it runs the full configs; without one it runs --small on CPU with
# 8 fake CPU devices (XLA_FLAGS must be set before Python starts). The table goes to $OUT/gpu_check.md
# when OUT is set (the device tool returns what is under $OUT), else to experiments/results/gpu_check.md.
# Python: $PYTHON, else the repo's .venv when there is one, else python3 (a lent GPU machine has jax,
# flax and optax in its image and no registry to install from: the package is used from the tree via
# PYTHONPATH). JAX_PLATFORMS=cpu in the environment forces the CPU branch.
# Exit status: 0 when no row says FAILED.
set -u
cd "$(dirname "$0")/.."
small=""
args=()
for a in "$@"; do
  case "$a" in
    --small) small=--small ;;
    *) args+=("$a") ;;
  esac
done
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${JAX_PLATFORMS:-}" != cpu ] && nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: GPU visible: $(nvidia-smi -L | head -n 1)"
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"  # JAX's default is 0.75
  limits=(mfu:240 ep:150 attention:150)  # seconds; the device tool allows 600 per command
else
  echo "gpu_check: no GPU visible (or JAX_PLATFORMS=cpu): --small on CPU with 8 fake CPU devices; the GPU paths are not exercised"
  small=--small
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
  limits=(mfu:600 ep:600 attention:600)
fi
out="${OUT:+$OUT/gpu_check.md}"
out="${out:-experiments/results/gpu_check.md}"
"$py" experiments/gpu_check.py --header $small --out "$out" || exit 2
for i in 0 1 2; do
  item="${limits[$i]}"
  check="${item%%:*}" limit="${item#*:}"
  echo "gpu_check: $check (limit ${limit} s)"
  timeout -k 10 "$limit" "$py" experiments/gpu_check.py --check "$check" $small --out "$out" ${args[@]+"${args[@]}"}
  rc=$?
  if [ "$rc" -ne 0 ]; then  # the process died before writing its row
    why="process exit $rc"
    [ "$rc" -eq 124 ] && why="timed out after ${limit} s"
    echo "| $((i + 1)) $check | - | FAILED: $why | |" >>"$out"  # the label gpu_check.py gives it
  fi
done
echo
cat "$out"
! grep -q "| FAILED" "$out"
