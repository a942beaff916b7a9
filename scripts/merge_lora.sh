#!/usr/bin/env bash
# Merge a LoRA run (or a checkpoint-N inside it) into a plain Hugging Face model directory.
# With no settings it merges the newest demo run of scripts/finetune_lora.sh (output/finetune_lora/latest).
#   ADAPTER=output/my-lora/checkpoint-500 OUTPUT=output/my-model DTYPE=bf16 bash scripts/merge_lora.sh
set -euo pipefail
source "$(dirname "$0")/_common.sh"

ADAPTER="${ADAPTER:-$REPO/output/finetune_lora/latest}"
if [ ! -e "$ADAPTER" ]; then
  echo "ADAPTER=$ADAPTER does not exist: train one first (bash scripts/finetune_lora.sh) or point ADAPTER at a run" >&2
  exit 2
fi
RUN_NAME="$(basename "$(cd "$ADAPTER" && pwd -P)")"
OUTPUT="${OUTPUT:-$REPO/output/merged/$(basename "$(dirname "$(cd "$ADAPTER" && pwd -P)")")-$RUN_NAME}"
BASE_MODEL="${BASE_MODEL:-}"                         # empty: the run's own --model_id
DTYPE="${DTYPE:-auto}"                               # auto (the base model's), bf16, fp16, fp32

mapfile -t OPTIONAL < <(optional_flag base_model "$BASE_MODEL")
"$PYTHON" -m vlft merge --adapter "$ADAPTER" --output "$OUTPUT" --dtype "$DTYPE" "${OPTIONAL[@]}" "$@"
