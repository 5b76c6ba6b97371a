#!/usr/bin/env bash
# Evaluate one policy in full precision and DuQuant-quantized on the same episodes, then compare.
#
#   bash examples/libero/run_optimized_duquant.sh                      # embedded policy, fp vs w4a8, short slice
#   QUANTS="fp w8a8 w4a8" bash examples/libero/run_optimized_duquant.sh suite=libero_object trials_per_task=10
#
# Arguments are Hydra overrides passed to every run; they come after the defaults below, so they win.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python3
QUANTS="${QUANTS:-fp w4a8}"
SLICE=(policy=embedded suite=libero_spatial "tasks=[0,1,2]" trials_per_task=4)

runs=()
view=()
for quant in $QUANTS; do
  echo "== quant=$quant"
  # A multi-suite run (suite=libero_pro_spatial, suite=[a,b]) prints a results line per suite.
  mapfile -t out < <("$PY" examples/libero/main.py "${SLICE[@]}" quant="$quant" "$@" | tee /dev/stderr | sed -n 's/^results: //p')
  [ "${#out[@]}" -gt 0 ] || { echo "error: the quant=$quant run wrote no results" >&2; exit 1; }
  [ "${#out[@]}" -gt 1 ] && view=(--robustness)
  runs+=("${out[@]}")
done
echo
"$PY" -m libero_eval.compare "${view[@]}" "${runs[@]}"
