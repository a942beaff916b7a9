#!/usr/bin/env bash
# Full fine-tuning: language model, merger and vision tower all train (freeze any with the variables).
# With no settings it runs the offline demo (tiny model + data_examples/) on whatever this machine has.
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
# Every setting is an environment variable; extra vlft flags can follow on the command line:
#   MODEL=Qwen/Qwen2-VL-2B-Instruct DATA=train.json IMAGE_FOLDER=images/ bash scripts/finetune.sh
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
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune)}"
if [ -z "$MODEL" ]; then
  demo_model qwen2_vl                                # batch 2, one step per batch, no loader workers
  EPOCHS="${EPOCHS:-20}"; LR="${LR:-1e-3}"; VISION_LR="${VISION_LR-}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-5}"                                     # language model
VISION_LR="${VISION_LR-2e-6}"                        # vision tower (set empty: same as LR)
MERGER_LR="${MERGER_LR:-}"                           # merger (empty: same as LR)
BATCH_SIZE="${BATCH_SIZE:-4}"                        # per device
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-64}"         # over all processes; accumulation follows
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-false}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
FREEZE_LLM="${FREEZE_LLM:-false}"
shared_settings

[ "$FREEZE_VISION_TOWER" = true ] && VISION_LR=""   # nothing in the tower trains
mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
link_latest "$OUTPUT_DIR"
vlft_launch sft \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  --freeze_vision_tower "$FREEZE_VISION_TOWER" \
  --freeze_merger "$FREEZE_MERGER" \
  --freeze_llm "$FREEZE_LLM" \
  "${TRAINING[@]}" \
  "$@"
