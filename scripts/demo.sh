#!/usr/bin/env bash
# `make demo`: the main job end to end. Uses the shipped base teacher (assets/teachers/base).
# Until trained teachers are shipped, it runs the same path with an untrained tiny teacher
# made by `fewstep models init-tiny --config teacher`, and says so: its scores are meaningless,
# but every stage (corpus, curate, precompute, DMD distill, eval, summary) runs for real.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
if [ -f assets/teachers/base/model_index.json ]; then
  exec "$BIN/fewstep" demo "$@"
fi
echo "================================================================================"
echo " NOTE: no trained teacher is shipped yet (assets/teachers/base is missing)."
echo " Running the demo with an UNTRAINED tiny teacher (random weights, same classes)."
echo " Every stage runs for real; the judge scores say nothing about the recipe."
echo "================================================================================"
teacher=runs/untrained-teacher
if [ ! -f "$teacher/model_index.json" ]; then
  "$BIN/fewstep" models init-tiny --config teacher --out "$teacher" --overwrite
fi
exec "$BIN/fewstep" demo --set teacher="$teacher" "$@"
