#!/usr/bin/env bash
# The GPU half of bench.py and of the sampler's checks, in one call (an estimated 10 minutes on an
# H100/H200, before step 5: its three compiles of the 28-layer step add minutes).
# Not yet run on a GPU. Everything lands in OUT.
#
#   bash runs/gpu_checks.sh            # OUT=out/gpu
#
# 1. the fast decode step's logits against the model's own forward, fp32 and bf16, on CUDA
# 2. bench.py at GRPO shapes, 3B and 7B (random weights, bf16, 32 prompts x 8 x 256 tokens, 448 px):
#    sampler vs model.generate, decode vs the memory bandwidth, update MFU, projected recipe hours
# 3. does GRPO with LoRA on the 7B shape (G 8, 1024 new tokens, gradient checkpointing) fit? its peak
# 4. the sampler/trainer gap grpo.py logs (runs/sampler_gap.py), 7B at full depth in bf16 under autocast as
#    training runs it: LoRA r64 (bf16 base) and full fine-tuning (fp32 master weights)
# 5. the decode step (engine.py, --decode): 7B widths at full depth, random bf16 weights, 64 rows (8 prompts
#    x 8), 448 px, 256 new tokens, EOS off; eager buffer step / eager static / compiled / compiled + CUDA
#    graphs: ms per step, tok/s, % of spec and of measured copy bandwidth, compile seconds, host syncs,
#    and greedy agreement of the compiled step with the eager one in bf16 (report only)
#
#   DRY_RUN=1 bash runs/gpu_checks.sh  # step 5's python at a tiny size on a CPU: does it run? (no GPU parts)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
decode_check() {  # step 5 (run first, the newest code); $1 names its output, the rest is its shape
  local name=$1
  shift
  python bench.py --dtype bf16 --prompts_per_call 8 --num_samples 8 --rollout_only --skip_generate \
    --agreement --repeats 1 "$@" 2>&1 | tee "$OUT/decode_$name.txt"
}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  decode_check tiny_cpu --shape tiny --max_new_tokens 20 --device cpu --threads 1
  exit
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
decode_check 7b --shape 7b --max_pixels 200704 --max_new_tokens 256
python -m pytest -q tests/test_engine.py -k "logits_equal or greedy_equals_generate" -rs | tee "$OUT/tests.txt"
for shape in 3b 7b; do
  python bench.py --shape $shape --dtype bf16 --prompts_per_call 32 --num_samples 8 --max_new_tokens 256 --max_pixels 200704 \
    --micro_batch_size 16 --repeats 1 | tee "$OUT/bench_$shape.txt"
done
python bench.py --shape 7b --dtype bf16 --prompts_per_call 1 --num_samples 8 --max_new_tokens 1024 --max_pixels 200704 \
  --lora_r 64 --gradient_checkpointing --micro_batch_size 8 --repeats 1 --skip_generate | tee "$OUT/bench_7b_lora.txt"
for lora in 64 0; do
  python runs/sampler_gap.py --shape 7b --dtype bf16 --lora_r $lora \
    --prompts_per_call 2 --num_samples 8 --max_new_tokens 256 --max_pixels 200704 | tee "$OUT/sampler_gap_7b_lora$lora.txt"
done
