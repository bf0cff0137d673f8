#!/usr/bin/env bash
# The real-data pipeline on a GPU: `umerge demo` on LUME with a locally trained ~14M-parameter
# OLMo, then the batched-generation check on the vanilla model and the TIES merge, and a report.
#
#   bash benches/gpu/reproduce.sh [OUT_DIR]          # default OUT_DIR: ./gpu-recipe-out
#   SIZE=tiny bash benches/gpu/reproduce.sh /tmp/t   # the CPU test size (a few minutes on 2 cores)
#
# Knobs (environment variables):
#   LUME     the data (forget.jsonl, retain.jsonl); default: ../shared/data/lume beside the repository
#   SIZE     gpu (default) or tiny
#   SUBSET   documents per task from each split (umerge demo --subset); default 32 (gpu), 1 (tiny)
#   PYTHON   the interpreter that has umerge with the train extra; default: python
#   REUSE_DEMO  a finished demo output directory: check its models instead of running the demo again
#   CHECK_ROWS, CHECK_BATCH_SIZE, CHECK_MAX_NEW_TOKENS   the check's --rows, --batch-size and
#            --max-new-tokens; defaults 16, 32, 96 (gpu) and 2, 8, 16 (tiny):
#            the demo's own evaluation batch size and new tokens
#
# Writes OUT_DIR/demo (the demo's own output, unless REUSE_DEMO), OUT_DIR/checks/*.json, OUT_DIR/steps.tsv,
# OUT_DIR/gpu-report.json and OUT_DIR/gpu-report.md. Exit status: 0 when every step ran and the
# check passed on both models, 1 when a batched generation differed (the report is still written),
# another non-zero status when a step failed. See benches/gpu/README.md.
set -euo pipefail

say() { printf 'reproduce.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null)" || ROOT="$(cd "$HERE/../.." && pwd)"
LUME="${LUME:-$ROOT/../shared/data/lume}"
SIZE="${SIZE:-gpu}"
PYTHON="${PYTHON:-python}"
OUT="${1:-gpu-recipe-out}"

case "$SIZE" in
  gpu)
    # ~14M parameters: 2 x 4096 x 384 embeddings (3.1M) + 6 layers x (4 x 384^2 + 3 x 384 x 1024) (10.6M);
    # the demo's other settings are its full configuration for real data (96 new tokens, 512 tokens per row)
    SUBSET="${SUBSET:-32}"
    MODEL_SET=(--set vocab_size=4096 --set hidden_size=384 --set num_layers=6 --set num_heads=6
               --set intermediate_size=1024 --set eval_batch_size=32 --set torch_threads=0)
    # the check uses the batch size and new tokens of the demo's evaluation (eval_batch_size, max_new_tokens)
    CHECK_ROWS="${CHECK_ROWS:-16}"; CHECK_BATCH_SIZE="${CHECK_BATCH_SIZE:-32}"; CHECK_MAX_NEW_TOKENS="${CHECK_MAX_NEW_TOKENS:-96}"
    QUICK=()
    ;;
  tiny)
    # the CPU test size: a ~41k-parameter model, one document per task, few epochs, short generations
    SUBSET="${SUBSET:-1}"
    MODEL_SET=(--set vocab_size=320 --set hidden_size=32 --set num_layers=2 --set num_heads=4
               --set intermediate_size=64 --set vanilla_epochs=10 --set vanilla_extra_rounds=0
               --set max_new_tokens=16 --set eval_batch_size=8 --set torch_threads=1)
    CHECK_ROWS="${CHECK_ROWS:-2}"; CHECK_BATCH_SIZE="${CHECK_BATCH_SIZE:-8}"; CHECK_MAX_NEW_TOKENS="${CHECK_MAX_NEW_TOKENS:-16}"
    QUICK=(--quick)
    ;;
  *) die "SIZE must be gpu or tiny, not '$SIZE'" ;;
esac

[[ -f "$LUME/forget.jsonl" && -f "$LUME/retain.jsonl" ]] \
  || die "no LUME data at $LUME (forget.jsonl, retain.jsonl); set LUME=DIR"
LUME="$(cd "$LUME" && pwd)"
command -v "$PYTHON" >/dev/null 2>&1 || die "no interpreter '$PYTHON'; set PYTHON=/path/to/venv/bin/python"
"$PYTHON" -c 'import torch, transformers, peft, umerge' 2>/dev/null \
  || die "$PYTHON cannot import umerge with the train extra (torch, transformers, peft): pip install -e '.[train]'"
if [[ -e "$OUT" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then
  die "$OUT exists and is not empty; give a new OUT_DIR"
fi
mkdir -p "$OUT/checks"
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.tsv"
printf 'step\tseconds\trc\n' > "$STEPS"

# step NAME CMD...: run CMD, append its wall time and exit status to steps.tsv, return its status
step() {
  local name="$1"; shift
  local t0 t1 rc=0
  say "$name ..."
  t0="$(date +%s.%N)"
  "$@" || rc=$?
  t1="$(date +%s.%N)"
  printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" "$rc" >> "$STEPS"
  say "$name: exit $rc"
  return "$rc"
}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || say "nvidia-smi failed (its output is in $OUT/nvidia-smi.txt)"
else
  say "no nvidia-smi on PATH: the report records none"
fi
"$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' > "$OUT/torch-device.txt"
say "SIZE=$SIZE SUBSET=$SUBSET LUME=$LUME torch device: $(cat "$OUT/torch-device.txt")"

if [[ -n "${REUSE_DEMO:-}" ]]; then
  [[ -f "$REUSE_DEMO/report.json" ]] || die "REUSE_DEMO=$REUSE_DEMO holds no finished demo (no report.json)"
  DEMO_DIR="$(cd "$REUSE_DEMO" && pwd)"
  printf 'reused %s (not run again)\n' "$DEMO_DIR" > "$OUT/demo-command.txt"
  say "reusing the demo in $DEMO_DIR"
else
  DEMO_DIR="$OUT/demo"
  DEMO=("$PYTHON" -m umerge demo --data "$LUME" --subset "$SUBSET" "${QUICK[@]}" "${MODEL_SET[@]}" --quiet -o "$DEMO_DIR")
  printf '%q ' "${DEMO[@]}" > "$OUT/demo-command.txt"
  step demo "${DEMO[@]}" || die "the demo failed (command in $OUT/demo-command.txt)"
fi

# The check reads the prompts the demo trained and evaluated on (its --subset data), else LUME itself.
CHECK_DATA="$LUME"
[[ -f "$DEMO_DIR/data/forget.jsonl" ]] && CHECK_DATA="$DEMO_DIR/data"
check_failed=0
for model in vanilla merge-ties-factorwise; do
  [[ -f "$DEMO_DIR/models/$model/config.json" ]] || die "the demo wrote no model $DEMO_DIR/models/$model"
  rc=0
  step "check $model" "$PYTHON" "$HERE/check_batched_generation.py" "$DEMO_DIR/models/$model" "$CHECK_DATA" \
    --rows "$CHECK_ROWS" --batch-size "$CHECK_BATCH_SIZE" --max-new-tokens "$CHECK_MAX_NEW_TOKENS" \
    --out "$OUT/checks/$model.json" || rc=$?
  if [[ $rc -eq 1 && -f "$OUT/checks/$model.json" ]]; then
    check_failed=1
  elif [[ $rc -ne 0 ]]; then
    die "the batched-generation check on $model failed to run (exit $rc)"
  fi
done

"$PYTHON" "$HERE/write_report.py" "$OUT" --demo-dir "$DEMO_DIR" --size "$SIZE" --subset "$SUBSET" --lume "$LUME" \
  || die "writing the report failed"
say "wrote $OUT/gpu-report.md and $OUT/gpu-report.json"
if [[ $check_failed -ne 0 ]]; then
  say "batched generation differed from one-at-a-time generation (details in $OUT/checks/)"
  exit 1
fi
