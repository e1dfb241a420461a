"""runs/sampler_gap.py — how far the sampler's log-probs are from the trainer's, for a model, dtype and device.

GRPO samples with engine.sample_completions (KV-cached decode steps) and trains on trainer.sequence_logprobs (one
forward over prompt and completion, each prompt shared by its group): the same weights, other kernels. This
sets the model up as grpo.py does (trained weights in fp32, the rest in --dtype; bf16 autocast on CUDA), samples
G completions per prompt, scores the same tokens as the on-policy update does (train mode, gradients on) and
prints grpo.sampler_gap's figures, the ones grpo.py logs every step: the token mean of |logp_sampler -
logp_train| (and its max), k3 of KL(sampler ‖ train), and the share of tokens whose ratio π_train/π_sampler is
outside [0.8, 1.25]. On a CPU autocast is off, so bf16 compute there needs bf16 weights: --lora_r (the base
stays in bf16). Random weights unless --model: the figures measure the kernels and the dtype, not a trained
model's distribution.

    python runs/sampler_gap.py --dtype fp32                                       # the tiny model, CPU
    python runs/sampler_gap.py --shape 7b --text_layers 2 --vision_depth 2 --dtype bf16 --lora_r 8
    python runs/sampler_gap.py --shape 7b --dtype bf16 --device cuda                # full depth
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trainer  # noqa: E402
from bench import add_model_args, model_and_prompts  # noqa: E402
from common import (add_runtime_args, add_sampling_args, generator_of, resolve_device, resolve_dtype,  # noqa: E402
                    seed_process)
from engine import sample_completions  # noqa: E402
from grpo import sampler_gap  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    add_model_args(ap)
    a("--lora_r", type=int, default=0, help="LoRA rank, as grpo.py's (0: full fine-tuning)")
    add_sampling_args(ap, num_samples=4, prompts_per_call=4, max_new_tokens=32)
    add_runtime_args(ap)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    seed_process(args.seed)
    model, proc, batch = model_and_prompts(args, device, dtype)
    trainer.configure_trainable(model, lora_r=args.lora_r, lora_dropout=0.0)  # dropout would be a gap of its own
    P, G = args.prompts_per_call, args.num_samples
    bf16 = dtype == torch.bfloat16
    with trainer.autocast(device, bf16):  # as grpo.py's rollout and update
        model.eval()
        roll = sample_completions(model, batch, group_size=G, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p,
                                  generator=generator_of("sampler_gap", args.seed, device=device),
                                  **proc.sampling_tokens)
        model.train()
        train = trainer.sequence_logprobs(model, batch, roll.completion_ids, roll.completion_mask,
                                      prompt_rows=[i // G for i in range(P * G)], temperature=args.temperature)
    mask = roll.completion_mask
    gap = sampler_gap(train, roll.logprobs, mask)
    n = gap["gap_tokens"]
    worst = float(((train.detach() - roll.logprobs).abs() * mask).max())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model or args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, "
          f"{str(dtype).removeprefix('torch.')}) on {where}: {P} prompts x {G} samples, {n:.0f} tokens\n"
          f"  |logp_sampler - logp_train|: mean {gap['gap_abs'] / n:.2e}, max {worst:.2e}; "
          f"KL(sampler || train) k3 {gap['gap_kl'] / n:.2e}; ratio outside [0.8, 1.25]: "
          f"{gap['gap_outside'] / n:.2%}")
    return {"abs": gap["gap_abs"] / n, "max": worst, "kl": gap["gap_kl"] / n, "outside": gap["gap_outside"] / n}


if __name__ == "__main__":
    main()
