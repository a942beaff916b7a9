#!/usr/bin/env bash
# DPO on preference pairs (data/preference.py: a LLaVA prompt with "chosen" and "rejected" answers, or 2U1's flat
# "prompt" form), usually after SFT: MODEL is then the merged SFT model (scripts/merge_lora.sh).
# LoRA on the language model by default (LORA_ENABLE=false: full fine-tuning, with a frozen reference copy);
# the merger trains fully next to it and the reference keeps its starting weights (train/preference/reference.py).
# With no settings it runs the offline demo (tiny model + data_examples/dpo_demo.json) on whatever this machine has.
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
#   MODEL=output/merged/sft DATA=pairs.json IMAGE_FOLDER=images/ BETA=0.1 bash scripts/finetune_dpo.sh
#   LOSS_TYPE=sigmoid,sft LOSS_WEIGHTS="1.0 1.0" bash scripts/finetune_dpo.sh    # RPO
#   PRECOMPUTE_REF=true bash scripts/finetune_dpo.sh    # one reference pass, cached in the run dir, no 2nd model
# Launchers (NUM_GPUS, ZERO_CONFIG, ...) and the shared settings as in the SFT scripts (scripts/_common.sh).
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
if [ -z "${DATA:-}" ]; then                          # the demo data; its media paths start in this folder
  DATA="$REPO/data_examples/dpo_demo.json"; IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples}"
fi
IMAGE_FOLDER="${IMAGE_FOLDER:-}"                     # empty: media paths resolve against the data file's folder
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_dpo)}"
if [ -z "$MODEL" ]; then
  demo_model qwen2_vl
  # 6 passes over the 6 pairs: the margins grow from 0 and every pair ends ranked right
  EPOCHS="${EPOCHS:-6}"; LR="${LR:-5e-3}"; LORA_RANK="${LORA_RANK:-16}"; LORA_ALPHA="${LORA_ALPHA:-32}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-5e-6}"                                     # DPO moves a good model a little: far below SFT rates
LORA_ENABLE="${LORA_ENABLE:-true}"
LORA_RANK="${LORA_RANK:-64}"
LORA_ALPHA="${LORA_ALPHA:-64}"
LORA_DROPOUT="${LORA_DROPOUT:-0.0}"                  # dropout would make policy and reference differ at step 0
BITS="${BITS:-16}"                                   # 4 or 8 = QLoRA
BETA="${BETA:-0.1}"
LOSS_TYPE="${LOSS_TYPE:-sigmoid}"                    # TRL's names; several comma-separated, with LOSS_WEIGHTS
LOSS_WEIGHTS="${LOSS_WEIGHTS:-}"                     # space-separated, one per loss type
LABEL_SMOOTHING="${LABEL_SMOOTHING:-0.0}"
PRECOMPUTE_REF="${PRECOMPUTE_REF:-false}"
TRUNCATION_MODE="${TRUNCATION_MODE:-keep_start}"     # keep_start: cut answers to MAX_SEQ_LENGTH; drop: leave out
BATCH_SIZE="${BATCH_SIZE:-2}"                        # pairs per device (each pair is two sequences)
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-32}"
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-true}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
shared_settings

mapfile -t LORA < <(lora_flags)
mapfile -t WEIGHTS < <(list_flag loss_weights "$LOSS_WEIGHTS")
mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
link_latest "$OUTPUT_DIR"
vlft_launch dpo \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  "${LORA[@]}" \
  --freeze_vision_tower "$FREEZE_VISION_TOWER" \
  --freeze_merger "$FREEZE_MERGER" \
  --beta "$BETA" \
  --loss_type "$LOSS_TYPE" \
  "${WEIGHTS[@]}" \
  --label_smoothing "$LABEL_SMOOTHING" \
  --precompute_ref_log_probs "$PRECOMPUTE_REF" \
  --truncation_mode "$TRUNCATION_MODE" \
  "${TRAINING[@]}" \
  "$@"
