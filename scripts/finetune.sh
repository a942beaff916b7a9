#!/usr/bin/env bash
# Full fine-tuning: language model, merger and vision tower all train (freeze any with the variables).
# With no settings it runs the offline demo (tiny model + data_examples/) on whatever this machine has.
# Every setting is an environment variable; extra vlft flags can follow on the command line:
#   MODEL=Qwen/Qwen2-VL-2B-Instruct DATA=train.json IMAGE_FOLDER=images/ bash scripts/finetune.sh
# Several GPUs or nodes: NUM_GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE, ZERO_CONFIG (README).
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
DATA="${DATA:-$REPO/data_examples/llava_demo.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples/images}"
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune)}"
if [ -z "$MODEL" ]; then
  MODEL="$(tiny_model qwen2_vl)"
  EPOCHS="${EPOCHS:-20}"; LR="${LR:-1e-3}"; VISION_LR="${VISION_LR-}"; BATCH_SIZE="${BATCH_SIZE:-2}"; GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-$(( BATCH_SIZE * $(world_size) ))}"
  NUM_WORKERS="${NUM_WORKERS:-0}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-5}"                                     # language model
VISION_LR="${VISION_LR-2e-6}"                        # vision tower (set empty: same as LR)
MERGER_LR="${MERGER_LR:-}"                           # merger (empty: same as LR)
BATCH_SIZE="${BATCH_SIZE:-4}"                        # per device
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-64}"             # over all processes; accumulation follows
MAX_SEQ_LENGTH="${MAX_SEQ_LENGTH:-8192}"
IMAGE_MIN_PIXELS="${IMAGE_MIN_PIXELS:-3136}"
IMAGE_MAX_PIXELS="${IMAGE_MAX_PIXELS:-12845056}"
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-false}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
FREEZE_LLM="${FREEZE_LLM:-false}"
BF16="${BF16:-$(default_bf16)}"
USE_LIGER="${USE_LIGER:-$(default_liger)}"
ATTN="${ATTN:-sdpa}"                                 # flash_attention_2 if installed
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-$BF16}"  # on for GPU runs
NUM_WORKERS="${NUM_WORKERS:-4}"
SAVE_STEPS="${SAVE_STEPS:-500}"
LOGGING_STEPS="${LOGGING_STEPS:-1}"
REPORT_TO="${REPORT_TO:-none}"
PACKING="${PACKING:-false}"                          # 1/true: pack records into MAX_SEQ_LENGTH rows
GROUP_BY_LENGTH="${GROUP_BY_LENGTH:-false}"          # padded batches of similar lengths (not with PACKING)

[ "$FREEZE_VISION_TOWER" = true ] && VISION_LR=""   # nothing in the tower trains
mapfile -t OPTIONAL < <(optional_flag vision_lr "$VISION_LR"; optional_flag merger_lr "$MERGER_LR")
GRAD_ACCUM="$(grad_accum "$GLOBAL_BATCH_SIZE" "$BATCH_SIZE")"
mapfile -t TRAINING < <(training_flags "${OPTIONAL[@]}")
vlft_launch sft \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  --freeze_vision_tower "$FREEZE_VISION_TOWER" \
  --freeze_merger "$FREEZE_MERGER" \
  --freeze_llm "$FREEZE_LLM" \
  "${TRAINING[@]}" \
  "$@"
mark_latest "$OUTPUT_DIR"
