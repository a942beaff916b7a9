#!/usr/bin/env bash
# LoRA on the language model's linear layers; merger trained fully; vision tower frozen
# (PEFT_TYPE=p_tuning or prompt_tuning with NUM_VIRTUAL_TOKENS: only virtual tokens train, instead of LoRA)
# (FREEZE_VISION_TOWER=false trains it fully too: 2U1's default LoRA recipe, with VISION_LR).
# With no settings it runs the offline demo (tiny model + data_examples/) on whatever this machine has.
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
# Every setting is an environment variable; extra vlft flags can follow on the command line:
#   MODEL=Qwen/Qwen2-VL-2B-Instruct DATA=train.json IMAGE_FOLDER=images/ bash scripts/finetune_lora.sh --save_steps 200
# Several GPUs or nodes: NUM_GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE, ZERO_CONFIG (README):
#   NUM_GPUS=8 ZERO_CONFIG=zero_configs/zero3.json bash scripts/finetune_lora.sh
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
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_lora)}"
if [ -z "$MODEL" ]; then
  demo_model qwen2_vl                                # batch 2, one step per batch, no loader workers
  # a random tiny model needs many passes at a high rate to memorise 10 records
  EPOCHS="${EPOCHS:-30}"; LR="${LR:-5e-3}"; LORA_RANK="${LORA_RANK:-16}"; LORA_ALPHA="${LORA_ALPHA:-32}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-4}"
LORA_RANK="${LORA_RANK:-64}"
LORA_ALPHA="${LORA_ALPHA:-64}"
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
USE_DORA="${USE_DORA:-false}"
BITS="${BITS:-16}"                                   # 4 or 8 = QLoRA
VISION_LR="${VISION_LR:-}"                           # only when the tower trains (empty: same as LR)
MERGER_LR="${MERGER_LR:-}"                           # empty: same as LR
BATCH_SIZE="${BATCH_SIZE:-4}"                        # per device
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-64}"         # over all processes; accumulation follows
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-true}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
PEFT_TYPE="${PEFT_TYPE:-lora}"                       # lora, or virtual tokens only: p_tuning / prompt_tuning
NUM_VIRTUAL_TOKENS="${NUM_VIRTUAL_TOKENS:-20}"       # with p_tuning / prompt_tuning
shared_settings

mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
mapfile -t LORA_OPTIONS < <(lora_option_flags)      # USE_RSLORA, INIT_LORA_WEIGHTS, LORAPLUS_LR_RATIO if set
if [ "$PEFT_TYPE" = lora ]; then
  METHOD=(--lora_enable true --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT"
          --use_dora "$USE_DORA" --bits "$BITS" "${LORA_OPTIONS[@]}")
else                                                 # only the virtual tokens train
  METHOD=(--peft_type "$PEFT_TYPE" --num_virtual_tokens "$NUM_VIRTUAL_TOKENS")
fi
link_latest "$OUTPUT_DIR"
vlft_launch sft \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  "${METHOD[@]}" \
  --freeze_vision_tower "$FREEZE_VISION_TOWER" \
  --freeze_merger "$FREEZE_MERGER" \
  "${TRAINING[@]}" \
  "$@"
