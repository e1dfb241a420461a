#!/usr/bin/env bash
# SpeciaRL on CUB (docs/methods.md §2 and §4): open-world answers judged into specificity categories,
# reward = 1 for the rollouts at the best category of their group (best-in-group anchoring).
# Paper: Qwen2.5-VL-7B, LoRA r64 / alpha 32 on all language-model linear layers (vision frozen), lr 3e-5,
# 256 prompts a step in 2 mini-batches of 128, G=10, T=1.0, KL 0.01 (k3), token-mean loss, clip 0.2,
# 15 epochs of 3,000 training images (~175 steps), max response 2048.
# VARIANT=grpo (default) | dr_grpo (no std scaling, no KL) | dapo (no KL, clip 0.2/0.28, overlong shaping
# over the last 512 tokens, dynamic sampling) | gspo (GSPO's settings where SpeciaRL gives none: the sequence
# ratio clipped to [1 - 3e-4, 1 + 4e-4], the mean of the sequences' losses, no KL; LoRA dropout 0, whose noise
# alone moves the first update's sequence ratios past that clip). The taxonomy verifier is offline; pass
# VERIFIER=/path/to/instruct-llm to judge with a local LLM instead (cached in SQLite).
#   CUB=/data/CUB_200_2011 NGPU=8 VARIANT=dapo bash runs/speciarl_cub.sh
source "$(dirname "$0")/common.sh"
CUB=${CUB:-/data/CUB_200_2011}
VARIANT=${VARIANT:-grpo}
OUT=${OUT:-out/speciarl_cub_$VARIANT}
# 15 images of each of the 200 classes = the paper's 3,000 training images
python -m data.prepare cub --root "$CUB" --out data/cub_all --setting fewshot --shots 15 --seed 1

DROPOUT=0.05
case "$VARIANT" in
  grpo)    LOSS="--loss dapo --beta 0.01 --scale_rewards group --epsilon_low 0.2" ;;   # token mean over the step
  dr_grpo) LOSS="--loss dr_grpo --beta 0 --scale_rewards none --epsilon_low 0.2" ;;
  dapo)    LOSS="--loss dapo --beta 0 --epsilon_low 0.2 --epsilon_high 0.28 --overlong_cache 512 --dynamic_sampling" ;;
  gspo)    LOSS="--loss gspo --beta 0 --scale_rewards group --epsilon_low 3e-4 --epsilon_high 4e-4"; DROPOUT=0 ;;
  *)       echo "VARIANT must be grpo, dr_grpo, dapo or gspo" >&2; exit 1 ;;
esac
VERIFY=""
if [ -n "${VERIFIER:-}" ]; then VERIFY="--verifier_model $VERIFIER"; fi
launch grpo.py --model "$MODEL" --data data/cub_all/train.jsonl --classes data/cub_all/classes.json \
  --out "$OUT/grpo" --prompt open_world --reward speciarl $VERIFY $LOSS \
  --lora_r 64 --lora_alpha 32 --lora_dropout $DROPOUT --lr 3e-5 --schedule constant \
  --prompts_per_step 256 --mini_batches 2 --num_samples 10 --temperature 1.0 --max_new_tokens 2048 \
  --epochs 15 --prompts_per_call 16 --micro_batch_size 8 --gradient_checkpointing --dtype bf16 --save_every 25 \
  --max_pixels "$(pixels 256)"  # at most 256 visual tokens an image (the Hub config allows 16k); later stages
                                # inherit it

launch evaluate.py --model "$OUT/grpo/final" --data data/cub_all/test.jsonl --classes data/cub_all/classes.json \
  --mode open_world $VERIFY --max_new_tokens 2048 --dtype bf16 --out "$OUT/eval"
