#!/usr/bin/env bash
# The main job: the whole pipeline on the built-in toy world, on a CPU, in minutes.
#
#   bash runs/toy.sh                 # OUT=out/toy; minutes on 2 CPU cores
#   EXTRA=1 bash runs/toy.sh         # + the exact-match baseline, SpeciaRL and TAPO rows (more minutes)
#
# 0. data      python -m data.prepare toy: 64 classes (shape x colour x pattern), 32 base / 32 novel
# 1. base      the stand-in for Qwen2.5-VL-Instruct: a tiny random Qwen2.5-VL, its vision tower pretrained on
#              attribute labels (runs/toy_base.py), then sft.py on attribute questions and MCQs about all
#              64 classes (it never names a class). Cached: delete OUT/base to rebuild it.
# 2. SFT       sft.py on the 32 base classes (open-ended questions, half in SpeciaRL's open-world wording)
# 3. mine      mine_topk.py: 8 answers per training image -> MCQs of the model's own top-5 confusions
# 4. GRPO      grpo.py with DiVE-k's reward (mcq + format) on those MCQs
# 5. evaluate  evaluate.py after each stage: open-ended base / novel / HM, held-out MCQs (options: the 8
#              classes of two values per attribute), open-world correctness / specificity; one table.
source "$(dirname "$0")/toy_common.sh"
OUT=${OUT:-out/toy}
D=$OUT/data

stage "0. the toy world"
[ -f "$D/classes.json" ] || python -m data.prepare toy --out "$D" --seed 0

build_base "$D" "$OUT"

evaluate() {  # evaluate MODEL FOLDER: open-ended and open-world on base+novel, MCQ on base test images
  python evaluate.py --model "$1" --data "$D/test_base.jsonl" "$D/test_novel.jsonl" --classes "$D/classes.json" \
    --mode open open_world --out "$2" --prompts_per_call 64 --max_new_tokens 32 --device cpu > "$2.log"
  python evaluate.py --model "$1" --data "$D/test_mcq.jsonl" --classes "$D/classes.json" \
    --mode mcq --out "$2" --prompts_per_call 64 --max_new_tokens 32 --device cpu >> "$2.log"
}
mkdir -p "$OUT/eval"
[ -f "$OUT/eval/base/metrics_mcq.json" ] || { stage "evaluate the base model"; evaluate "$OUT/base/final" "$OUT/eval/base"; }

stage "2. SFT on the base classes"
python sft.py --model "$OUT/base/final" --data "$D/sft.jsonl" --out "$OUT/sft" --batch_size 8 \
  --micro_batch_size 8 --lr 5e-4 --max_steps 400 --device cpu
stage "evaluate SFT"
evaluate "$OUT/sft/final" "$OUT/eval/sft"

stage "3. DiVE-k: mine each training image's top-k confusions"
python mine_topk.py --model "$OUT/sft/final" --data "$D/train.jsonl" --classes "$D/classes.json" \
  --out "$OUT/mine/mcq.jsonl" --num_samples 8 --k 5 --temperature 1.0 --top_p 0.95 --max_new_tokens 32 \
  --class_list none --prompts_per_call 16 --device cpu

stage "4. GRPO on the mined MCQs (reward: mcq + format)"
python grpo.py --model "$OUT/sft/final" --data "$OUT/mine/mcq.jsonl" --classes "$D/classes.json" \
  --out "$OUT/grpo" --reward mcq+format --loss grpo --beta 0.04 --num_samples 8 --prompts_per_step 16 \
  --temperature 1.0 --max_new_tokens 32 --lr 1e-4 --max_steps 40 --micro_batch_size 32 --prompts_per_call 16 \
  --device cpu  # a higher lr learns an answer format that breaks the 8-option questions (docs/LOG.md)
stage "evaluate GRPO"
evaluate "$OUT/grpo/final" "$OUT/eval/grpo"

ROWS=("$OUT/eval/base" "$OUT/eval/sft" "$OUT/eval/grpo")
NAMES=("base" "SFT" "SFT+GRPO(DiVE-k)")
if [ "${EXTRA:-0}" = "1" ]; then
  stage "extra: the Visual-RFT-style baseline (exact-match reward on open-ended questions)"
  python grpo.py --model "$OUT/sft/final" --data "$D/train.jsonl" --classes "$D/classes.json" \
    --out "$OUT/grpo_exact" --prompt open --reward exact+format --loss grpo --beta 0.04 --num_samples 8 \
    --prompts_per_step 16 --max_new_tokens 32 --lr 2e-4 --max_steps 40 --micro_batch_size 32 --device cpu
  evaluate "$OUT/grpo_exact/final" "$OUT/eval/grpo_exact"
  stage "extra: SpeciaRL (open-world prompt, best-in-group specificity reward, LoRA)"
  python grpo.py --model "$OUT/sft/final" --data "$D/train.jsonl" --classes "$D/classes.json" \
    --out "$OUT/grpo_speciarl" --prompt open_world --reward speciarl --loss dapo --beta 0.01 --lora_r 16 \
    --lora_alpha 32 --num_samples 8 --prompts_per_step 16 --max_new_tokens 32 --lr 1e-3 --max_steps 40 \
    --micro_batch_size 32 --device cpu
  evaluate "$OUT/grpo_speciarl/final" "$OUT/eval/grpo_speciarl"
  stage "extra: Fine-R1's TAPO (anchor + positive rollouts, look-alike negative)"
  python grpo.py --model "$OUT/sft/final" --data "$D/triplets.jsonl" --classes "$D/classes.json" \
    --out "$OUT/grpo_tapo" --tapo --prompt open --reward exact:0.9+format:0.1 --loss dapo --beta 0 \
    --epsilon_high 0.28 --dynamic_sampling --num_samples 8 --prompts_per_step 16 --max_new_tokens 32 \
    --lr 2e-4 --max_steps 40 --micro_batch_size 32 --device cpu
  evaluate "$OUT/grpo_tapo/final" "$OUT/eval/grpo_tapo"
  ROWS+=("$OUT/eval/grpo_exact" "$OUT/eval/grpo_speciarl" "$OUT/eval/grpo_tapo")
  NAMES+=("SFT+GRPO(exact)" "SFT+SpeciaRL" "SFT+TAPO")
fi

stage "done"
echo "Accuracies in % on the toy world's test images (base: 32 classes seen in SFT/RL, novel: 32 unseen;"
echo "MCQ: held-out questions over the 8 classes of two values per attribute; correct/specific: open-world answers)."
python evaluate.py --summary "${ROWS[@]}" --names "${NAMES[@]}" | tee "$OUT/table.txt"
