#!/usr/bin/env bash
# The Visual-RFT-style baseline on CUB, base-to-novel: GRPO on open-ended questions that list the base
# classes, reward = exact match (normalised, aliases) + format. Visual-RFT rewards *substring* containment,
# which is hackable (docs/methods.md §2); ours is the exact version, the published metric is reported
# beside it as text inclusion. Settings as DiVE-k's run so the two are comparable.
#   CUB=/data/CUB_200_2011 NGPU=8 bash runs/visualrft_cub.sh
source "$(dirname "$0")/common.sh"
CUB=${CUB:-/data/CUB_200_2011}
OUT=${OUT:-out/visualrft_cub}
python -m data.prepare cub --root "$CUB" --out data/cub --setting base2novel --shots 16 --seed 1

if [ "$NGPU" -gt 1 ]; then
  TRAIN="--fsdp --prompts_per_step $NGPU --max_steps 300"
else
  TRAIN="--lora_r 64 --lora_alpha 128 --lora_dropout 0.05 --prompts_per_step 6 --max_steps 400"
fi
launch grpo.py --model "$MODEL" --data data/cub/train.jsonl --classes data/cub/classes.json --out "$OUT/grpo" \
  --prompt open --class_list base --reward exact+format --loss grpo --beta 0.04 --num_samples 4 --temperature 1.0 \
  --lr 1e-6 --schedule constant --max_new_tokens 1024 --max_pixels "$(pixels 512)" --train_vision \
  --gradient_checkpointing --micro_batch_size 4 --prompts_per_call 8 --dtype bf16 --save_every 50 $TRAIN

launch evaluate.py --model "$OUT/grpo/final" --data data/cub/test_base.jsonl data/cub/test_novel.jsonl \
  --classes data/cub/classes.json --mode open --class_list split --max_new_tokens 1024 --max_pixels "$(pixels 512)" \
  --dtype bf16 --out "$OUT/eval"
