#!/usr/bin/env bash
# The pipeline on Qwen2.5-VL-7B's (or Qwen3-VL-8B's) real shapes, on a CPU: prepare -> sft -> mine -> grpo -> evaluate.
#
#   bash runs/smoke_real_width.sh                  # OUT=out/smoke_real_width; minutes on 2 CPU cores, ~8 GB of memory
#   SHAPE=qwen3-8b bash runs/smoke_real_width.sh   # OUT=out/smoke_real_width_qwen3-8b: Qwen3-VL-8B's widths
#
# The tests run a ~1M-parameter model, which hides the bugs that only the real sizes show (a vocabulary
# of 152,064 logits, 28 query / 4 KV heads of 128, mrope_section [16, 24, 24], a 1280-wide vision tower
# with windowed and full-attention blocks, 256 visual tokens from a 448x448 photo, a preprocessor config
# in the Hub's form). This builds a model with exactly those shapes but two layers per tower (random
# weights, bf16, the tiny tokenizer: python tiny.py --shape 7b) and runs every stage for a step or two,
# LoRA on the language model and the vision tower, the KL reference by switching the adapters off.
# SHAPE=qwen3-8b: Qwen3-VL-8B's (vocabulary 151,936, 32 query / 8 KV heads of 128 with q/k norm,
# interleaved mrope_section [24, 20, 20], a 1152-wide vision tower of patch 16 with DeepStack, the same 256
# visual tokens from a 512x512 photo: a token covers 32x32 px instead of 28x28).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SHAPE=${SHAPE:-7b}
OUT=${OUT:-out/smoke_real_width$([ "$SHAPE" = 7b ] || echo "_$SHAPE")}
case "$SHAPE" in qwen3-*) PX=32 ;; *) PX=28 ;; esac  # the side of the pixel square one visual token covers
SIDE=$((16 * PX))                 # photos of 16 x 16 = 256 visual tokens: 448 px (Qwen2.5-VL), 512 px (Qwen3-VL)
MAX_PIXELS=$((256 * PX * PX))     # and at most that many: 200704 / 262144
SECONDS=0
stage() { echo; echo "=== [$(printf '%3d' $SECONDS)s] $*"; }
RUN="--device cpu --dtype bf16"

stage "a dataset of ${SIDE}x${SIDE} photos: 4 classes, base-to-novel"
python - "$OUT/images" "$SIDE" <<'PY'
import os, sys
import numpy as np
from PIL import Image
root, side = sys.argv[1], int(sys.argv[2])
for c, colour in enumerate([(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 200, 40)]):
    os.makedirs(f"{root}/class {c}", exist_ok=True)
    for i in range(6):
        rng = np.random.default_rng(10 * c + i)
        pixels = np.clip(np.array(colour) + rng.normal(0, 30, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(f"{root}/class {c}/{i}.jpg")
PY
python -m data.prepare folder --root "$OUT/images" --name photos --domain bird --out "$OUT/data"
D=$OUT/data

stage "the model: $SHAPE's widths, two layers per tower"
[ -f "$OUT/model/config.json" ] || python tiny.py --out "$OUT/model" --shape "$SHAPE" --text_layers 2 --vision_depth 2

stage "sft (LoRA r8, 2 steps); the first stage sets the image size the later ones inherit"
python sft.py --model "$OUT/model" --data "$D/train.jsonl" --out "$OUT/sft" --lora_r 8 --batch_size 2 \
  --micro_batch_size 1 --max_steps 2 --max_new_tokens 16 --max_pixels "$MAX_PIXELS" $RUN

stage "mine (2 samples an image)"
python mine_topk.py --model "$OUT/sft/final" --data "$D/train.jsonl" --classes "$D/classes.json" \
  --out "$OUT/mine/mcq.jsonl" --num_samples 2 --k 3 --max_new_tokens 8 --prompts_per_call 2 --limit 4 \
  --no_skip_trivial $RUN

stage "grpo (LoRA r8 incl. the vision tower, 1 step of 2 prompts x 2, β 0.04)"
python grpo.py --model "$OUT/sft/final" --data "$OUT/mine/mcq.jsonl" --classes "$D/classes.json" \
  --out "$OUT/grpo" --reward mcq+format --lora_r 8 --train_vision --beta 0.04 --max_steps 1 \
  --prompts_per_step 2 --num_samples 2 --max_new_tokens 8 --micro_batch_size 2 $RUN

stage "evaluate (open, mcq, two-step, open-world)"
python evaluate.py --model "$OUT/grpo/final" --data "$D/test_base.jsonl" "$D/test_novel.jsonl" \
  --classes "$D/classes.json" --mode open two_step open_world --num_samples 2 --max_new_tokens 8 --limit 2 \
  --out "$OUT/eval" $RUN
python evaluate.py --model "$OUT/grpo/final" --data "$OUT/mine/mcq.jsonl" --classes "$D/classes.json" \
  --mode mcq --max_new_tokens 8 --limit 2 --out "$OUT/eval" $RUN
stage "the trained checkpoint: plain transformers loads it; it kept the image size it was trained at"
python - "$OUT/grpo/final" "$SIDE" "$MAX_PIXELS" <<'PY'
import sys
from PIL import Image
from transformers import AutoConfig
import vlm
folder, side, max_pixels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = vlm.model_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype="bfloat16")
proc = vlm.Processor.from_pretrained(folder)
tokens = int(proc.encode([Image.new("RGB", (side, side))], ["q"]).mm_token_type_ids.sum())
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, vocabulary "
      f"{model.config.text_config.vocab_size}, pixel bounds {proc.pixel_bounds}, "
      f"{side}x{side} -> {tokens} visual tokens")
assert proc.pixel_bounds[1] == max_pixels and tokens == 256
PY
stage "done"
