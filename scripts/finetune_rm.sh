#!/usr/bin/env bash
# A reward model from preference pairs (vlft rm): DPO's pair records (data/preference.py: a LLaVA prompt with "chosen"
# and "rejected" answers, or 2U1's flat "prompt" form; images, videos, image-side pairs) with an optional "margin",
# trained with the Bradley-Terry loss; then score GRPO rollouts with it: REWARD_FUNCS=rm:OUTPUT_DIR bash
# scripts/finetune_grpo.sh.
# LoRA on the language model by default (LORA_ENABLE=false: full fine-tuning); the reward head and the merger train
# fully next to it. EVAL_DATA (held-out pairs): eval_accuracy and eval_margin every EVAL_STEPS.
# With no settings it runs the offline demo (tiny model + data_examples/dpo_demo.json) on whatever this machine has.
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
#   MODEL=Qwen/Qwen2.5-VL-3B-Instruct DATA=pairs.json IMAGE_FOLDER=images/ EVAL_DATA=held_out.json \
#     bash scripts/finetune_rm.sh
#   CENTER_REWARDS_COEFFICIENT=0.01 bash scripts/finetune_rm.sh    # keep the rewards near zero (TRL's advice)
# Launchers (NUM_GPUS, ZERO_CONFIG, ...) and the shared settings as in the SFT scripts (scripts/_common.sh).
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
if [ -z "${DATA:-}" ]; then                          # the demo data; its media paths start in this folder
  DATA="$REPO/data_examples/dpo_demo.json"; IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples}"
fi
IMAGE_FOLDER="${IMAGE_FOLDER:-}"                     # empty: media paths resolve against the data file's folder
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_rm)}"
if [ -z "$MODEL" ]; then
  demo_model qwen2_vl
  # 6 passes over the 6 pairs: every pair ends ranked right
  EPOCHS="${EPOCHS:-6}"; LR="${LR:-5e-3}"; LORA_RANK="${LORA_RANK:-16}"; LORA_ALPHA="${LORA_ALPHA:-32}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-4}"                                     # TRL's RewardConfig default
LORA_ENABLE="${LORA_ENABLE:-true}"
LORA_RANK="${LORA_RANK:-64}"
LORA_ALPHA="${LORA_ALPHA:-64}"
LORA_DROPOUT="${LORA_DROPOUT:-0.0}"
BITS="${BITS:-16}"                                   # 4 or 8 = QLoRA
CENTER_REWARDS_COEFFICIENT="${CENTER_REWARDS_COEFFICIENT:-}"  # empty: no centring term
BATCH_SIZE="${BATCH_SIZE:-2}"                        # pairs per device (each pair is two sequences)
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-32}"
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-true}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
shared_settings

mapfile -t LORA < <(lora_flags)
mapfile -t CENTERING < <(optional_flag center_rewards_coefficient "$CENTER_REWARDS_COEFFICIENT")
mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
link_latest "$OUTPUT_DIR"
vlft_launch rm \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  "${LORA[@]}" \
  --freeze_vision_tower "$FREEZE_VISION_TOWER" \
  --freeze_merger "$FREEZE_MERGER" \
  "${CENTERING[@]}" \
  "${TRAINING[@]}" \
  "$@"
