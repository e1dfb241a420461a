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

import trainer
from checkpoint import save_if_due
from common import (JsonlLog, add_image_args, add_report_args, add_runtime_args, all_reduce_sum, cleanup,
                    epoch_permutation, init_distributed, nonnegative_int, positive_int, print0, progress,
                    flag_defaults, renamed, seed_process, shard, warn_large_images)
from data.prompts import question_for
from data.records import ImageError, NameTable, listed_classes, load_classes, load_image, read_records


def make_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="HF id or folder of the starting checkpoint")
    a("--data", nargs="+", required=True, help="training JSONL file(s)")
    a("--val_data", nargs="*", default=[], help="JSONL file(s) for the validation loss")
    a("--classes", default=None, help="classes.json: labels checked against it; needed by --class_list")
    a("--out", required=True, help="output folder: step_*/ checkpoints, final/, log.jsonl")
    a("--prompt", default="auto", choices=["auto", "record", "open", "open_world"],
      help="question asked (data/prompts.py); auto = the record's `question` field if it has one, else open")
    a("--class_list", default="none", choices=["none", "base", "novel", "all"],
      help="class names the open question lists (of the record's dataset)")
    renamed(ap, "--question", "--prompt (and --question open_list is --prompt open --class_list base)")
    a("--target", default="auto", choices=["auto", "record", "answer"],
      help="auto = the record's `target` if present, else `<answer>{label}</answer>`")
    a("--per_class", type=nonnegative_int, default=0,
      help="keep only the first N records of each label (Fine-R1: one example per seen class)")
    a("--batch_size", type=positive_int, default=16, help="examples per optimizer step over all ranks")
    a("--micro_batch_size", type=positive_int, default=4, help="examples per forward on one rank")
    a("--max_new_tokens", type=positive_int, default=4096,
      help="longest target trained on, in tokens; longer targets are cut")
    trainer.add_training_args(ap, lr=1e-5, schedule="cosine", warmup_ratio=0.03)
    a("--val_every", type=nonnegative_int, default=0, help="validation loss every N steps (0: at the end)")
    a("--skip_bad", action="store_true", help="drop bad records (and say how many) instead of stopping")
    a("--no_check_images", action="store_true", help="do not open every image before training")
    add_image_args(ap)
    add_runtime_args(ap)
    add_report_args(ap)
    return ap


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def make_example(record, args, table):
    """(image path, question, target) of a record, as --prompt, --class_list and --target say."""
    mode = args.prompt
    if mode == "auto":
        mode = "record" if "question" in record else "open"
    target = args.target
    if target == "auto":
        target = "record" if "target" in record else "answer"
    text = record["target"] if target == "record" else f"<answer>{record['label']}</answer>"
    listed = listed_classes(table, record.get("dataset"), args.class_list) if table else []
    names = [c["name"] for c in listed]
    return record["image"], question_for(record, mode, names), text


def encode_examples(examples, processor, device, max_new_tokens):
    """PromptBatch + right-padded target ids/mask; examples whose image fails are dropped (and counted)."""
    images, questions, targets, bad = [], [], [], 0
    for path, question, target in examples:
        try:
            images.append(load_image(path, processor.pixel_bounds[1]))
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
    return batch, ids[:, :max_new_tokens], mask[:, :max_new_tokens], bad


def global_batch(step, n, batch_size, seed):
    """The item indices of optimizer step `step` (epochs are seeded permutations; a last partial batch is
    dropped)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_permutation(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


@torch.no_grad()
def validation_loss(trainable, examples, processor, d, args, bf16):
    nll, tokens = 0.0, 0.0
    mine = shard(examples, d)
    for s in range(0, len(mine), args.micro_batch_size):
        batch, ids, mask, _ = encode_examples(mine[s:s + args.micro_batch_size], processor, d.device,
                                              args.max_new_tokens)
        if batch is None:
            continue
        with trainer.autocast(d.device, bf16):
            logp = trainable(batch, ids, mask)
        nll, tokens = nll - float(logp.sum()), tokens + float(mask.sum())
    nll, tokens = all_reduce_sum([nll, tokens], d.device)
    return nll / max(tokens, 1.0)


def first_per_class(records, n):
    """The first n records of each label, in file order."""
    kept, seen = [], Counter()
    for r in records:
        seen[r["label"]] += 1
        if seen[r["label"]] <= n:
            kept.append(r)
    return kept


def main(argv=None):
    args = parse_args(argv)
    d = init_distributed(args.device)
    seed_process(args.seed, d.rank)  # dropout differs per rank; the data order does not
    os.makedirs(args.out, exist_ok=True)

    # data: every record validated before the run starts (file:line on error, or dropped with --skip_bad)
    table = load_classes(args.classes) if args.classes else None  # labels and aliases are checked against it
    if args.class_list != "none" and table is None:
        raise SystemExit(f"--class_list {args.class_list} needs --classes")
    names = NameTable()  # one table of names and aliases for --data and --val_data together
    read = lambda paths: [r for p in paths for r in read_records(p, check_images=not args.no_check_images,
                                                                 skip_bad=args.skip_bad, classes=table,
                                                                 names=names)]
    records = read(args.data)
    if args.per_class:
        records = first_per_class(records, args.per_class)
    train = [make_example(r, args, table) for r in records]
    val = [make_example(r, args, table) for r in read(args.val_data)]
    if args.batch_size % d.world_size:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the {d.world_size} ranks")
    if len(train) < args.batch_size:
        raise SystemExit(f"{len(train)} training examples < --batch_size {args.batch_size}")
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * (len(train) // args.batch_size)))

    training = trainer.setup_training(args, d, total_steps, defaults=flag_defaults(make_parser()))
    warn_large_images(records, training.processor)
    skipped_steps = training.resumed.get("skipped_steps", 0)
    print0(f"{len(train)} examples, {total_steps} steps of {args.batch_size}, "
           f"{sum(p.numel() for p in training.params) / 1e6:.2f}M trainable parameters on "
           f"{d.world_size} rank(s)")

    log = JsonlLog(os.path.join(args.out, "log.jsonl"), d, training.start_step, report_to=args.report_to,
                   config=vars(args))
    per_rank = args.batch_size // d.world_size
    bar = progress(training.start_step, total_steps, d, "sft")
    training.policy.train()
    for step in bar:
        t0 = time.time()
        step_items = global_batch(step, len(train), args.batch_size, args.seed)
        mine = step_items[d.rank * per_rank:(d.rank + 1) * per_rank]
        mbs = args.micro_batch_size
        micro = [encode_examples([train[i] for i in mine[s:s + mbs]], training.processor, d.device,
                                 args.max_new_tokens) for s in range(0, len(mine), mbs)]
        micro = [m for m in micro if m[0] is not None]
        if not micro and d.world_size > 1:
            raise RuntimeError("a rank had no loadable example in its share of the batch")
        # the token mean over the global batch: every rank divides by the same count; DDP/FSDP average the
        # gradients over ranks, so multiply by world_size to get the plain sum / N_tok
        n_tokens, n_bad = all_reduce_sum([sum(float(m[2].sum()) for m in micro), sum(m[3] for m in micro)],
                                         d.device)
        loss_sum = 0.0
        for i, (batch, ids, mask, _) in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(training.trainable, "no_sync")
            with (contextlib.nullcontext() if sync else training.trainable.no_sync()), \
                    trainer.autocast(d.device, training.bf16):
                logp = training.trainable(batch, ids, mask)
                loss = -logp.sum() / n_tokens * d.world_size
            loss.backward()
            loss_sum += float(loss.detach()) / d.world_size
        grad_norm = training.optimizer_step()
        skipped_steps += not math.isfinite(grad_norm)
        loss_sum = all_reduce_sum([loss_sum], d.device)[0]
        row = {"step": step + 1, "loss": loss_sum, "lr": training.scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "tokens": n_tokens, "tokens_per_s": n_tokens / (time.time() - t0),
               "bad_images": n_bad, "skipped_steps": skipped_steps}
        if val and ((args.val_every and (step + 1) % args.val_every == 0) or step + 1 == total_steps):
            row["val_loss"] = validation_loss(training.trainable, val, training.processor, d, args,
                                              training.bf16)
        log.write(row)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        save_if_due(training, args, d, step + 1, total_steps, {"skipped_steps": skipped_steps})
    log.close()
    print0(f"done: {args.out}/final" + (f" ({skipped_steps} steps skipped)" if skipped_steps else ""))
    cleanup()


if __name__ == "__main__":
    main()
