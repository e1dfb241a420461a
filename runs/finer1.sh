#!/usr/bin/env bash
# Fine-R1 (docs/methods.md §5): chain-of-thought SFT, then TAPO. 4-shot setting.
# Stage 1 needs the CoT file (JSONL of image, question, target) written by a teacher VLM given the true
# label: COT=/path/to/cot.jsonl. Settings: full fine-tuning of the language model (vision and projector
# frozen), lr 5e-6 cosine with warmup, weight decay 0.1, 10 epochs, effective batch 64, bf16.
# Stage 2, TAPO on DAPO: triplets (anchor, positive of the same class, negative of the most-confused
# class from mine_topk.py), G=10 (5 anchor + 5 positive), reward 0.9 exact + 0.1 format, lr 1e-6
# constant, weight decay 0.01, clip 0.2/0.28, no reference KL, T=1.0, top-p 0.99, max response 2048,
# vision tower trainable, inter-class KL gamma 0.01, entropy eta 0.03, dynamic sampling.
# 8 GPUs: full fine-tuning with FSDP2. 1 GPU: LoRA (the full 7B with AdamW does not fit 80 GB).
#   CUB=/data/CUB_200_2011 COT=data/cub/cot.jsonl NGPU=8 bash runs/finer1.sh
source "$(dirname "$0")/common.sh"
CUB=${CUB:-/data/CUB_200_2011}
COT=${COT:?set COT to the chain-of-thought SFT file (JSONL: image, question, target)}
OUT=${OUT:-out/finer1_cub}
python -m data.prepare cub --root "$CUB" --out data/cub_4shot --setting fewshot --shots 4 --seed 1

if [ "$NGPU" -gt 1 ]; then
  SFT="--fsdp --micro_batch_size 2"; RL="--fsdp"
else
  SFT="--lora_r 64 --lora_alpha 128 --micro_batch_size 4"; RL="--lora_r 64 --lora_alpha 128"
fi
launch sft.py --model "$MODEL" --data "$COT" --out "$OUT/sft" --lr 5e-6 --schedule cosine --warmup_ratio 0.03 \
  --weight_decay 0.1 --epochs 10 --batch_size 64 --max_new_tokens 4096 --dtype bf16 \
  --gradient_checkpointing --save_every 100 --max_pixels "$(pixels 256)" $SFT  # <= 256 visual tokens; later stages
                                                                                 # inherit it

# negatives: the class each class is most confused with, from the SFT model's own answers
launch mine_topk.py --model "$OUT/sft/final" --data data/cub_4shot/train.jsonl \
  --classes data/cub_4shot/classes.json --out "$OUT/mine/mcq.jsonl" --num_samples 20 --k 5 \
  --temperature 1.0 --top_p 0.95 --max_new_tokens 2048 --dtype bf16

launch grpo.py --model "$OUT/sft/final" --data data/cub_4shot/train.jsonl --classes data/cub_4shot/classes.json \
  --confusions "$OUT/mine/confusions.json" --out "$OUT/tapo" --tapo --prompt open \
  --reward exact:0.9+format:0.1 --loss dapo --beta 0 --epsilon_low 0.2 --epsilon_high 0.28 \
  --dynamic_sampling --num_samples 10 --temperature 1.0 --top_p 0.99 --max_new_tokens 2048 \
  --lr 1e-6 --schedule constant --weight_decay 0.01 --gamma 0.01 --eta 0.03 --train_vision \
  --prompts_per_step 16 --epochs 10 --prompts_per_call 8 --micro_batch_size 4 --gradient_checkpointing \
  --dtype bf16 --save_every 50 $RL

launch evaluate.py --model "$OUT/tapo/final" --data data/cub_4shot/test.jsonl --classes data/cub_4shot/classes.json \
  --mode open --max_new_tokens 2048 --dtype bf16 --out "$OUT/eval"
