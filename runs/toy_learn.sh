#!/usr/bin/env bash
# The learning benchmark: does GRPO with DiVE-k's MCQ reward teach the model something?
#
#   bash runs/toy_learn.sh             # OUT=out/toy_learn; ~9 minutes on 2 CPU cores (5 of them: the start model)
#   CONTROL=1 bash runs/toy_learn.sh   # + the same GRPO with the format reward only (no MCQ signal)
#   SEED=1 OUT=out/toy_learn_s1 bash runs/toy_learn.sh   # the world drawn from another seed (other images)
#
# On the default toy world (names that spell out the attributes, "striped red triangle") the MCQ is pure
# perception: the SFT'd model sits at the vision tower's own ceiling, and nothing is left to learn. Here the world names the pattern with an invented epithet whose meaning depends on the
# colour and shape ("kavi red circle" is striped, "kavi green circle" checked). The starting model is the
# tiny model after sft.py on the pretraining mix, built as toy.sh builds its base, plus (--pretrain_naming)
# DiVE-k's mining question with the true class among 1..31 listed names: it sees shape, colour and
# pattern and names from a list, but has not learned which epithet goes with which look. DiVE-k mines its
# own confusions (about half the mined distractors share the true class's shape and colour) and GRPO on
# those MCQs teaches it. Held-out MCQ: test images, options the 8 corners of an attribute cube.
# What it measured: docs/LOG.md.
source "$(dirname "$0")/toy_common.sh"
OUT=${OUT:-out/toy_learn}
D=$OUT/data

stage "0. the toy world with epithet names"
[ -f "$D/classes.json" ] || python -m data.prepare toy --out "$D" --seed "${SEED:-0}" --names epithets --pretrain_naming
grep -q '"pretrain_naming": true' "$D/classes.json" || { echo "$D is an older world without --pretrain_naming: delete $OUT and rerun" >&2; exit 1; }

build_base "$D" "$OUT"  # the starting model, built as toy.sh builds its base

mcq() {  # mcq MODEL FOLDER: held-out MCQ accuracy
  python evaluate.py --model "$1" --data "$D/test_mcq.jsonl" --classes "$D/classes.json" --mode mcq \
    --out "$2" --prompts_per_call 64 --max_new_tokens 32 --device cpu > "$2.log"
}
mkdir -p "$OUT/eval"
stage "evaluate the starting model"
mcq "$OUT/base/final" "$OUT/eval/start"

stage "2. DiVE-k mining: the starting model's own top-5 answers per training image"
python mine_topk.py --model "$OUT/base/final" --data "$D/train.jsonl" --classes "$D/classes.json" \
  --out "$OUT/mine/mcq.jsonl" --num_samples 8 --k 5 --temperature 1.0 --top_p 0.95 --max_new_tokens 32 \
  --class_list base --prompts_per_call 16 --device cpu

train() {  # train NAME REWARD
  stage "3. GRPO, reward $2"
  python grpo.py --model "$OUT/base/final" --data "$OUT/mine/mcq.jsonl" --classes "$D/classes.json" \
    --out "$OUT/$1" --reward "$2" --loss grpo --beta 0.04 --num_samples 8 --prompts_per_step 16 \
    --temperature 1.0 --max_new_tokens 32 --lr 3e-4 --max_steps 120 --micro_batch_size 32 \
    --prompts_per_call 16 --device cpu
  mcq "$OUT/$1/final" "$OUT/eval/$1"
}
train grpo mcq+format
ROWS=("$OUT/eval/start" "$OUT/eval/grpo")
NAMES=("start" "GRPO(mcq+format)")
if [ "${CONTROL:-0}" = "1" ]; then
  train grpo_format_only format
  ROWS+=("$OUT/eval/grpo_format_only")
  NAMES+=("GRPO(format only)")
fi

stage "done"
python evaluate.py --summary "${ROWS[@]}" --names "${NAMES[@]}" | tee "$OUT/table.txt"
python - "$OUT/eval/start/metrics_mcq.json" "$OUT/eval/grpo/metrics_mcq.json" <<'PY' | tee -a "$OUT/table.txt"
import json, sys
def acc(path):
    return 100 * json.load(open(path))["mean"]["acc"]
start, after = acc(sys.argv[1]), acc(sys.argv[2])
print(f"held-out MCQ: start {start:.1f}% -> GRPO {after:.1f}%: {after - start:+.1f} points")
PY
