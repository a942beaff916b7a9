# Shared by every scripts/*.sh: locate the repo and Python, provide the tiny demo model, pick the
# precision, and launch. Sourced, not run.
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

# A fresh run directory per call, so no earlier run is overwritten; <name>/latest points at the newest.
new_output_dir() {
  echo "$REPO/output/$1/$(date +%Y%m%d-%H%M%S)"
}

mark_latest() {  # mark_latest OUTPUT_DIR: update the sibling `latest` link after a successful run
  ln -sfn "$(basename "$1")" "$(dirname "$1")/latest"
}

# One place that starts training. Single process today; multi-GPU launchers plug in here.
vlft_launch() {
  "$PYTHON" -m vlft "$@"
}

# Liger kernels where a GPU and liger-kernel are present (USE_LIGER=true/false overrides).
default_liger() {
  if [ "$(default_bf16)" = true ] && "$PYTHON" -c "import liger_kernel" >/dev/null 2>&1; then echo true; else echo false; fi
}

# optional_flag NAME VALUE: prints "--NAME VALUE" only when VALUE is set, for flags whose absence means "default".
optional_flag() {
  if [ -n "$2" ]; then printf '%s\n' "--$1" "$2"; fi
}
