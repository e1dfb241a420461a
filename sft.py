"""sft.py — supervised fine-tuning of Qwen2.5-VL on (image, question, target) records.

Fine-R1's stage 1 trains on chain-of-thought targets (`<think>` features → candidates → comparison →
prediction `</think><answer>name</answer>`); SpeciaRL's SFT baseline trains on the bare answer. Both are
this script: the target is the record's `target` field, or `<answer>{label}</answer>` with --target answer.

- The prompt is built by vlm.Processor exactly as the sampler builds it, so the model learns the format
  it is later asked in. The loss is the token mean of -log p over the assistant tokens only (target +
  <|im_end|>), over the whole global batch: every rank divides by the same global token count.
- AdamW, warmup then cosine or constant, weight decay on matrices, gradient clipping, gradient
  accumulation (--micro_batch_size), LoRA or full fine-tuning, vision tower frozen unless --train_vision.
- Data order is a seeded permutation per epoch shared by all ranks; a step takes the next `batch_size`
  items and rank r trains on its slice, so 1 and N processes see the same global batch.
- Checkpoints (HF layout, atomic) every --save_every steps and at the end; --resume continues exactly
  (weights, optimizer, schedule, RNG, data position).

    python sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data data/cub/sft_cot.jsonl --out out/sft \\
        --dtype bf16 --lr 5e-6 --epochs 10 --batch_size 64 --micro_batch_size 4 --gradient_checkpointing
    torchrun --standalone --nproc_per_node=8 sft.py ... --fsdp   # full fine-tuning of 7B, sharded
    python sft.py --model out/tiny --data data/toy/sft.jsonl --out out/toy/sft    # CPU, tiny model
"""

import argparse
import contextlib
import math
import os
import time
from collections import Counter

import torch

import vlm
from data.prompts import question_for
from data.records import ImageError, load_classes, class_names, read_records


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF id or folder of the starting checkpoint")
    ap.add_argument("--data", nargs="+", required=True, help="training JSONL file(s)")
    ap.add_argument("--val_data", nargs="*", default=[], help="JSONL file(s) for the validation loss")
    ap.add_argument("--classes", default=None, help="classes.json (needed by --question open_list)")
    ap.add_argument("--out", required=True, help="output folder: step_*/ checkpoints, final/, log.jsonl")
    ap.add_argument("--question", default="auto", choices=["auto", "record", "open", "open_list", "open_world"],
                    help="auto = the record's `question` field if it has one, else the open-ended question")
    ap.add_argument("--target", default="auto", choices=["auto", "record", "answer"],
                    help="auto = the record's `target` if present, else `<answer>{label}</answer>`")
    ap.add_argument("--per_class", type=int, default=0,
                    help="keep only the first N records of each label (Fine-R1: one example per seen class)")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the data (ignored with --max_steps)")
    ap.add_argument("--max_steps", type=int, default=0, help="optimizer steps (0: from --epochs)")
    ap.add_argument("--batch_size", type=int, default=16, help="global examples per optimizer step")
    ap.add_argument("--micro_batch_size", type=int, default=4, help="examples per forward on one rank")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    ap.add_argument("--warmup_ratio", type=float, default=0.03, help="share of steps with linear warmup")
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    ap.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--lora_alpha", type=float, default=32)
    ap.add_argument("--lora_dropout", type=float, default=0.05)
    ap.add_argument("--train_vision", action="store_true", help="also train the vision tower and merger")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--max_target_tokens", type=int, default=4096, help="longer targets are cut (and counted)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: bf16 weights/compute, fp32 master weights")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (torchrun) instead of DDP")
    ap.add_argument("--min_pixels", type=int, default=None)
    ap.add_argument("--max_pixels", type=int, default=vlm.DEFAULT_MAX_PIXELS)
    ap.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--keep", type=int, default=2, help="step checkpoints kept on disk")
    ap.add_argument("--val_every", type=int, default=0, help="validation loss every N steps (0: at the end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from the newest step_* in --out")
    ap.add_argument("--skip_bad", action="store_true", help="drop bad records (and say how many) instead of stopping")
    ap.add_argument("--no_check_images", action="store_true", help="do not open every image before training")
    return ap.parse_args(argv)


def make_example(record, args, names):
    """(image path, question, target) of a record, as --question / --target say."""
    mode = args.question
    if mode == "auto":
        mode = "record" if "question" in record else "open"
    target = args.target
    if target == "auto":
        target = "record" if "target" in record else "answer"
    text = record["target"] if target == "record" else f"<answer>{record['label']}</answer>"
    return record["image"], question_for(record, mode, names), text


def encode_examples(examples, processor, device, max_target_tokens):
    """PromptBatch + right-padded target ids/mask; examples whose image fails are dropped (and counted)."""
    images, questions, targets, bad = [], [], [], 0
    for path, question, target in examples:
        try:
            images.append(vlm.load_image(path))
        except ImageError as e:
            print(f"warning: skipped {e}", flush=True)
            bad += 1
            continue
        questions.append(question)
        targets.append(target)
    if not images:
        return None, None, None, bad
    batch = processor.encode(images, questions).to(device)
    ids, mask = processor.encode_completions(targets, device)
    return batch, ids[:, :max_target_tokens], mask[:, :max_target_tokens], bad


def epoch_order(n, epoch, seed):
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(step, n, batch_size, seed):
    """The item indices of optimizer step `step` (epochs are seeded permutations, the last partial batch dropped)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_order(n, epoch, seed)[i * batch_size:(i + 1) * batch_size]


@torch.no_grad()
def validation_loss(policy, examples, processor, d, args, bf16):
    nll, tokens = 0.0, 0.0
    mine = vlm.shard(examples, d)
    for s in range(0, len(mine), args.micro_batch_size):
        batch, ids, mask, _ = encode_examples(mine[s:s + args.micro_batch_size], processor, d.device,
                                              args.max_target_tokens)
        if batch is None:
            continue
        with vlm.autocast(d.device, bf16):
            logp = policy(batch, ids, mask)
        nll, tokens = nll - float(logp.sum()), tokens + float(mask.sum())
    nll, tokens = vlm.all_reduce_sum([nll, tokens], d.device)
    return nll / max(tokens, 1.0)


def main(argv=None):
    args = get_args(argv)
    d = vlm.init_distributed(args.device)
    bf16 = args.dtype == "bf16"
    torch.manual_seed(args.seed + d.rank)  # LoRA dropout differs per rank; data order does not
    os.makedirs(args.out, exist_ok=True)

    # data: every record validated before the run starts (file:line on error, or dropped with --skip_bad)
    names = class_names(load_classes(args.classes), "base") if args.classes else None
    read = lambda paths: [r for p in paths for r in read_records(p, check_images=not args.no_check_images,
                                                                 skip_bad=args.skip_bad)]
    records = read(args.data)
    if args.per_class:  # the first N records of each label, in file order
        kept, seen = [], Counter()
        for r in records:
            seen[r["label"]] += 1
            if seen[r["label"]] <= args.per_class:
                kept.append(r)
        records = kept
    train = [make_example(r, args, names) for r in records]
    val = [make_example(r, args, names) for r in read(args.val_data)]
    if args.batch_size % d.world_size:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the {d.world_size} ranks")
    if len(train) < args.batch_size:
        raise SystemExit(f"{len(train)} training examples < --batch_size {args.batch_size}")
    steps_per_epoch = len(train) // args.batch_size
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))

    # model: resume takes the weights from the checkpoint (full fine-tuning) or its adapter (LoRA)
    resume_from = vlm.latest_checkpoint(args.out) if args.resume else None
    full_ft_resume = resume_from and args.lora_r == 0
    model = vlm.load_model(resume_from if full_ft_resume else args.model, "cpu" if args.fsdp else d.device,
                           "fp32" if args.fsdp else args.dtype)
    processor = vlm.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    params = vlm.configure_trainable(model, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                     lora_dropout=args.lora_dropout, train_vision=args.train_vision,
                                     gradient_checkpointing=args.gradient_checkpointing)
    if resume_from and args.lora_r:
        vlm.load_lora_weights(model, resume_from)
    trainable, policy = vlm.wrap_policy(model.to(d.device), d, fsdp=args.fsdp, bf16=bf16)
    params = [p for p in policy.parameters() if p.requires_grad]  # (FSDP2 replaced them by shards)
    optimizer = vlm.make_optimizer(params, args.lr, args.weight_decay)
    scheduler = vlm.lr_schedule(optimizer, args.schedule, int(args.warmup_ratio * total_steps), total_steps)
    start, skipped_steps = 0, 0
    if resume_from:
        start, extra = vlm.load_training_state(resume_from, policy, optimizer, scheduler, fsdp=args.fsdp)
        skipped_steps = extra.get("skipped_steps", 0)
        vlm.print0(f"resumed from {resume_from} at step {start}")
    vlm.print0(f"{len(train)} examples, {total_steps} steps of {args.batch_size}, "
               f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters on {d.world_size} rank(s)")

    log = vlm.JsonlLog(os.path.join(args.out, "log.jsonl"), d)
    per_rank = args.batch_size // d.world_size
    bar = vlm.progress(start, total_steps, d, "sft")
    policy.train()
    for step in bar:
        t0 = time.time()
        mine = global_batch(step, len(train), args.batch_size, args.seed)[d.rank * per_rank:(d.rank + 1) * per_rank]
        micro = [encode_examples([train[i] for i in mine[s:s + args.micro_batch_size]], processor, d.device,
                                 args.max_target_tokens) for s in range(0, len(mine), args.micro_batch_size)]
        micro = [m for m in micro if m[0] is not None]
        # token mean over the global batch: every rank divides by the same count; DDP/FSDP average the
        # gradients over ranks, so multiply by world_size to get the plain sum / N_tok
        n_tokens, n_bad = vlm.all_reduce_sum([sum(float(m[2].sum()) for m in micro), sum(m[3] for m in micro)], d.device)
        loss_sum = 0.0
        for i, (batch, ids, mask, _) in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(trainable, "no_sync")
            with (contextlib.nullcontext() if sync else trainable.no_sync()), vlm.autocast(d.device, bf16):
                logp = trainable(batch, ids, mask)
                loss = -logp.sum() / n_tokens * d.world_size
            loss.backward()
            loss_sum += float(loss.detach()) / d.world_size
        if not micro and hasattr(trainable, "no_sync"):
            raise RuntimeError("a rank had no loadable example in its share of the batch")
        grad_norm = vlm.clip_gradients(trainable, params, args.grad_clip)
        if math.isfinite(grad_norm):
            optimizer.step()
        else:  # never let a NaN/inf into the weights
            skipped_steps += 1
            print(f"warning: step {step}: non-finite gradient norm, update skipped", flush=True)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_sum = vlm.all_reduce_sum([loss_sum], d.device)[0]
        row = {"step": step + 1, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens": n_tokens, "tokens_per_s": n_tokens / (time.time() - t0), "bad_images": n_bad,
               "skipped_steps": skipped_steps}
        if val and ((args.val_every and (step + 1) % args.val_every == 0) or step + 1 == total_steps):
            row["val_loss"] = validation_loss(trainable, val, processor, d, args, bf16)
        log.write(row)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        last = step + 1 == total_steps
        if (args.save_every and (step + 1) % args.save_every == 0) or last:
            # the last step goes to final/ (loadable with from_pretrained, and resumable like the others)
            name = "final" if last else f"step_{step + 1:06d}"
            vlm.save_training_checkpoint(os.path.join(args.out, name), policy, processor, d, step=step + 1,
                                         optimizer=optimizer, scheduler=scheduler,
                                         extra={"skipped_steps": skipped_steps, "args": vars(args)}, fsdp=args.fsdp)
            if d.is_main:
                vlm.prune_checkpoints(args.out, args.keep)
    vlm.print0(f"done: {args.out}/final" + (f" ({skipped_steps} steps skipped)" if skipped_steps else ""))
    if vlm.dist.is_initialized():
        vlm.dist.destroy_process_group()


if __name__ == "__main__":
    main()
