# Shared by every scripts/*.sh: locate the repo and Python, provide the tiny demo model, pick the precision,
# hold the settings every finetune script shares (shared_settings, training_flags), and launch. Sourced, not run.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export VLFT_CACHE="${VLFT_CACHE:-$REPO/.cache/vlft}"

# The embedded default model, built offline once and reused.
tiny_model() {
  local dir="$VLFT_CACHE/tiny-${1:-qwen2_vl}"
  "$PYTHON" -m vlft tiny-model "$dir" --family "${1:-qwen2_vl}" --exist_ok >&2
  echo "$dir"
}

# bf16 where a CUDA GPU answers, fp32 elsewhere (the CPU demo).
default_bf16() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo true; else echo false; fi
}

# A fresh run directory per call, so no earlier run is overwritten; <name>/latest points at the newest finished one.
# With RESUME=latest (and no OUTPUT_DIR) the newest run folder of this script is continued instead, finished or
# not: a requeued job needs no path. vlft refuses the resume if that run's data, model or settings differ.
new_output_dir() {
  if [ "${RESUME:-}" = latest ]; then
    local newest
    newest="$(ls -1d "$REPO/output/$1"/[0-9]*/ 2>/dev/null | sort | tail -n 1)"
    if [ -n "$newest" ]; then
      echo "[vlft] RESUME=latest: continuing the newest run of $1, ${newest%/} (set OUTPUT_DIR to choose another)" >&2
      echo "${newest%/}"
      return
    fi
  fi
  echo "$REPO/output/$1/$(date +%Y%m%d-%H%M%S)"
}

link_latest() {  # link_latest OUTPUT_DIR: vlft points the sibling `latest` link at OUTPUT_DIR once the run has finished
  export VLFT_LATEST_LINK="$(dirname "$1")/latest"  # (not for a run stopped by a signal: it has a checkpoint, no model)
}

# ---- launching: one process, torchrun (DDP) or the DeepSpeed launcher, from these settings ----
# NUM_GPUS     processes per node (default: the GPUs nvidia-smi lists; 1 without GPUs)
# NNODES       nodes (default 1); NODE_RANK this node's rank (default 0)
# MASTER_ADDR  address of node 0 (default 127.0.0.1); MASTER_PORT (default 29500)
# HOSTFILE     DeepSpeed hostfile ("host slots=N" lines): the launcher on node 0 starts every node over ssh;
#              without it, run the same command on every node with its NODE_RANK (no ssh needed)
# ZERO_CONFIG  a DeepSpeed config (zero_configs/zero2.json, zero3.json, ...): train under DeepSpeed
# Without a GPU, several processes or a ZERO_CONFIG make a CPU rehearsal (gloo), to check configs and data
# before renting GPUs.

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then nvidia-smi -L | wc -l; else echo 1; fi
}

world_size() {
  echo $(( ${NUM_GPUS:-$(gpu_count)} * ${NNODES:-1} ))
}

# grad_accum GLOBAL_BATCH_SIZE PER_DEVICE_BATCH: accumulation steps that make the global batch, or an error.
grad_accum() {
  local world per_step
  world=$(world_size); per_step=$(( $2 * world ))
  if [ "$1" -lt "$per_step" ] || [ $(( $1 % per_step )) -ne 0 ]; then
    echo "GLOBAL_BATCH_SIZE=$1 is not a multiple of BATCH_SIZE=$2 x $world processes ($per_step); change one of them" >&2
    return 1
  fi
  echo $(( $1 / per_step ))
}

# The launch is the script's last act and replaces its shell (exec): a scheduler's SIGTERM / SIGUSR1 to the job
# reaches vlft (which saves a checkpoint and exits 0) instead of killing the shell, and the script's exit status is
# vlft's. The `latest` link is set by vlft itself at the end of a finished run (link_latest).
vlft_launch() {
  local nproc="${NUM_GPUS:-$(gpu_count)}" nnodes="${NNODES:-1}" node_rank="${NODE_RANK:-0}"
  local addr="${MASTER_ADDR:-127.0.0.1}" port="${MASTER_PORT:-29500}"
  local extra=() gpu
  gpu=$(default_bf16)
  if [ -n "${ZERO_CONFIG:-}" ]; then
    [ -f "$ZERO_CONFIG" ] || { echo "ZERO_CONFIG=$ZERO_CONFIG: no such file (see zero_configs/)" >&2; return 2; }
    extra+=(--deepspeed "$ZERO_CONFIG")
  fi
  if [ "$gpu" = false ] && { [ $(( nproc * nnodes )) -gt 1 ] || [ -n "${ZERO_CONFIG:-}" ]; }; then
    echo "[vlft] no GPU: CPU rehearsal with $(( nproc * nnodes )) process(es) (gloo)" >&2
    export DS_ACCELERATOR=cpu
    extra+=(--use_cpu true --ddp_backend gloo)
    # DeepSpeed's CPU all-reduce names its shared memory by address and port (vlft unlinks the names once the
    # ranks have mapped them, vlft/train/common.py). A segment left on this port by a run killed earlier would
    # be mapped by the new ranks as if it were a peer's: remove those first; no rank of this run exists yet.
    rm -f "/dev/shm/deepspeed_allreduce_buffer_$(id -u)_${addr}_${port}_"* 2>/dev/null || true
  fi
  if [ -n "${ZERO_CONFIG:-}" ]; then
    local nodes=(--num_nodes "$nnodes" --master_addr "$addr" --master_port "$port")
    if [ -n "${HOSTFILE:-}" ]; then
      nodes+=(--hostfile "$HOSTFILE")
    elif [ "$nnodes" -gt 1 ]; then
      nodes+=(--no_ssh --node_rank "$node_rank")
    fi
    exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$nproc" "${nodes[@]}" --no_local_rank --module vlft "$@" "${extra[@]}"
  elif [ $(( nproc * nnodes )) -gt 1 ]; then
    exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "$nnodes" --node_rank "$node_rank" \
      --master_addr "$addr" --master_port "$port" -m vlft "$@" "${extra[@]}"
  else
    exec "$PYTHON" -m vlft "$@" "${extra[@]}"
  fi
}

# Liger kernels where a GPU and liger-kernel are present (USE_LIGER=true/false overrides).
default_liger() {
  if [ "$(default_bf16)" = true ] && "$PYTHON" -c "import liger_kernel" >/dev/null 2>&1; then echo true; else echo false; fi
}

# TensorBoard when this Python has it (event files in OUTPUT_DIR/runs: tensorboard --logdir OUTPUT_DIR), else none,
# so the demo runs where it is not installed. REPORT_TO=wandb (pip install wandb; wandb login) or none overrides.
default_report_to() {
  if "$PYTHON" -c "import tensorboard" >/dev/null 2>&1; then echo tensorboard; else echo none; fi
}

# optional_flag NAME VALUE: prints "--NAME VALUE" only when VALUE is set, for flags whose absence means "default".
optional_flag() {
  if [ -n "$2" ]; then printf '%s\n' "--$1" "$2"; fi
}

# list_flag NAME "A B C": prints "--NAME A B C" one per line (nothing when the list is empty), for list-valued flags
# set from one space-separated setting (LOSS_WEIGHTS, REWARD_FUNCS, ...).
list_flag() {
  if [ -n "$2" ]; then
    local items
    read -r -a items <<< "$2"
    printf '%s
' "--$1" "${items[@]}"
  fi
}

# lora_flags: the LoRA flags from LORA_ENABLE, LORA_RANK, LORA_ALPHA, LORA_DROPOUT, BITS and those of
# lora_option_flags, one per line (nothing unless LORA_ENABLE=true), for the scripts where LoRA is a setting
# (finetune_dpo.sh, finetune_grpo.sh).
lora_flags() {
  if [ "${LORA_ENABLE:-false}" = true ]; then
    printf '%s
' --lora_enable true --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
      --bits "$BITS"
    lora_option_flags
  fi
}

# lora_option_flags: PEFT's LoRA options from USE_RSLORA (true: scale by alpha/sqrt(r)), INIT_LORA_WEIGHTS (pissa,
# olora, gaussian, ...) and LORAPLUS_LR_RATIO (LoRA+: B learns at ratio x the rate), one per line, each only when
# set (unset: PEFT's default).
lora_option_flags() {
  optional_flag use_rslora "${USE_RSLORA:-}"
  optional_flag init_lora_weights "${INIT_LORA_WEIGHTS:-}"
  optional_flag loraplus_lr_ratio "${LORAPLUS_LR_RATIO:-}"
}

# ---- settings every finetune script shares; each script sets its own first, at its top ----

# demo_model FAMILY: the offline demo's model and batch, for settings still unset: the tiny model, 2 records per
# device, one optimizer step per batch over all processes, data read in the main process (the tiny model's batches
# are faster to build than worker processes are to start).
demo_model() {
  MODEL="$(tiny_model "$1")"
  BATCH_SIZE="${BATCH_SIZE:-2}"
  GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-$(( BATCH_SIZE * $(world_size) ))}"
  NUM_WORKERS="${NUM_WORKERS:-0}"
}

# shared_settings: the defaults of the settings every finetune script has, for those the environment and the
# script left unset; then GRAD_ACCUM, the accumulation steps that make GLOBAL_BATCH_SIZE (or an error).
shared_settings() {
  MAX_SEQ_LENGTH="${MAX_SEQ_LENGTH:-8192}"             # tokens per record, vision tokens included
  IMAGE_MIN_PIXELS="${IMAGE_MIN_PIXELS:-}"             # empty: the model family's default, 4 tokens (3136 pixels
  IMAGE_MAX_PIXELS="${IMAGE_MAX_PIXELS:-}"             # for Qwen2/2.5-VL, 4096 for Qwen3-VL) .. 16384 tokens
  BF16="${BF16:-$(default_bf16)}"
  USE_LIGER="${USE_LIGER:-$(default_liger)}"
  ATTN="${ATTN:-sdpa}"                                 # flash_attention_2 if installed
  GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-$BF16}"  # on for GPU runs
  CORES="$(nproc 2>/dev/null || echo 4)"
  NUM_WORKERS="${NUM_WORKERS:-$(( CORES < 4 ? CORES : 4 ))}"  # loader workers per process: 4, or the cores there are
  SAVE_STEPS="${SAVE_STEPS:-500}"
  LOGGING_STEPS="${LOGGING_STEPS:-1}"                  # every step to TensorBoard and OUTPUT_DIR/log.jsonl
  LOG_LINE_STEPS="${LOG_LINE_STEPS:-10}"               # one readable line on the terminal every N steps
  REPORT_TO="${REPORT_TO:-$(default_report_to)}"       # tensorboard when installed, else none; or wandb
  EVAL_DATA="${EVAL_DATA:-}"                           # held-out records (DATA's format): eval_loss every EVAL_STEPS
  EVAL_STEPS="${EVAL_STEPS:-$SAVE_STEPS}"              # steps between evaluations (sft, rm)
  PACKING="${PACKING:-false}"                          # 1/true: pack records into MAX_SEQ_LENGTH rows
  GROUP_BY_LENGTH="${GROUP_BY_LENGTH:-false}"          # padded batches of similar lengths (not with PACKING)
  RESUME="${RESUME:-}"                                 # latest (newest complete checkpoint in OUTPUT_DIR) or a path
  GRAD_ACCUM="$(grad_accum "$GLOBAL_BATCH_SIZE" "$BATCH_SIZE")"
}

# training_flags [EXTRA...]: the training flags every finetune script passes, from its settings (EPOCHS, LR,
# VISION_LR, MERGER_LR, BATCH_SIZE, GRAD_ACCUM and those of shared_settings), one per line; EXTRA follow the
# learning rates. Settings whose empty value means "vlft's default" (VISION_LR, MERGER_LR, IMAGE_*_PIXELS, RESUME,
# EVAL_DATA) give no flag when empty.
training_flags() {
  local packing=false
  case "$PACKING" in 1|true|True) packing=true ;; esac
  printf '%s\n' --num_train_epochs "$EPOCHS" --learning_rate "$LR"
  optional_flag vision_lr "${VISION_LR:-}"
  optional_flag merger_lr "${MERGER_LR:-}"
  optional_flag image_min_pixels "$IMAGE_MIN_PIXELS"
  optional_flag image_max_pixels "$IMAGE_MAX_PIXELS"
  optional_flag resume_from_checkpoint "$RESUME"
  if [ -n "$EVAL_DATA" ]; then
    printf '%s\n' --eval_data_path "$EVAL_DATA" --eval_strategy steps --eval_steps "$EVAL_STEPS" \
      --per_device_eval_batch_size "$BATCH_SIZE"
  fi
  printf '%s\n' "$@" \
    --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM" \
    --max_seq_length "$MAX_SEQ_LENGTH" --packing "$packing" --group_by_length "$GROUP_BY_LENGTH" \
    --bf16 "$BF16" --use_liger "$USE_LIGER" --attn_implementation "$ATTN" \
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
    --weight_decay 0.0 --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps "$LOGGING_STEPS" \
    --log_line_steps "$LOG_LINE_STEPS" \
    --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 3 \
    --dataloader_num_workers "$NUM_WORKERS" --report_to "$REPORT_TO"
}
