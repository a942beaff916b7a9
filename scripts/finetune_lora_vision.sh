#!/usr/bin/env bash
# LoRA on the language model AND on the vision blocks; merger trained fully.
# With no settings it runs the offline demo (tiny model + data_examples/) on whatever this machine has.
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
# Every setting is an environment variable; extra vlft flags can follow on the command line:
#   MODEL=Qwen/Qwen2.5-VL-3B-Instruct DATA=train.json IMAGE_FOLDER=images/ bash scripts/finetune_lora_vision.sh
# Several GPUs or nodes: NUM_GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE, ZERO_CONFIG (README).
# Settings shared by every finetune script (MAX_SEQ_LENGTH, IMAGE_MIN/MAX_PIXELS, BF16, USE_LIGER, ATTN,
# GRADIENT_CHECKPOINTING, NUM_WORKERS, SAVE_STEPS, LOGGING_STEPS, REPORT_TO, PACKING, GROUP_BY_LENGTH) and their
# defaults: shared_settings in scripts/_common.sh. EVAL_DATA (held-out records) and EVAL_STEPS: eval_loss during training.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
if [ -z "${DATA:-}" ]; then                          # the demo data; its media paths start in this folder
  DATA="$REPO/data_examples/llava_demo.json"; IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples/images}"
fi
IMAGE_FOLDER="${IMAGE_FOLDER:-}"                     # empty: media paths resolve against the data file's folder
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_lora_vision)}"
if [ -z "$MODEL" ]; then
  demo_model qwen2_vl                                # batch 2, one step per batch, no loader workers
  EPOCHS="${EPOCHS:-30}"; LR="${LR:-5e-3}"; LORA_RANK="${LORA_RANK:-16}"; LORA_ALPHA="${LORA_ALPHA:-32}"
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
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-64}"         # over all processes; accumulation follows
FREEZE_MERGER="${FREEZE_MERGER:-false}"
shared_settings

mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
mapfile -t LORA_OPTIONS < <(lora_option_flags)      # USE_RSLORA, INIT_LORA_WEIGHTS, LORAPLUS_LR_RATIO if set
link_latest "$OUTPUT_DIR"
vlft_launch sft \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  --lora_enable true \
  --vision_lora true \
  --use_dora "$USE_DORA" \
  --bits "$BITS" \
  "${LORA_OPTIONS[@]}" \
  --lora_rank "$LORA_RANK" \
  --lora_alpha "$LORA_ALPHA" \
  --lora_dropout "$LORA_DROPOUT" \
  --freeze_merger "$FREEZE_MERGER" \
  "${TRAINING[@]}" \
  "$@"
