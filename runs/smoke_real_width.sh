#!/usr/bin/env bash
# The pipeline on Qwen2.5-VL-7B's real shapes, on a CPU: prepare -> sft -> mine -> grpo -> evaluate.
#
#   bash runs/smoke_real_width.sh        # OUT=out/smoke_real_width; minutes on 2 CPU cores, ~8 GB of memory
#
# The tests run a ~1M-parameter model, which hides the bugs that only the real sizes show (a vocabulary
# of 152,064 logits, 28 query / 4 KV heads of 128, mrope_section [16, 24, 24], a 1280-wide vision tower
# with windowed and full-attention blocks, 256 visual tokens from a 448x448 photo, a preprocessor config
# in the Hub's form). This builds a model with exactly those shapes but two layers per tower (random
# weights, bf16, the tiny tokenizer: python tiny.py --shape 7b) and runs every stage for a step or two,
# LoRA on the language model and the vision tower, the KL reference by switching the adapters off.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/smoke_real_width}
SECONDS=0
stage() { echo; echo "=== [$(printf '%3d' $SECONDS)s] $*"; }
RUN="--device cpu --dtype bf16"

stage "a dataset of 448x448 photos: 4 classes, base-to-novel"
python - "$OUT/images" <<'PY'
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
for c, colour in enumerate([(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 200, 40)]):
    os.makedirs(f"{root}/class {c}", exist_ok=True)
    for i in range(6):
        rng = np.random.default_rng(10 * c + i)
        pixels = np.clip(np.array(colour) + rng.normal(0, 30, (448, 448, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(f"{root}/class {c}/{i}.jpg")
PY
python -m data.prepare folder --root "$OUT/images" --name photos --domain bird --out "$OUT/data"
D=$OUT/data

stage "the model: Qwen2.5-VL-7B's widths, two layers per tower"
[ -f "$OUT/model/config.json" ] || python tiny.py --out "$OUT/model" --shape 7b --text_layers 2 --vision_depth 2

stage "sft (LoRA r8, 2 steps); the first stage sets the image size the later ones inherit"
python sft.py --model "$OUT/model" --data "$D/train.jsonl" --out "$OUT/sft" --lora_r 8 --batch_size 2 \
  --micro_batch_size 1 --max_steps 2 --max_new_tokens 16 --max_pixels 200704 $RUN

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
python - "$OUT/grpo/final" <<'PY'
import sys
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration
import vlm
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(sys.argv[1], dtype="bfloat16")
proc = vlm.Processor.from_pretrained(sys.argv[1])
tokens = int(proc.encode([Image.new("RGB", (448, 448))], ["q"]).mm_token_type_ids.sum())
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, vocabulary "
      f"{model.config.text_config.vocab_size}, pixel bounds {proc.pixel_bounds}, 448x448 -> {tokens} visual tokens")
assert proc.pixel_bounds[1] == 200704 and tokens == 256
PY
stage "done"
