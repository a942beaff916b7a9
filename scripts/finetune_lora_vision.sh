#!/usr/bin/env bash
# LoRA on the language model AND on the vision blocks; merger trained fully.
# With no settings it runs the offline demo (tiny model + data_examples/) on whatever this machine has.
# Every setting is an environment variable; extra vlft flags can follow on the command line:
#   MODEL=Qwen/Qwen2.5-VL-3B-Instruct DATA=train.json IMAGE_FOLDER=images/ bash scripts/finetune_lora_vision.sh
# Several GPUs or nodes: NUM_GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE, ZERO_CONFIG (README).
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
DATA="${DATA:-$REPO/data_examples/llava_demo.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples/images}"
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_lora_vision)}"
if [ -z "$MODEL" ]; then
  MODEL="$(tiny_model qwen2_vl)"
  EPOCHS="${EPOCHS:-30}"; LR="${LR:-5e-3}"; LORA_RANK="${LORA_RANK:-16}"; LORA_ALPHA="${LORA_ALPHA:-32}"
  BATCH_SIZE="${BATCH_SIZE:-2}"; GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-$(( BATCH_SIZE * $(world_size) ))}"; NUM_WORKERS="${NUM_WORKERS:-0}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-2e-4}"                                     # language-model LoRA
VISION_LR="${VISION_LR:-}"                           # vision LoRA (empty: same as LR)
MERGER_LR="${MERGER_LR:-}"                           # merger (empty: same as LR)
LORA_RANK="${LORA_RANK:-64}"
LORA_ALPHA="${LORA_ALPHA:-64}"
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
USE_DORA="${USE_DORA:-false}"
BITS="${BITS:-16}"                                   # 4 or 8 = QLoRA
BATCH_SIZE="${BATCH_SIZE:-4}"                        # per device
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-64}"             # over all processes; accumulation follows
MAX_SEQ_LENGTH="${MAX_SEQ_LENGTH:-8192}"
IMAGE_MIN_PIXELS="${IMAGE_MIN_PIXELS:-3136}"
IMAGE_MAX_PIXELS="${IMAGE_MAX_PIXELS:-12845056}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
BF16="${BF16:-$(default_bf16)}"
USE_LIGER="${USE_LIGER:-$(default_liger)}"
ATTN="${ATTN:-sdpa}"                                 # flash_attention_2 if installed
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-$BF16}"
NUM_WORKERS="${NUM_WORKERS:-4}"
SAVE_STEPS="${SAVE_STEPS:-500}"
LOGGING_STEPS="${LOGGING_STEPS:-1}"
REPORT_TO="${REPORT_TO:-none}"
PACKING="${PACKING:-false}"                          # 1/true: pack records into MAX_SEQ_LENGTH rows
GROUP_BY_LENGTH="${GROUP_BY_LENGTH:-false}"          # padded batches of similar lengths (not with PACKING)

mapfile -t OPTIONAL < <(optional_flag vision_lr "$VISION_LR"; optional_flag merger_lr "$MERGER_LR")
GRAD_ACCUM="$(grad_accum "$GLOBAL_BATCH_SIZE" "$BATCH_SIZE")"
mapfile -t TRAINING < <(training_flags "${OPTIONAL[@]}")
vlft_launch sft \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  --image_folder "$IMAGE_FOLDER" \
  --output_dir "$OUTPUT_DIR" \
  --lora_enable true \
  --vision_lora true \
  --use_dora "$USE_DORA" \
  --bits "$BITS" \
  --lora_rank "$LORA_RANK" \
  --lora_alpha "$LORA_ALPHA" \
  --lora_dropout "$LORA_DROPOUT" \
  --freeze_merger "$FREEZE_MERGER" \
  "${TRAINING[@]}" \
  "$@"
mark_latest "$OUTPUT_DIR"
