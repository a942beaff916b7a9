#!/usr/bin/env bash
# Video (and mixed image/video/text) fine-tuning: everything trains by default, the vision tower at VISION_LR;
# LORA=true switches to LoRA on the language model and the vision blocks.
# With no settings it runs the offline demo (tiny model + data_examples/llava_video_demo.json).
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
# Every setting is an environment variable; extra vlft flags can follow on the command line:
#   MODEL=Qwen/Qwen2.5-VL-3B-Instruct DATA=videos.json IMAGE_FOLDER=/data/media FPS=1 bash scripts/finetune_video.sh
# Several GPUs or nodes: NUM_GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE, ZERO_CONFIG (README).
# Settings shared by every finetune script (IMAGE_MIN/MAX_PIXELS, BF16, USE_LIGER, ATTN, GRADIENT_CHECKPOINTING,
# NUM_WORKERS, SAVE_STEPS, LOGGING_STEPS, REPORT_TO, PACKING, GROUP_BY_LENGTH) and their defaults: shared_settings
# in scripts/_common.sh. EVAL_DATA (held-out records) and EVAL_STEPS: eval_loss during training.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
if [ -z "${DATA:-}" ]; then                          # the demo data; its media paths start in this folder
  DATA="$REPO/data_examples/llava_video_demo.json"; IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples}"
fi
IMAGE_FOLDER="${IMAGE_FOLDER:-}"                     # empty: media paths resolve against the data file's folder
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_video)}"
if [ -z "$MODEL" ]; then
  demo_model qwen2_vl                                # batch 2, one step per batch, no loader workers
  EPOCHS="${EPOCHS:-20}"; LR="${LR:-1e-3}"; VISION_LR="${VISION_LR-}"
  # the tiny model's tokens are 16 pixels a side, so frames of a few thousand pixels are plenty
  VIDEO_MIN_PIXELS="${VIDEO_MIN_PIXELS:-1024}"; VIDEO_MAX_PIXELS="${VIDEO_MAX_PIXELS:-4096}"
  VIDEO_MAX_TOTAL_PIXELS="${VIDEO_MAX_TOTAL_PIXELS:-65536}"
fi
LORA="${LORA:-false}"
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-5}"                                     # language model (LoRA: use about 1e-4)
VISION_LR="${VISION_LR-2e-6}"                        # vision tower (set empty: same as LR)
MERGER_LR="${MERGER_LR:-}"                           # empty: same as LR
BATCH_SIZE="${BATCH_SIZE:-1}"                        # per device
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-32}"         # over all processes; accumulation follows
MAX_SEQ_LENGTH="${MAX_SEQ_LENGTH:-16384}"
FPS="${FPS:-}"                                       # frames sampled per second (default 2) ...
NFRAMES="${NFRAMES:-}"                               # ... or an exact frame count (not both)
VIDEO_MIN_FRAMES="${VIDEO_MIN_FRAMES:-4}"
VIDEO_MAX_FRAMES="${VIDEO_MAX_FRAMES:-768}"
# Frame budgets in pixels, Qwen2/2.5-VL's defaults (tokens x 28 x 28); set empty for the model family's own
# (the same token counts, x 32 x 32 for Qwen3-VL)
VIDEO_MIN_PIXELS="${VIDEO_MIN_PIXELS-100352}"        # per frame (128 tokens)
VIDEO_MAX_PIXELS="${VIDEO_MAX_PIXELS-602112}"        # per frame (768 tokens)
VIDEO_MAX_TOTAL_PIXELS="${VIDEO_MAX_TOTAL_PIXELS-6422528}"  # all frames of one video (8192 tokens)
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-false}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
shared_settings

if [ "$LORA" = true ]; then
  TUNE=(--lora_enable true --vision_lora true --freeze_merger "$FREEZE_MERGER")
else
  TUNE=(--freeze_vision_tower "$FREEZE_VISION_TOWER" --freeze_merger "$FREEZE_MERGER")
  [ "$FREEZE_VISION_TOWER" = true ] && VISION_LR=""   # nothing in the tower trains
fi
mapfile -t VIDEO < <(optional_flag fps "$FPS"; optional_flag nframes "$NFRAMES"
                     optional_flag video_min_pixels "$VIDEO_MIN_PIXELS"; optional_flag video_max_pixels "$VIDEO_MAX_PIXELS"
                     optional_flag video_max_total_pixels "$VIDEO_MAX_TOTAL_PIXELS")
mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
link_latest "$OUTPUT_DIR"
vlft_launch sft \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  "${TUNE[@]}" \
  "${TRAINING[@]}" \
  --video_min_frames "$VIDEO_MIN_FRAMES" \
  --video_max_frames "$VIDEO_MAX_FRAMES" \
  "${VIDEO[@]}" \
  "$@"
