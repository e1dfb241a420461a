"""grpo.py — the GRPO family by hand: DiVE-k, SpeciaRL, Fine-R1's TAPO and the Visual-RFT baseline.

One step (formulas: methods.md section 4):
  1. rollout   G completions per prompt with the shared sampler (each prompt prefilled once);
  2. rewards   reward.py, chosen by --reward (mcq+format, exact, speciarl, exact:0.9+format:0.1, ...);
               DAPO: overlong shaping, and dynamic sampling drops groups whose rewards are all equal;
  3. advantage A_i = (R_i - mean_g R) / (std_g R + 1e-4), unbiased std (--scale_rewards group|batch|none);
  4. update    ℓ_t = -min(r_t A, clip(r_t, 1-ε_low, 1+ε_high) A) + β k3_t, aggregated per --loss
               (grpo | bnpo | dr_grpo | dapo), over micro-batches, --num_iterations times per rollout.
TAPO (--tapo): half of each group samples on the anchor image, half on a positive of the same class;
one advantage group; each rollout scored under its own image (or the anchor's: --tapo_anchor_only);
plus -γ·KL(π(·|x*) ‖ π(·|x_neg)) against a look-alike negative image and η·mean(-log p).
The KL reference is the starting policy: the same weights with LoRA off, or a frozen copy (full FT).

    python grpo.py --model out/sft/final --data out/mine/mcq.jsonl --out out/grpo --reward mcq+format
    torchrun --standalone --nproc_per_node=8 grpo.py ... --dtype bf16 [--fsdp]
Recipes with the papers' settings: runs/*.sh.
"""

import argparse
import contextlib
import json
import math
import os
import random
import time
from collections import defaultdict

import torch

import reward as rewards_lib
import vlm
from data.prompts import question_for
from data.records import ImageError, class_names, load_classes, read_records


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="HF id or folder of the starting policy")
    a("--data", nargs="+", required=True, help="JSONL: open-ended records, MCQ records (mine_topk.py) or triplets")
    a("--classes", default=None, help="classes.json: class list for prompts, verifier, TAPO negatives")
    a("--out", required=True, help="output folder: step_*/, final/, log.jsonl")
    a("--prompt", default="auto", choices=["auto", "open", "open_list", "mcq", "open_world", "record"],
      help="question asked (data/prompts.py); auto = mcq for records with options, else open")
    a("--reward", default="mcq+format", help=rewards_lib.REWARD_HELP)
    a("--verifier_model", default=None, help="LLM verifier for specificity rewards (default: taxonomy verifier)")
    a("--verifier_cache", default=None, help="SQLite cache of LLM verdicts (default OUT/verifier_cache.sqlite)")
    # the GRPO family
    a("--loss", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"], help="aggregation (methods.md §4)")
    a("--scale_rewards", default="group", choices=["group", "batch", "none"], help="advantage normalisation")
    a("--beta", type=float, default=0.04, help="KL coefficient (k3 estimator against the starting policy)")
    a("--epsilon_low", type=float, default=0.2)
    a("--epsilon_high", type=float, default=0.2, help="0.28 for DAPO's clip-higher")
    a("--num_iterations", type=int, default=1, help="updates per rollout (old log-probs stored when > 1)")
    a("--mini_batches", type=int, default=1, help="optimizer steps per iteration, each on a slice of the groups")
    a("--dynamic_sampling", action="store_true", help="DAPO: drop groups whose rewards are all equal, resample")
    a("--max_resample", type=int, default=4, help="extra draws per step for dynamic sampling before giving up")
    a("--overlong_cache", type=int, default=0, help="DAPO overlong shaping over the last N tokens (0: off)")
    # TAPO
    a("--tapo", action="store_true", help="Fine-R1's triplet-augmented policy optimisation")
    a("--tapo_anchor_only", action="store_true", help="score positive-image rollouts under the anchor image")
    a("--confusions", default=None, help="confusions.json from mine_topk.py (TAPO negatives)")
    a("--gamma", type=float, default=0.01, help="TAPO inter-class KL weight")
    a("--eta", type=float, default=0.03, help="TAPO entropy regulariser weight on mean(-log p)")
    # sampling
    a("--group_size", type=int, default=4, help="G completions per prompt")
    a("--prompts_per_step", type=int, default=8, help="global prompts per step (divisible by the ranks)")
    a("--rollout_prompts", type=int, default=8, help="prompts per sampler call on one rank")
    a("--micro_batch_size", type=int, default=8, help="completions per training forward on one rank")
    a("--temperature", type=float, default=1.0)
    a("--top_p", type=float, default=1.0)
    a("--top_k", type=int, default=0)
    a("--max_new_tokens", type=int, default=256, help="max completion length L_max")
    # optimisation
    a("--max_steps", type=int, default=0, help="rollout steps (0: from --epochs)")
    a("--epochs", type=float, default=1.0)
    a("--lr", type=float, default=1e-6)
    a("--schedule", default="constant", choices=["constant", "cosine"])
    a("--warmup_ratio", type=float, default=0.0)
    a("--weight_decay", type=float, default=0.0)
    a("--grad_clip", type=float, default=1.0)
    a("--lora_r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    a("--lora_alpha", type=float, default=32)
    a("--lora_dropout", type=float, default=0.05)
    a("--train_vision", action="store_true")
    a("--gradient_checkpointing", action="store_true")
    a("--dtype", default="fp32", choices=["fp32", "bf16"])
    a("--device", default="auto")
    a("--fsdp", action="store_true", help="shard with FSDP2 (full fine-tuning of 7B)")
    a("--min_pixels", type=int, default=None)
    a("--max_pixels", type=int, default=vlm.DEFAULT_MAX_PIXELS)
    a("--save_every", type=int, default=0)
    a("--keep", type=int, default=2)
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--skip_bad", action="store_true", help="drop bad records before the run instead of stopping")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# the formulas (tested against per-token loops in tests/test_grpo.py)

def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (R_i - mean_g R) / (std + eps), std unbiased (ddof 1) over the group ('group') or over the
    whole global batch ('batch'); 'none' gives R_i - mean_g R. Groups are consecutive rows."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale == "none":
        return centred.view(-1)
    if scale == "group":
        std = r.std(1, keepdim=True)
    else:  # batch: sum, sum of squares and count over every rank
        s, sq, n = vlm.all_reduce_sum([float(r.sum()), float((r ** 2).sum()), float(r.numel())])
        std = torch.tensor(math.sqrt(max(sq - s * s / n, 0.0) / max(n - 1, 1)))
    return (centred / (std + eps)).view(-1)


def overlong_penalty(lengths, max_len, cache):
    """DAPO's soft length penalty: 0 up to max_len - cache, then linear down to -1 at max_len."""
    if cache <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    return ((max_len - cache - lengths.float()) / cache).clamp(-1.0, 0.0)


def k3(ref_logp, logp):
    """Unbiased, positive KL estimator per token: exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def per_token_loss(logp, old_logp, adv, eps_low, eps_high, beta=0.0, ref_logp=None):
    """ℓ_t = -min(r A, clip(r, 1-ε_low, 1+ε_high) A) + β k3, r = exp(logp - old_logp). Also the clip masks."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * a, clipped * a)
    if beta:
        loss = loss + beta * k3(ref_logp, logp)
    low = (ratio < 1 - eps_low) & (a < 0)    # the clip is active on these tokens
    high = (ratio > 1 + eps_high) & (a > 0)
    return loss, low, high


def tapo_terms(logp, neg_logp, gamma, eta, delta_clamp=20.0, kl_clamp=10.0):
    """Fine-R1's extra per-token terms: -γ·KL(π(·|x*) ‖ π(·|x_neg)) in k3 form on δ = logp_neg - logp
    (δ clamped to ±20, the KL to ±10; logp_neg without gradient) and η·(-logp)."""
    delta = (neg_logp.detach() - logp).clamp(-delta_clamp, delta_clamp)
    kl = (torch.exp(delta) - delta - 1).clamp(-kl_clamp, kl_clamp)
    return -gamma * kl + eta * (-logp), kl


def aggregate(token_loss, mask, loss_type, *, ga, l_max, n_tokens, world):
    """methods.md §4. ga: micro-batches per optimizer step on this rank; n_tokens: completion tokens of
    the whole optimizer step over all ranks (dapo); gradients are then averaged over `world` ranks."""
    total = (token_loss * mask).sum()
    if loss_type == "grpo":
        return ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean() / ga
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1) / ga
    if loss_type == "dr_grpo":
        return total / (mask.shape[0] * l_max) / ga
    if loss_type == "dapo":
        return total / (n_tokens / world)
    raise ValueError(loss_type)


# ----------------------------------------------------------------------------------------------------
# data

class Items:
    """The training items as one endless stream: epoch e is a seeded permutation of the records."""

    def __init__(self, records, seed):
        self.records, self.seed, self.epoch, self.order = records, seed, None, None
        self.by_class = defaultdict(list)
        for r in records:
            self.by_class[r["label"]].append(r)

    def __getitem__(self, i):
        epoch, j = divmod(i, len(self.records))
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self.epoch, self.order = epoch, torch.randperm(len(self.records), generator=g).tolist()
        return self.records[self.order[j]]


def seed_of(*parts):
    """A 63-bit seed from any values, the same in every process (unlike hash() of strings)."""
    return random.Random("-".join(map(str, parts))).getrandbits(63)


def tapo_images(record, items, confusions, rng):
    """(positive, negative) image paths: the record's own fields (triplets.jsonl), else another image of the
    class and an image of its most-confused class (mine_topk's table), else of a random other class."""
    positive = record.get("positive") or rng.choice(items.by_class[record["label"]])["image"]
    negative = record.get("negative")
    if not negative:
        confused = [c for c, _ in confusions.get(record["label"], []) if c in items.by_class and c != record["label"]]
        other = confused[0] if confused else rng.choice(sorted(c for c in items.by_class if c != record["label"]))
        negative = rng.choice(items.by_class[other])["image"]
    return positive, negative


def load_prompt_image(path, size=None):
    image = vlm.load_image(path)
    return image.resize(size) if size is not None and image.size != size else image


# ----------------------------------------------------------------------------------------------------
# rollout

def used_columns(mask):
    """Number of leading columns holding some completion token (the rest is right padding)."""
    return int(mask.sum(0).nonzero().max()) + 1 if mask.sum() > 0 else 1


@torch.no_grad()
def score(policy, batch, rows, ids, mask, args, bf16, device):
    """Log-probs of completions (no gradient, eval mode: no dropout), in micro-batches. `rows[i]` is the
    prompt row of `batch` that completion i is scored under."""
    out = torch.zeros(ids.shape, dtype=torch.float32, device=device)
    was_training = policy.training
    policy.eval()
    for s in range(0, len(rows), args.micro_batch_size):
        idx = list(range(s, min(s + args.micro_batch_size, len(rows))))
        keep = used_columns(mask[idx])
        with vlm.autocast(device, bf16):
            out[idx, :keep] = policy(batch.select([rows[i] for i in idx]), ids[idx, :keep], mask[idx, :keep],
                                     temperature=args.temperature)
    policy.train(was_training)
    return out


def rollout(items_slice, start_index, step, draw, ctx):
    """Sample G completions for each item, score rewards. Returns a dict of per-row tensors + details."""
    args, d, proc, policy = ctx["args"], ctx["d"], ctx["processor"], ctx["policy"]
    G, half = args.group_size, args.group_size // 2
    images, neg_images, questions, records, bad = [], [], [], [], 0
    for k, record in enumerate(items_slice):
        rng = random.Random(seed_of(args.seed, start_index + k))  # per item: the same on any number of ranks
        while True:  # an unreadable image is counted and replaced by another item, keeping shapes equal
            try:
                anchor = load_prompt_image(record["image"])
                row_images = [anchor]
                if args.tapo:
                    pos, neg = tapo_images(record, ctx["items"], ctx["confusions"], rng)
                    row_images.append(load_prompt_image(pos, anchor.size))
                    neg_images.append(load_prompt_image(neg, anchor.size))
                break
            except ImageError as e:
                print(f"warning: {record.get('_src', '')}: {e}", flush=True)
                bad += 1
                record = ctx["items"][rng.randrange(10 ** 9)]
        question = question_for(record, ctx["mode"](record), ctx["names"])
        images += row_images
        questions += [question] * len(row_images)
        records.append(record)
    batch = proc.encode(images, questions).to(d.device)
    per_prompt = half if args.tapo else G
    ids_parts, mask_parts = [], []
    t0 = time.time()
    with vlm.generation_mode(policy), vlm.autocast(d.device, ctx["bf16"]):
        n_rows = len(images)
        for s in range(0, n_rows, args.rollout_prompts * (2 if args.tapo else 1)):
            sub = list(range(s, min(s + args.rollout_prompts * (2 if args.tapo else 1), n_rows)))
            # seeded by the first item's place in the stream: with --rollout_prompts 1 the samples of an
            # item do not depend on how items are spread over ranks
            gen = torch.Generator(device=d.device).manual_seed(seed_of(args.seed, start_index + s // (2 if args.tapo else 1)))
            roll = vlm.sample_completions(policy, batch.select(sub), group_size=per_prompt,
                                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, top_k=args.top_k, generator=gen,
                                          **proc.sampling_tokens)
            ids_parts.append(roll.completion_ids)
            mask_parts.append(roll.completion_mask)
    L = max(x.shape[1] for x in ids_parts)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, L - x.shape[1]), value=v)
    ids = torch.cat([pad(x, proc.pad_token_id) for x in ids_parts])
    mask = torch.cat([pad(x, 0) for x in mask_parts])
    # which prompt row of `batch` each completion is scored under (its own image, or the anchor's)
    prompt_of_row = [i // per_prompt for i in range(len(ids))]
    if args.tapo and args.tapo_anchor_only:
        prompt_of_row = [2 * (i // G) for i in range(len(ids))]
    texts = proc.decode(ids, mask)
    row_records = [r for r in records for _ in range(G)]
    group_ids = [i for i in range(len(records)) for _ in range(G)]
    rewards, details = ctx["reward"](texts, row_records, group_ids)
    rewards = torch.tensor(rewards, dtype=torch.float32)
    lengths = mask.sum(1).cpu()
    rewards = rewards + overlong_penalty(lengths, args.max_new_tokens, args.overlong_cache)
    out = {"batch": batch, "rows": prompt_of_row, "ids": ids, "mask": mask, "rewards": rewards,
           "details": details, "bad_images": bad, "rollout_s": time.time() - t0, "lengths": lengths}
    if args.tapo:
        neg_batch = proc.encode(neg_images, questions[::2]).to(d.device)
        out["neg_logp"] = score(policy, neg_batch, [i // G for i in range(len(ids))], ids, mask, args,
                                ctx["bf16"], d.device)
    return out


def concat_rollouts(parts, G):
    """Join rollouts (dynamic sampling draws) into one: prompts and row indices re-based."""
    if len(parts) == 1:
        return parts[0]
    offset, rows = 0, []
    L = max(p["ids"].shape[1] for p in parts)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, L - x.shape[1]), value=v)
    prompt_rows = []
    for p in parts:
        rows += [offset + r for r in p["rows"]]
        prompt_rows.append(p["batch"])
        offset += len(p["batch"])
    # one PromptBatch of all prompts: left-pad every part to the widest
    W = max(b.input_ids.shape[1] for b in prompt_rows)
    lpad = lambda t, v: torch.nn.functional.pad(t, (W - t.shape[-1], 0), value=v)
    batch = vlm.PromptBatch(torch.cat([lpad(b.input_ids, 0) for b in prompt_rows]),
                            torch.cat([lpad(b.attention_mask, 0) for b in prompt_rows]),
                            torch.cat([lpad(b.mm_token_type_ids, 0) for b in prompt_rows]),
                            torch.cat([lpad(b.position_ids, 0) for b in prompt_rows], 1),
                            torch.cat([b.pixel_values for b in prompt_rows]),
                            torch.cat([b.image_grid_thw for b in prompt_rows]))
    out = {"batch": batch, "rows": rows, "ids": torch.cat([pad(p["ids"], 0) for p in parts]),
           "mask": torch.cat([pad(p["mask"], 0) for p in parts]),
           "rewards": torch.cat([p["rewards"] for p in parts]), "details": sum((p["details"] for p in parts), []),
           "bad_images": sum(p["bad_images"] for p in parts), "rollout_s": sum(p["rollout_s"] for p in parts),
           "lengths": torch.cat([p["lengths"] for p in parts])}
    if "neg_logp" in parts[0]:
        out["neg_logp"] = torch.cat([pad(p["neg_logp"], 0) for p in parts])
    return out


def select_groups(r, groups, G):
    """Keep the given groups (indices) of a rollout."""
    rows = [g * G + j for g in groups for j in range(G)]
    out = dict(r)
    for k in ("ids", "mask", "rewards", "lengths", "neg_logp"):
        if k in r:
            out[k] = r[k][rows]
    out["rows"] = [r["rows"][i] for i in rows]
    out["details"] = [r["details"][i] for i in rows]
    return out


def collect_batch(step, cursor, ctx):
    """This rank's groups for one step, and the new global cursor. With dynamic sampling, groups whose
    rewards are all equal are dropped and more prompts drawn (all ranks draw together) until every rank
    has its share or --max_resample draws were made; then dropped groups fill the gap (advantage 0)."""
    args, d = ctx["args"], ctx["d"]
    P, G = args.prompts_per_step, args.group_size
    per_rank = P // d.world_size
    kept, dropped, n_kept, draws = [], [], 0, 0
    while True:
        start = cursor + d.rank * per_rank
        part = rollout([ctx["items"][start + i] for i in range(per_rank)], start, step, draws, ctx)
        cursor, draws = cursor + P, draws + 1
        if not args.dynamic_sampling:
            return part, cursor, {"draws": 1, "filled_groups": 0}
        r = part["rewards"].view(-1, G)
        varied = (r.max(1).values - r.min(1).values > 1e-6).tolist()
        kept.append(select_groups(part, [g for g, v in enumerate(varied) if v], G))
        dropped.append(select_groups(part, [g for g, v in enumerate(varied) if not v], G))
        n_kept += sum(varied)
        short = vlm.all_reduce_sum([max(per_rank - n_kept, 0)], d.device)[0]  # every rank draws together
        if short == 0 or draws > args.max_resample:
            break
    joined = concat_rollouts([p for p in kept + dropped if len(p["ids"])], G)
    return select_groups(joined, list(range(per_rank)), G), cursor, {"draws": draws,
                                                                    "filled_groups": max(per_rank - n_kept, 0)}


# ----------------------------------------------------------------------------------------------------
# update

def update(r, adv, ctx, stats):
    """--num_iterations passes of --mini_batches optimizer steps over the rollout `r`."""
    args, d, policy, trainable = ctx["args"], ctx["d"], ctx["policy"], ctx["trainable"]
    n = len(r["ids"])
    off_policy = args.num_iterations > 1 or args.mini_batches > 1  # later updates need the rollout's log-probs
    old = score(policy, r["batch"], r["rows"], r["ids"], r["mask"], args, ctx["bf16"], d.device) if off_policy else None
    ref = None
    if args.beta:
        if ctx["ref"] is None:  # LoRA: the reference is the same weights with adapters off
            with vlm.lora_disabled(policy.vlm):
                ref = score(policy, r["batch"], r["rows"], r["ids"], r["mask"], args, ctx["bf16"], d.device)
        else:
            ref = score(ctx["ref"], r["batch"], r["rows"], r["ids"], r["mask"], args, ctx["bf16"], d.device)
    G = args.group_size
    groups = list(range(n // G))
    for _ in range(args.num_iterations):
        for m in range(args.mini_batches):
            rows = [g * G + j for g in groups[m::args.mini_batches] for j in range(G)]
            micro = [rows[s:s + args.micro_batch_size] for s in range(0, len(rows), args.micro_batch_size)]
            n_tokens = vlm.all_reduce_sum([float(r["mask"][rows].sum())], d.device)[0]
            for i, idx in enumerate(micro):
                keep = used_columns(r["mask"][idx])  # trim the right padding this micro-batch does not use
                ids, mask = r["ids"][idx, :keep], r["mask"][idx, :keep]
                sync = i == len(micro) - 1 or not hasattr(trainable, "no_sync")
                with (contextlib.nullcontext() if sync else trainable.no_sync()), vlm.autocast(d.device, ctx["bf16"]):
                    logp, entropy = trainable(r["batch"].select([r["rows"][j] for j in idx]), ids, mask,
                                              temperature=args.temperature, return_entropy=True)
                    logp_old = old[idx, :keep] if old is not None else logp.detach()
                    ref_i = ref[idx, :keep] if ref is not None else None
                    tok, low, high = per_token_loss(logp, logp_old, adv[idx].to(logp.device), args.epsilon_low,
                                                    args.epsilon_high, args.beta, ref_i)
                    if args.tapo:
                        extra, kl_neg = tapo_terms(logp, r["neg_logp"][idx, :keep], args.gamma, args.eta)
                        tok = tok + extra
                        stats["tapo_kl"] += float((kl_neg.detach() * mask).sum())
                    loss = aggregate(tok, mask, args.loss, ga=len(micro), l_max=args.max_new_tokens,
                                     n_tokens=n_tokens, world=d.world_size)
                loss.backward()
                stats["loss"] += float(loss.detach())
                stats["tokens"] += float(mask.sum())
                stats["entropy"] += float((entropy * mask).sum())
                stats["clip_low"] += float((low * mask).sum())
                stats["clip_high"] += float((high * mask).sum())
                if ref_i is not None:
                    stats["kl"] += float((k3(ref_i, logp.detach()) * mask).sum())
            grad_norm = vlm.clip_gradients(trainable, ctx["params"], args.grad_clip)
            if math.isfinite(grad_norm):
                ctx["optimizer"].step()
            else:
                stats["skipped_updates"] += 1
                print(f"warning: non-finite gradient norm ({grad_norm}); update skipped", flush=True)
            ctx["optimizer"].zero_grad(set_to_none=True)
            ctx["scheduler"].step()
            stats["grad_norm"] = grad_norm
            stats["updates"] += 1


def main(argv=None):
    args = get_args(argv)
    d = vlm.init_distributed(args.device)
    bf16 = args.dtype == "bf16"
    torch.manual_seed(args.seed + d.rank)
    os.makedirs(args.out, exist_ok=True)
    if args.prompts_per_step % d.world_size:
        raise SystemExit(f"--prompts_per_step {args.prompts_per_step} must be divisible by {d.world_size} ranks")
    if args.group_size < 2 or (args.tapo and args.group_size % 2):
        raise SystemExit("--group_size must be >= 2 (and even with --tapo)")

    table = load_classes(args.classes) if args.classes else None
    records = [r for p in args.data for r in read_records(p, check_images=True, skip_bad=args.skip_bad)]
    names = class_names(table, "base") if table else None
    confusions = {}
    if args.confusions:
        with open(args.confusions) as f:
            confusions = json.load(f)
    reward_fn = rewards_lib.parse_reward(args.reward)
    resume_from = vlm.latest_checkpoint(args.out) if args.resume else None
    full_ft_resume = resume_from and args.lora_r == 0
    model = vlm.load_model(resume_from if full_ft_resume else args.model, "cpu" if args.fsdp else d.device,
                           "fp32" if args.fsdp else args.dtype)
    processor = vlm.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    if reward_fn.needs_verifier:
        if args.verifier_model:  # a local instruction-tuned model judges; answers cached on disk
            judge = vlm.load_model(args.verifier_model, d.device, args.dtype)
            reward_fn.verifier = rewards_lib.LLMVerifier(
                vlm.text_generator(judge, vlm.Processor.from_pretrained(args.verifier_model)),
                cache_path=args.verifier_cache or os.path.join(args.out, "verifier_cache.sqlite"))
        elif table is None:
            raise SystemExit(f"--reward {args.reward} needs --classes (taxonomy verifier) or --verifier_model")
        else:
            reward_fn.verifier = rewards_lib.TaxonomyVerifier(table)
    vlm.configure_trainable(model, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            train_vision=args.train_vision, gradient_checkpointing=args.gradient_checkpointing)
    if resume_from and args.lora_r:
        vlm.load_lora_weights(model, resume_from)
    trainable, policy = vlm.wrap_policy(model.to(d.device), d, fsdp=args.fsdp, bf16=bf16)
    ref = None
    if args.beta and not args.lora_r:  # full fine-tuning: a frozen copy of the start, sharded like the policy
        ref_model = vlm.load_model(args.model, "cpu" if args.fsdp else d.device, "fp32" if args.fsdp else args.dtype)
        ref_model.requires_grad_(False)
        _, ref = vlm.wrap_policy(ref_model.to(d.device), vlm.Dist(device=d.device) if not args.fsdp else d,
                                 fsdp=args.fsdp, bf16=bf16)
        ref.eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(records) / args.prompts_per_step))
    updates = steps * args.num_iterations * args.mini_batches
    optimizer = vlm.make_optimizer(params, args.lr, args.weight_decay)
    scheduler = vlm.lr_schedule(optimizer, args.schedule, int(args.warmup_ratio * updates), updates)
    start, cursor, totals = 0, 0, {"skipped_updates": 0, "bad_images": 0}
    if resume_from:
        start, extra = vlm.load_training_state(resume_from, policy, optimizer, scheduler, fsdp=args.fsdp)
        cursor, totals = extra["cursor"], extra["totals"]
        vlm.print0(f"resumed from {resume_from} at step {start}")
    mode = (lambda r: "mcq" if "options" in r else "open") if args.prompt == "auto" else (lambda r: args.prompt)
    ctx = dict(args=args, d=d, processor=processor, policy=policy, trainable=trainable, ref=ref, bf16=bf16,
               items=Items(records, args.seed), confusions=confusions, names=names, mode=mode, reward=reward_fn,
               optimizer=optimizer, scheduler=scheduler, params=params)
    vlm.print0(f"{len(records)} items, {steps} steps of {args.prompts_per_step} prompts x {args.group_size}, "
               f"reward {reward_fn.spec}, loss {args.loss}, {sum(p.numel() for p in params) / 1e6:.2f}M trainable "
               f"parameters on {d.world_size} rank(s)")

    log = vlm.JsonlLog(os.path.join(args.out, "log.jsonl"), d)
    bar = vlm.progress(start, steps, d, "grpo")
    for step in bar:
        t0 = time.time()
        r, cursor, info = collect_batch(step, cursor, ctx)
        adv = group_advantages(r["rewards"], args.group_size, args.scale_rewards)
        t1 = time.time()
        stats = defaultdict(float)
        policy.train()
        update(r, adv, ctx, stats)
        t2 = time.time()
        totals["skipped_updates"] += stats["skipped_updates"]
        totals["bad_images"] += r["bad_images"]
        s = rewards_lib.summarize(r["details"])
        rw = r["rewards"]
        # rank sums -> global means
        keys = ["reward", "reward_sq", "accuracy", "format", "length", "rows"]
        local = [float(rw.sum()), float((rw ** 2).sum()), s["accuracy"] * len(rw), s["format"] * len(rw),
                 float(r["lengths"].float().sum()), float(len(rw))]
        tok_keys = ["loss", "kl", "entropy", "clip_low", "clip_high", "tapo_kl", "tokens"]
        g = dict(zip(keys + tok_keys, vlm.all_reduce_sum(local + [stats[k] for k in tok_keys], d.device)))
        n, ntok, n_upd = g["rows"], max(g["tokens"], 1.0), max(stats["updates"], 1)
        row = {"step": step + 1, "reward_mean": g["reward"] / n,
               "reward_std": math.sqrt(max(g["reward_sq"] / n - (g["reward"] / n) ** 2, 0.0)),
               "accuracy": g["accuracy"] / n, "format": g["format"] / n, "completion_length": g["length"] / n,
               "loss": g["loss"] / d.world_size / n_upd, "kl": g["kl"] / ntok, "entropy": g["entropy"] / ntok,
               "clip_low": g["clip_low"] / ntok, "clip_high": g["clip_high"] / ntok,
               "grad_norm": stats["grad_norm"], "lr": scheduler.get_last_lr()[0],
               "rollout_s": t1 - t0, "update_s": t2 - t1, "tokens_per_s": g["length"] / max(t2 - t0, 1e-9),
               "draws": info["draws"], "filled_groups": info["filled_groups"], **totals}
        if args.tapo:
            row["tapo_kl"] = g["tapo_kl"] / ntok
        for k, v in s.items():
            if k.startswith("cat/"):
                row[k] = v
        log.write(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}", kl=f"{row['kl']:.4f}")
        last = step + 1 == steps
        if (args.save_every and (step + 1) % args.save_every == 0) or last:
            vlm.save_training_checkpoint(os.path.join(args.out, "final" if last else f"step_{step + 1:06d}"), policy,
                                         processor, d, step=step + 1, optimizer=optimizer, scheduler=scheduler,
                                         extra={"cursor": cursor, "totals": totals, "args": vars(args)},
                                         fsdp=args.fsdp)
            if d.is_main:
                vlm.prune_checkpoints(args.out, args.keep)
    vlm.print0(f"done: {args.out}/final")
    if vlm.dist.is_initialized():
        vlm.dist.destroy_process_group()


if __name__ == "__main__":
    main()
