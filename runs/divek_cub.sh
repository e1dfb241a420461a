#!/usr/bin/env bash
# DiVE-k on CUB, base-to-novel (docs/methods.md §3): mine the model's own top-5 confusions per training
# image, train GRPO on the resulting MCQs with reward = mcq + format, evaluate open-ended and two-step.
# Paper: Qwen2.5-VL-7B, full fine-tuning incl. the vision tower, G=4, T=1.0, lr 1e-6, KL 0.04 (k3),
# per-sequence mean loss, max completion 1024, max_pixels 401,408 (512 visual tokens), ~400 steps of 6 prompts
# (3 GPUs). Images are capped at 512 visual tokens for either family (runs/common.sh: `pixels`).
# 8 GPUs: full fine-tuning sharded with FSDP2, 8 prompts a step (one per GPU), 300 steps (same images seen).
# 1 GPU: the full 7B with AdamW does not fit 80 GB, so LoRA r64 on the language model and the vision tower.
#   CUB=/data/CUB_200_2011 NGPU=8 bash runs/divek_cub.sh
source "$(dirname "$0")/common.sh"
CUB=${CUB:-/data/CUB_200_2011}
OUT=${OUT:-out/divek_cub}
python -m data.prepare cub --root "$CUB" --out data/cub --setting base2novel --shots 16 --seed 1

launch mine_topk.py --model "$MODEL" --data data/cub/train.jsonl --classes data/cub/classes.json \
  --out "$OUT/mine/mcq.jsonl" --num_samples 20 --k 5 --temperature 1.0 --top_p 0.95 --max_new_tokens 1024 \
  --max_pixels "$(pixels 512)" --class_list base --dtype bf16 --prompts_per_call 8

if [ "$NGPU" -gt 1 ]; then
  TRAIN="--fsdp --prompts_per_step $NGPU --max_steps 300"
else
  TRAIN="--lora_r 64 --lora_alpha 128 --lora_dropout 0.05 --prompts_per_step 6 --max_steps 400"
fi
launch grpo.py --model "$MODEL" --data "$OUT/mine/mcq.jsonl" --classes data/cub/classes.json --out "$OUT/grpo" \
  --reward mcq+format --loss grpo --scale_rewards group --beta 0.04 --num_samples 4 --temperature 1.0 \
  --lr 1e-6 --schedule constant --max_new_tokens 1024 --max_pixels "$(pixels 512)" --train_vision \
  --gradient_checkpointing --micro_batch_size 4 --prompts_per_call 8 --dtype bf16 --save_every 50 $TRAIN

launch evaluate.py --model "$OUT/grpo/final" --data data/cub/test_base.jsonl data/cub/test_novel.jsonl \
  --classes data/cub/classes.json --mode open two_step --class_list split --max_new_tokens 1024 \
  --max_pixels "$(pixels 512)" --dtype bf16 --out "$OUT/eval"
