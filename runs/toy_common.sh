# Sourced by runs/toy.sh and runs/toy_learn.sh: the shared preamble and the toy base model.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SECONDS=0
stage() { echo; echo "=== [$(printf '%3d' $SECONDS)s] $*"; }

build_base() {  # build_base DATA OUT: the "Instruct" stand-in in OUT/base (cached: delete OUT/base to rebuild)
  [ -f "$2/base/final/config.json" ] && return
  stage "1. the base model: vision tower pretraining"
  python runs/toy_base.py --data "$1" --out "$2/vision"
  stage "1. the base model: attribute questions and MCQs about all classes"
  python sft.py --model "$2/vision" --data "$1/pretrain.jsonl" --out "$2/base" --batch_size 8 \
    --micro_batch_size 8 --lr 1e-3 --max_steps 800 --device cpu
}
