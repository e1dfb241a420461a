# Sourced by the recipes: `launch script.py ...` runs on one GPU with python or on NGPU GPUs with torchrun.
#   NGPU=8 bash runs/divek_cub.sh        (default NGPU=1)
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
set -x
