#!/usr/bin/env bash
# KTO on single answers marked good or bad (data/kto.py: a LLaVA prompt, or 2U1's flat "prompt" form, with one
# "completion" and its "label": true / 1 for a thumbs up, false / 0 for a thumbs down), usually after SFT: MODEL is
# then the merged SFT model (scripts/merge_lora.sh). The start-up log gives the balance of the labels and, when it
# is off the KTO paper's range, the DESIRABLE_WEIGHT or UNDESIRABLE_WEIGHT that would balance it.
# LoRA on the language model by default (LORA_ENABLE=false: full fine-tuning, with a frozen reference copy);
# the merger trains fully next to it and the reference keeps its starting weights (train/preference/reference.py).
# With no settings it runs the offline demo (tiny model + data_examples/kto_demo.json) on whatever this machine has.
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
#   MODEL=output/merged/sft DATA=thumbs.json IMAGE_FOLDER=images/ BETA=0.1 bash scripts/finetune_kto.sh
#   DESIRABLE_WEIGHT=1.33 bash scripts/finetune_kto.sh   # fewer thumbs up than down: weigh them more
#   PRECOMPUTE_REF=true bash scripts/finetune_kto.sh     # one reference pass, cached in the run dir, no 2nd model
# Launchers (NUM_GPUS, ZERO_CONFIG, ...) and the shared settings as in the SFT scripts (scripts/_common.sh).
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
if [ -z "${DATA:-}" ]; then                          # the demo data; its media paths start in this folder
  DATA="$REPO/data_examples/kto_demo.json"; IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples}"
fi
IMAGE_FOLDER="${IMAGE_FOLDER:-}"                     # empty: media paths resolve against the data file's folder
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_kto)}"
if [ -z "$MODEL" ]; then
  demo_model qwen2_vl
  # 6 passes over the 9 records: the desirable answers' rewards rise over the undesirable ones'
  EPOCHS="${EPOCHS:-6}"; LR="${LR:-5e-3}"; LORA_RANK="${LORA_RANK:-16}"; LORA_ALPHA="${LORA_ALPHA:-32}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-5e-6}"                                     # KTO moves a good model a little: far below SFT rates
LORA_ENABLE="${LORA_ENABLE:-true}"
LORA_RANK="${LORA_RANK:-64}"
LORA_ALPHA="${LORA_ALPHA:-64}"
LORA_DROPOUT="${LORA_DROPOUT:-0.0}"                  # dropout would make policy and reference differ at step 0
BITS="${BITS:-16}"                                   # 4 or 8 = QLoRA
BETA="${BETA:-0.1}"
LOSS_TYPE="${LOSS_TYPE:-kto}"                        # kto or apo_zero_unpaired (TRL's names)
DESIRABLE_WEIGHT="${DESIRABLE_WEIGHT:-1.0}"          # weight of the thumbs-up records' losses
UNDESIRABLE_WEIGHT="${UNDESIRABLE_WEIGHT:-1.0}"      # weight of the thumbs-down records' losses
PRECOMPUTE_REF="${PRECOMPUTE_REF:-false}"
TRUNCATION_MODE="${TRUNCATION_MODE:-keep_start}"     # keep_start: cut answers to MAX_SEQ_LENGTH; drop: leave out
BATCH_SIZE="${BATCH_SIZE:-2}"                        # records per device (each is two sequences: its answer, a KL one)
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-32}"
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-true}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
shared_settings

mapfile -t LORA < <(lora_flags)
mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
link_latest "$OUTPUT_DIR"
vlft_launch kto \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  "${LORA[@]}" \
  --freeze_vision_tower "$FREEZE_VISION_TOWER" \
  --freeze_merger "$FREEZE_MERGER" \
  --beta "$BETA" \
  --loss_type "$LOSS_TYPE" \
  --desirable_weight "$DESIRABLE_WEIGHT" \
  --undesirable_weight "$UNDESIRABLE_WEIGHT" \
  --precompute_ref_log_probs "$PRECOMPUTE_REF" \
  --truncation_mode "$TRUNCATION_MODE" \
  "${TRAINING[@]}" \
  "$@"
