#!/usr/bin/env bash
# GRPO on prompts with verifiable answers (data/grpo.py: a LLaVA prompt with media and any extra keys, e.g.
# "solution", which reach the reward functions by name), usually after SFT: MODEL is then the merged SFT model.
# LoRA on the language model by default (LORA_ENABLE=false: full fine-tuning). REWARD_FUNCS takes built-in names
# (format think_format accuracy count choice iou overlong repetition) and path/to/file.py:function or module:function;
# on thinking models accuracy, count, choice and iou score the answer after </think>.
# With no settings it runs the offline demo (tiny model + data_examples/grpo_demo.json) on whatever this machine has.
# MODEL: any Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense or MoE) or Qwen3.5 (dense or MoE) checkpoint, e.g. Qwen/Qwen3.5-9B;
# the family comes from its config.json (README: the model table).
#   MODEL=output/merged/sft DATA=prompts.json IMAGE_FOLDER=images/ REWARD_FUNCS="format accuracy" bash scripts/finetune_grpo.sh
#   REWARD_FUNCS="format my_rewards.py:box_reward" REWARD_WEIGHTS="0.5 1.0" NUM_GENERATIONS=8 bash scripts/finetune_grpo.sh
# USE_VLLM=true generates with vLLM (pip install vllm; image and text prompts, not video): VLLM_MODE=colocate (the
# default, an engine inside every training process) or VLLM_MODE=server with a `trl vllm-serve` already running
# (VLLM_SERVER_BASE_URL, default http://0.0.0.0:8000).
# Launchers (NUM_GPUS, ZERO_CONFIG, ...) and the shared settings as in the SFT scripts (scripts/_common.sh).
set -euo pipefail
source "$(dirname "$0")/_common.sh"

MODEL="${MODEL:-}"                                   # empty = tiny offline demo model
if [ -z "${DATA:-}" ]; then                          # the demo data; its media paths start in this folder
  DATA="$REPO/data_examples/grpo_demo.json"; IMAGE_FOLDER="${IMAGE_FOLDER:-$REPO/data_examples}"
fi
IMAGE_FOLDER="${IMAGE_FOLDER:-}"                     # empty: media paths resolve against the data file's folder
OUTPUT_DIR="${OUTPUT_DIR:-$(new_output_dir finetune_grpo)}"
if [ -z "$MODEL" ]; then
  # 4 completions of up to 8 tokens for 2 prompts per step, 3 epochs of the 7 prompts (3 steps each: 1 prompt an
  # epoch left out, as in TRL). The random tiny model cannot count (count stays near 0); the demo's own reward,
  # data_examples/grpo_demo_rewards.py:starts_with_word, is one it can learn, so the reward rises over the 9 steps
  NUM_GENERATIONS="${NUM_GENERATIONS:-4}"; BATCH_SIZE="${BATCH_SIZE:-8}"; EPOCHS="${EPOCHS:-3}"
  demo_model qwen2_vl
  MAX_COMPLETION_LENGTH="${MAX_COMPLETION_LENGTH:-8}"; LR="${LR:-5e-2}"; LORA_RANK="${LORA_RANK:-16}"
  LORA_ALPHA="${LORA_ALPHA:-32}"
  REWARD_FUNCS="${REWARD_FUNCS:-count $REPO/data_examples/grpo_demo_rewards.py:starts_with_word}"
fi
EPOCHS="${EPOCHS:-1}"
LR="${LR:-1e-6}"
LORA_ENABLE="${LORA_ENABLE:-true}"
LORA_RANK="${LORA_RANK:-64}"
LORA_ALPHA="${LORA_ALPHA:-64}"
LORA_DROPOUT="${LORA_DROPOUT:-0.0}"
BITS="${BITS:-16}"                                   # 4 or 8 = QLoRA
NUM_GENERATIONS="${NUM_GENERATIONS:-8}"
NUM_ITERATIONS="${NUM_ITERATIONS:-1}"                # optimizer steps per rollout (TRL's mu); > 1: clipping acts
MAX_COMPLETION_LENGTH="${MAX_COMPLETION_LENGTH:-512}"
TEMPERATURE="${TEMPERATURE:-1.0}"
BETA="${BETA:-0.0}"                                  # > 0: KL to the starting model (a reference is kept)
LOSS_TYPE="${LOSS_TYPE:-dapo}"
REWARD_FUNCS="${REWARD_FUNCS:-format accuracy}"
REWARD_WEIGHTS="${REWARD_WEIGHTS:-}"                 # space-separated, one per reward
BATCH_SIZE="${BATCH_SIZE:-8}"                        # completions per device (a multiple of NUM_GENERATIONS)
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-64}"
FREEZE_VISION_TOWER="${FREEZE_VISION_TOWER:-true}"
FREEZE_MERGER="${FREEZE_MERGER:-false}"
USE_VLLM="${USE_VLLM:-false}"                        # true: vLLM generates the completions
VLLM_MODE="${VLLM_MODE:-}"                           # colocate (empty = TRL's default) or server
VLLM_SERVER_BASE_URL="${VLLM_SERVER_BASE_URL:-}"     # server mode: the server's URL
shared_settings

mapfile -t LORA < <(lora_flags)
mapfile -t FUNCS < <(list_flag reward_funcs "$REWARD_FUNCS")
mapfile -t WEIGHTS < <(list_flag reward_weights "$REWARD_WEIGHTS")
mapfile -t MEDIA_FOLDER < <(optional_flag image_folder "$IMAGE_FOLDER")
mapfile -t TRAINING < <(training_flags)
mapfile -t VLLM < <(optional_flag vllm_mode "$VLLM_MODE"; optional_flag vllm_server_base_url "$VLLM_SERVER_BASE_URL")
link_latest "$OUTPUT_DIR"
vlft_launch grpo \
  --model_id "$MODEL" \
  --data_path "$DATA" \
  "${MEDIA_FOLDER[@]}" \
  --output_dir "$OUTPUT_DIR" \
  "${LORA[@]}" \
  --freeze_vision_tower "$FREEZE_VISION_TOWER" \
  --freeze_merger "$FREEZE_MERGER" \
  --num_generations "$NUM_GENERATIONS" \
  --num_iterations "$NUM_ITERATIONS" \
  --max_completion_length "$MAX_COMPLETION_LENGTH" \
  --temperature "$TEMPERATURE" \
  --beta "$BETA" \
  --loss_type "$LOSS_TYPE" \
  --use_vllm "$USE_VLLM" \
  "${VLLM[@]}" \
  "${FUNCS[@]}" \
  "${WEIGHTS[@]}" \
  "${TRAINING[@]}" \
  "$@"
