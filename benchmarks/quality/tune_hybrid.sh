#!/usr/bin/env bash
# Validation-only runs of the item-vector model: one `jepa4rec finetune` per named override set, the test
# split never read (hybrid.test_at_end=false). Usage:
#   benchmarks/quality/tune_hybrid.sh RECIPE OUT_ROOT "name1:--hybrid.x=1 --hybrid.y=2" "name2:..." ...
# Then compare the runs' validation rows: OUT_ROOT/<name>/result.json (`valid` and `history`).
set -euo pipefail
recipe=$1; root=$2; shift 2
for spec in "$@"; do
  name=${spec%%:*}; overrides=${spec#*:}
  [ -f "$root/$name/result.json" ] && { echo "$name: done"; continue; }
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=${THREADS:-1} TQDM_DISABLE=1 .venv/bin/jepa4rec finetune --config "$recipe" --hybrid.test_at_end=false \
      --hybrid.output_dir="$root/$name" $overrides > "$root.$name.log" 2>&1 || { echo "$name: FAILED (see $root.$name.log)"; continue; }
  echo "$name: $(tail -1 "$root.$name.log")"
done
