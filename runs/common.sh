# Sourced by the recipes: `launch script.py ...` runs on one GPU with python or on NGPU GPUs with torchrun.
#   NGPU=8 bash runs/divek_cub.sh                                  (default NGPU=1)
#   MODEL=Qwen/Qwen3-VL-8B-Instruct NGPU=8 bash runs/divek_cub.sh    (either family; read from its config)
NGPU=${NGPU:-1}
MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct}
launch() {
  if [ "$NGPU" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NGPU" "$@"
  else
    python "$@"
  fi
}
set -euo pipefail
# Image budgets are counts of visual tokens, the same for both families: a token covers 28x28 px in Qwen2.5-VL
# (patch 14, 2x2 merged) and 32x32 px in Qwen3-VL (patch 16), so tokens = pixels / 28² or / 32², and
# `pixels N` is the --max_pixels of N tokens for $MODEL's family: pixels 512 = 401408 (the papers' setting on
# Qwen2.5-VL) or 524288 (Qwen3-VL).
TOKEN_PX=$(python -c 'import sys, vlm; from transformers import AutoConfig
print((2 * vlm.family(AutoConfig.from_pretrained(sys.argv[1])).patch_size) ** 2)' "$MODEL")
pixels() { echo $(( $1 * TOKEN_PX )); }
set -x
