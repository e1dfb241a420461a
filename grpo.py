"""grpo.py — the GRPO family by hand: DiVE-k, SpeciaRL, Fine-R1's TAPO and the Visual-RFT baseline.

One step (the formulas: docs/methods.md §4):
  1. rollout   G completions per prompt item with engine.sample_completions (each prompt prefilled once),
               scored by reward.py (--reward mcq+format, exact+format, speciarl, exact:0.9+format:0.1, ...);
               DAPO: overlong shaping, and dynamic sampling replaces groups whose rewards are all equal;
  2. advantage A_i = (R_i - mean_g R) / (std_g R + 1e-4) within each group of G (--scale_rewards);
  3. update    ℓ_t = -min(r_t A, clip(r_t, 1-ε_low, 1+ε_high) A) + β k3_t, aggregated per --loss
               (grpo | bnpo | dr_grpo | dapo) over micro-batches, --num_iterations times per rollout; GSPO
               (gspo, gspo_token) clips a sequence ratio instead, CISPO (cispo) weighs REINFORCE by the
               clipped token ratio; the KL reference is the starting policy (LoRA: the same weights with the
               adapters off); the sampler's log-probs against the trainer's (the gap) are logged and, with
               --rollout_correction, weigh the loss.
TAPO (--tapo, docs/methods.md §5): half of each group samples on the anchor image, half on a positive of
the same class, one advantage group; each rollout is scored under its own image (or the anchor's:
--tapo_anchor_only); the loss adds -γ·KL(π(·|x*) ‖ π(·|x_neg)) against a look-alike negative image and
η·mean(-log p). Everything TAPO adds is in the functions marked "TAPO".

    python grpo.py --model out/sft/final --data out/mine/mcq.jsonl --out out/grpo --reward mcq+format
    torchrun --standalone --nproc_per_node=8 grpo.py ... --dtype bf16 [--fsdp]
Recipes with the papers' settings: runs/*.sh.
"""

import argparse
import contextlib
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

import reward as rewards_lib
import trainer
import vlm
from checkpoint import save_if_due
from common import (JsonlLog, add_image_args, add_report_args, add_runtime_args, add_sampling_args,
                    all_reduce_sum, cleanup, flag_defaults, init_distributed, nonnegative_float, nonnegative_int,
                    positive_float, positive_int, print0, progress, seed_process, unit_interval,
                    warn_large_images)
from data.prompts import question_for
from data.records import (NameTable, check_triplets, listed_classes, load_classes, load_confusions,
                          read_records, require_fields)
from engine import check_context, text_generator
from lora import lora_disabled
from rollouts import Items, Rollouts, StepSampler, collect_rollouts, score_rollouts
from trainer import used_columns

def make_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="HF id or folder of the starting policy")
    a("--data", nargs="+", required=True,
      help="JSONL: open-ended records, MCQ records (mine_topk.py) or triplets")
    a("--classes", default=None, help="classes.json: labels checked against it; class lists, verifier")
    a("--out", required=True, help="output folder: step_*/, final/, log.jsonl")
    a("--prompt", default="auto", choices=["auto", "open", "mcq", "open_world", "record"] + ["open_list"],
      help="question asked (data/prompts.py); auto = mcq for records with options, else open")
    a("--class_list", default="none", choices=["none", "base", "novel", "all"],
      help="class names the open question lists (of the record's dataset; Visual-RFT: base)")
    a("--reward", default="mcq+format", help=rewards_lib.REWARD_HELP)
    a("--verifier_model", default=None, help="LLM verifier for specificity rewards (default: the taxonomy's)")
    a("--verifier_cache", default=None, help="SQLite cache of LLM verdicts (default: in --out)")
    # the GRPO family
    a("--loss", default="grpo", choices=LOSSES,
      help="surrogate and aggregation (docs/methods.md §4): grpo | bnpo | dr_grpo | dapo (PPO's clipped "
           "token ratio), gspo | gspo_token (GSPO's sequence ratio), cispo (REINFORCE weighted by the "
           "clipped ratio)")
    a("--scale_rewards", default="group", choices=["group", "batch", "none"], help="advantage normalisation")
    a("--beta", type=nonnegative_float, default=0.04, help="KL coefficient (against the starting policy)")
    a("--kl_estimator", default="k3", choices=["k1", "k2", "k3"],
      help="the KL term's per-token estimator (Schulman): k1 = logp - ref, k2 = (logp - ref)²/2, k3 (>= 0)")
    a("--epsilon_low", type=unit_interval, default=None,
      help="lower clip of the ratio: 1 - ε_low (default: the loss's paper: 0.2; gspo 3e-4; cispo 1: none)")
    a("--epsilon_high", type=nonnegative_float, default=None,
      help="upper clip: 1 + ε_high (default: the loss's paper: 0.2; gspo 4e-4; cispo 4, a weight cap of 5; "
           "DAPO's clip-higher: 0.28)")
    a("--entropy_coef", type=nonnegative_float, default=0.0, help="entropy bonus: -c·H_t per token")
    a("--mask_truncated", action="store_true",
      help="DAPO's overlong filtering: completions that reach --max_new_tokens without an EOS get no loss")
    a("--rollout_correction", default="none", choices=["none", "tis", "mis"],
      help="weigh each token's policy loss by ρ = π_train/π_sampler (stop-gradient), the sampler/trainer "
           "gap's importance weight: tis = min(ρ, cap) (truncated), mis = ρ, or 0 over the cap (masked)")
    a("--rollout_correction_cap", type=positive_float, default=2.0, help="the cap C of --rollout_correction")
    a("--rollout_correction_level", default="token", choices=["token", "sequence"],
      help="ρ per token, or per sequence (the product of its tokens' ratios)")
    a("--num_iterations", type=positive_int, default=1, help="updates per rollout (> 1 keeps old log-probs)")
    a("--mini_batches", type=positive_int, default=1,
      help="optimizer steps per iteration, each on a slice of the groups")
    a("--dynamic_sampling", action="store_true", help="DAPO: drop groups of equal rewards and draw more")
    a("--max_resample", type=nonnegative_int, default=4,
      help="extra draws per step for dynamic sampling before giving up")
    a("--overlong_cache", type=nonnegative_int, default=0,
      help="DAPO overlong shaping over the last N tokens (0: off)")
    # TAPO
    a("--tapo", action="store_true", help="Fine-R1's triplet-augmented policy optimisation")
    a("--tapo_anchor_only", action="store_true", help="score positive-image rollouts under the anchor image")
    a("--confusions", default=None, help="confusions.json from mine_topk.py (TAPO negatives)")
    a("--gamma", type=nonnegative_float, default=0.01, help="TAPO inter-class KL weight")
    a("--eta", type=nonnegative_float, default=0.03, help="TAPO entropy regulariser weight on mean(-log p)")
    # sampling
    a("--prompts_per_step", type=positive_int, default=8,
      help="prompt items per step over all ranks (divisible by the ranks)")
    a("--class_balanced", action="store_true",
      help="draw the items class by class in turn (each class spread evenly over an epoch), not at random")
    a("--micro_batch_size", type=positive_int, default=8,
      help="completions per training forward on one rank (a multiple of --num_samples encodes each prompt "
           "once)")
    a("--prefix_forward", default="shared", choices=["shared", "per_row"],
      help="the update's forward: each group's image and prompt encoded once for its completions (shared), "
           "or once per completion (per_row: the slow reference, same log-probs and gradients)")
    a("--top_k", type=nonnegative_int, default=0, help="sample from the k likeliest tokens (0: all)")
    # optimisation (a step: one rollout, then --num_iterations x --mini_batches updates)
    trainer.add_training_args(ap, lr=1e-6, schedule="constant", warmup_ratio=0.0)
    a("--skip_bad", action="store_true", help="drop bad records (and say how many) instead of stopping")
    add_sampling_args(ap, num_samples=4, prompts_per_call=8, max_new_tokens=256)
    add_image_args(ap)
    add_runtime_args(ap)
    add_report_args(ap)
    return ap


def parse_args(argv=None):
    ap = make_parser()
    args = ap.parse_args(argv)
    if args.prompt == "open_list":
        ap.error("--prompt open_list is now --prompt open --class_list base")
    low, high = CLIP_DEFAULTS.get(args.loss, (0.2, 0.2))  # a clip not given is its loss's paper's
    args.epsilon_low = low if args.epsilon_low is None else args.epsilon_low
    args.epsilon_high = high if args.epsilon_high is None else args.epsilon_high
    return args


# ----------------------------------------------------------------------------------------------------
# the formulas (tested against per-token loops in tests/test_grpo.py)

def group_advantages(rewards, group_size, scale="group", eps=1e-4, device="cpu"):
    """A_i = (R_i - mean_g R) / (std + eps), std unbiased (ddof 1) over the group ('group') or over the
    whole global batch ('batch', summed over ranks on `device`); 'none' gives R_i - mean_g R. Groups are
    consecutive rows."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale == "none":
        return centred.view(-1)
    if scale == "group":
        std = r.std(1, keepdim=True)
    else:  # batch: sum, sum of squares and count over every rank
        s, sq, n = all_reduce_sum([float(r.sum()), float((r ** 2).sum()), float(r.numel())], device)
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


LOSSES = ["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "gspo_token", "cispo"]
# (ε_low, ε_high) when the flags are not given, from each loss's paper: GRPO's 0.2 for the PPO-style token
# losses; GSPO's 3e-4 / 4e-4 (a length-normalised sequence ratio moves far less than a token's); CISPO no
# lower clip (1 - 1 = 0, below any ratio) and a weight cap of 1 + 4 = 5 (MiniMax-M1 publishes none; ScaleRL's
# ε_max)
CLIP_DEFAULTS = {"gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "cispo": (1.0, 4.0)}
# the aggregation of each later loss's paper: GSPO averages per-sequence losses (grpo's row mean: its
# per-token loss is constant along a row), CISPO takes the token mean of the step (dapo's)
AGGREGATION = {"gspo": "grpo", "gspo_token": "grpo", "cispo": "dapo"}


def kl_penalty(ref_logp, logp, estimator="k3"):
    """Schulman's estimators of KL(π ‖ π_ref) on tokens drawn from π, with d = ref - logp: k1 = -d (unbiased,
    can be negative), k2 = d²/2 (biased, low variance; its gradient is that of the KL), k3 = e^d - d - 1."""
    if estimator == "k3":
        return k3(ref_logp, logp)
    d = ref_logp - logp
    return -d if estimator == "k1" else 0.5 * d ** 2


def policy_ratio(logp, old_logp, mask, loss):
    """The importance ratio the surrogate clips. Per token r_t = exp(logp_t - old_t); GSPO's per sequence
    s_i = exp(mean_t m_t (logp_t - old_t)), (N, 1); GSPO-token's sg(s_i)·exp(logp_t - sg(logp_t)): the value
    of s_i on every token, the gradient s_i·∇logp_t of each token alone."""
    if loss not in ("gspo", "gspo_token"):
        return torch.exp(logp - old_logp)
    s = torch.exp(((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1))
    return s if loss == "gspo" else s.detach() * torch.exp(logp - logp.detach())


def policy_loss(logp, old_logp, adv, eps_low, eps_high, loss="grpo", mask=None):
    """The surrogate's per-token loss, and where its clip acts (low, high). PPO-style (every loss but cispo,
    with its ratio ρ): -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A), clipped where the min takes the clipped term
    (its gradient is then 0). CISPO: -sg(clip(r_t, 1-ε_low, 1+ε_high))·A·logp_t, REINFORCE with the clipped
    ratio as a weight: no token loses its gradient; low/high say where the weight was clipped."""
    ratio = policy_ratio(logp, old_logp, mask, loss)
    a = adv[:, None]
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    low, high = ratio < 1 - eps_low, ratio > 1 + eps_high
    if loss == "cispo":
        return -clipped.detach() * a * logp, low, high
    return -torch.min(ratio * a, clipped * a), low & (a < 0), high & (a > 0)


def per_token_loss(logp, old_logp, adv, eps_low, eps_high, beta=0.0, ref_logp=None, *, loss="grpo", mask=None,
                   weight=None, kl="k3", entropy=None, entropy_coef=0.0):
    """ℓ_t = w_t·policy_t + β·KL_t - c·H_t: the surrogate of `loss` (policy_loss; default PPO's on the token
    ratio r = exp(logp - old_logp)), weighted by the rollout correction's stop-gradient w (None: 1), the KL
    estimator `kl` against ref_logp, the entropy bonus. Also the clip masks."""
    loss_t, low, high = policy_loss(logp, old_logp, adv, eps_low, eps_high, loss, mask)
    if weight is not None:
        loss_t = loss_t * weight
    if beta:
        loss_t = loss_t + beta * kl_penalty(ref_logp, logp, kl)
    if entropy_coef:
        loss_t = loss_t - entropy_coef * entropy
    return loss_t, low, high


def tapo_terms(logp, neg_logp, gamma, eta, delta_clamp=20.0, kl_clamp=10.0):
    """TAPO. Fine-R1's extra per-token terms: -γ·KL(π(·|x*) ‖ π(·|x_neg)) in k3 form on δ = logp_neg - logp
    (δ clamped to ±20, the KL to ±10; logp_neg without gradient) and η·(-logp)."""
    delta = (neg_logp.detach() - logp).clamp(-delta_clamp, delta_clamp)
    kl = (torch.exp(delta) - delta - 1).clamp(-kl_clamp, kl_clamp)
    return -gamma * kl + eta * (-logp), kl


def aggregate(token_loss, mask, loss_type, *, l_max, n_rows, n_tokens, world):
    """This micro-batch's share of the optimizer step's loss (docs/methods.md §4). Each loss is a sum over the
    step's rows or tokens divided by a count of the whole step on all ranks (n_rows completions, n_tokens
    loss tokens), so its gradient does not depend on how the step is cut into micro-batches or ranks; each
    rank divides by its share of the count (count / world), as DDP then averages the gradients over ranks."""
    loss_type = AGGREGATION.get(loss_type, loss_type)
    if loss_type == "grpo":  # the mean over the step's completions of each one's token mean
        return ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / (n_rows / world)
    total = (token_loss * mask).sum()
    if loss_type in ("bnpo", "dapo"):  # the token mean of the step
        return total / (n_tokens / world)
    if loss_type == "dr_grpo":  # a constant normaliser: the step's completions x L_max
        return total / (n_rows * l_max / world)
    raise ValueError(loss_type)


# The sampler (engine.py: KV-cached decode steps) and the trainer (trainer.sequence_logprobs: one forward)
# compute the same log-probs with other kernels: equal in fp32 to rounding, not in bf16. `train_logp` is the
# first pass's (the old log-probs, else the first update's own); a sampler log-prob of NaN is unknown (a row
# scored under another prompt than it was sampled from: TAPO anchor-only).

def sampler_gap(train_logp, sampler_logp, mask):
    """Sums over the tokens of `mask` whose sampler log-prob is known: |logp_train - logp_sampler|, k3 of
    KL(π_sampler ‖ π_train) (the tokens were drawn from the sampler), the tokens whose ratio π_train/π_sampler
    is outside [0.8, 1.25] (|log ρ| > log 1.25), and their count."""
    known = (mask > 0) & torch.isfinite(sampler_logp)
    d = torch.where(known, train_logp.detach() - sampler_logp, 0.0).double()  # k3 ≈ d²/2: fp32 loses it
    return {"gap_abs": float(d.abs().sum()), "gap_kl": float((torch.expm1(d) - d).sum()),
            "gap_outside": float((d.abs() > math.log(1.25)).sum()), "gap_tokens": float(known.sum())}


def rollout_weights(train_logp, sampler_logp, mask, kind, cap, level="token"):
    """The rollout correction's weight on each token's policy loss, without gradient: ρ = π_train/π_sampler
    per token, or per sequence exp(Σ_t m_t log ρ_t); tis: min(ρ, cap); mis: ρ up to the cap, 0 above. A token
    whose sampler log-prob is unknown counts as ρ = 1."""
    log_rho = torch.where(torch.isfinite(sampler_logp), train_logp.detach() - sampler_logp, 0.0) * mask
    if level == "sequence":
        log_rho = log_rho.sum(1, keepdim=True)
    rho = torch.exp(log_rho)
    return rho.clamp(max=cap) if kind == "tis" else torch.where(rho <= cap, rho, 0.0)


def truncated(ids, lengths, max_new_tokens, eos_ids):
    """Completions cut by the length limit: all max_new_tokens tokens and the last one no EOS."""
    lengths = lengths.to(ids.device).long()
    last = ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    return (lengths >= max_new_tokens) & ~torch.isin(last, torch.tensor(eos_ids, device=ids.device))


# ----------------------------------------------------------------------------------------------------
# the update

@dataclass
class StepTargets:
    """What every micro-batch of a step's update reads besides the policy's own log-probs."""
    r: Rollouts
    adv: torch.Tensor              # (N,) each completion's advantage
    old: torch.Tensor | None       # (N, L) the log-probs they were sampled with (for later updates of them)
    ref: torch.Tensor | None       # (N, L) the KL reference's log-probs (β > 0)
    loss_mask: torch.Tensor        # (N, L) the tokens that have a loss (--mask_truncated: cut ones do not)


def step_targets(r, adv, training, args):
    """The old and reference log-probs and the loss mask of the rollouts `r`, once per step."""
    off_policy = args.num_iterations > 1 or args.mini_batches > 1  # later updates need the sampled log-probs
    old = score_rollouts(training.policy, r, args, training.bf16) if off_policy else None
    ref = None
    if args.beta:  # the starting weights: LoRA's adapters switched off (no second copy), else the frozen copy
        with lora_disabled(training.policy.vlm) if training.reference is None else contextlib.nullcontext():
            reference = training.policy if training.reference is None else training.reference
            ref = score_rollouts(reference, r, args, training.bf16)
    loss_mask = r.mask
    if args.mask_truncated:  # DAPO's overlong filtering: a completion the length limit cut has no loss at all
        cut = truncated(r.ids, r.lengths, args.max_new_tokens, training.processor.eos_token_ids)
        loss_mask = r.mask * ~cut[:, None]
    return StepTargets(r, adv, old, ref, loss_mask)


def micro_batch_loss(t, idx, training, args, *, n_rows, n_tokens, world, first_pass):
    """The loss of completions `idx` (its gradient is their share of the step's) and its statistics' sums."""
    r = t.r
    keep = used_columns(r.mask[idx])  # trim the right padding these rows do not use
    ids, mask, lmask = r.ids[idx, :keep], r.mask[idx, :keep], t.loss_mask[idx, :keep]
    logp, entropy = training.trainable(r.prompts, ids, mask, [r.prompt_rows[j] for j in idx],
                                       temperature=args.temperature, return_entropy=True,
                                       entropy_grad=args.entropy_coef > 0,
                                       shared_prefix=args.prefix_forward == "shared")
    # on-policy (one update per rollout) the old log-probs are the current ones, detached: the ratio is
    # exactly 1 and its gradient is ∇logp, i.e. REINFORCE with a group baseline
    old = t.old[idx, :keep] if t.old is not None else logp.detach()
    sampled = r.sampler_logp[idx, :keep] if r.sampler_logp is not None else torch.full_like(mask, math.nan)
    stats = sampler_gap(old, sampled, mask) if first_pass else {}  # every row once, as the correction sees it
    weight = None if args.rollout_correction == "none" else rollout_weights(
        old, sampled, mask, args.rollout_correction, args.rollout_correction_cap,
        args.rollout_correction_level)
    ref = t.ref[idx, :keep] if t.ref is not None else None
    tok, low, high = per_token_loss(logp, old, t.adv[idx].to(logp.device), args.epsilon_low,
                                    args.epsilon_high, args.beta, ref, loss=args.loss, mask=mask,
                                    weight=weight, kl=args.kl_estimator, entropy=entropy,
                                    entropy_coef=args.entropy_coef)
    if args.tapo:
        extra, kl_neg = tapo_terms(logp, r.neg_logp[idx, :keep], args.gamma, args.eta)
        tok = tok + extra
        stats["tapo_kl"] = float((kl_neg.detach() * lmask).sum())
    loss = aggregate(tok, lmask, args.loss, l_max=args.max_new_tokens, n_rows=n_rows, n_tokens=n_tokens,
                     world=world)
    stats.update(loss=float(loss.detach()), tokens=float(lmask.sum()),
                 entropy=float((entropy.detach() * lmask).sum()),
                 clip_low=float((low * lmask).sum()), clip_high=float((high * lmask).sum()))
    if ref is not None:
        stats["kl"] = float((k3(ref, logp.detach()) * lmask).sum())
    return loss, stats


def update(t, training, args, d):
    """--num_iterations passes of --mini_batches optimizer steps over a step's rollouts. Returns this rank's
    sums of the micro-batches' statistics, and the optimizer's: the last gradient norm, updates made, and
    updates skipped for a non-finite gradient."""
    sums, groups = defaultdict(float), list(range(t.r.n_groups))
    optimizer = {"grad_norm": 0.0, "updates": 0, "skipped_updates": 0}
    for it in range(args.num_iterations):
        for m in range(args.mini_batches):
            rows = t.r.rows_of(groups[m::args.mini_batches])
            micro = [rows[s:s + args.micro_batch_size] for s in range(0, len(rows), args.micro_batch_size)]
            # the step's counts on every rank: the losses' normalisers (aggregate)
            n_rows, n_tokens = all_reduce_sum([float(len(rows)), float(t.loss_mask[rows].sum())], d.device)
            for i, idx in enumerate(micro):
                last = i == len(micro) - 1  # DDP averages the gradients over ranks once, after the last
                with (training.trainable.no_sync() if not last and hasattr(training.trainable, "no_sync")
                      else contextlib.nullcontext()), trainer.autocast(d.device, training.bf16):
                    loss, stats = micro_batch_loss(t, idx, training, args, n_rows=n_rows,
                                                   n_tokens=max(n_tokens, 1.0), world=d.world_size,
                                                   first_pass=it == 0)
                loss.backward()
                for k, v in stats.items():
                    sums[k] += v
            optimizer["grad_norm"] = training.optimizer_step()
            optimizer["skipped_updates"] += not math.isfinite(optimizer["grad_norm"])
            optimizer["updates"] += 1
    return sums, optimizer


# the sums a step's metrics are made of, reduced over ranks in one call
METRIC_SUMS = ("reward", "reward_sq", "accuracy", "format", "length", "rows", "loss", "kl", "entropy",
               "clip_low", "clip_high", "tapo_kl", "tokens", "gap_abs", "gap_kl", "gap_outside", "gap_tokens")


def step_metrics(r, sums, optimizer, d, seconds, tapo):
    """The step's metrics: this rank's sums (the update's, the rollouts') as means over every rank."""
    s = rewards_lib.summarize(r.details)
    rw, n = r.rewards, len(r.rewards)
    local = {**sums, "reward": float(rw.sum()), "reward_sq": float((rw ** 2).sum()),
             "accuracy": s["accuracy"] * n, "format": s["format"] * n,
             "length": float(r.lengths.float().sum()), "rows": float(n)}
    g = dict(zip(METRIC_SUMS, all_reduce_sum([local.get(k, 0.0) for k in METRIC_SUMS], d.device)))
    n, ntok, gap_tokens = g["rows"], max(g["tokens"], 1.0), max(g["gap_tokens"], 1.0)
    row = {"reward_mean": g["reward"] / n,
           "reward_std": math.sqrt(max(g["reward_sq"] / n - (g["reward"] / n) ** 2, 0.0)),
           "accuracy": g["accuracy"] / n, "format": g["format"] / n, "completion_length": g["length"] / n,
           "loss": g["loss"] / d.world_size / max(optimizer["updates"], 1), "kl": g["kl"] / ntok,
           "entropy": g["entropy"] / ntok, "clip_low": g["clip_low"] / ntok,
           "clip_high": g["clip_high"] / ntok, "grad_norm": optimizer["grad_norm"],
           "tokens_per_s": g["length"] / max(seconds, 1e-9)}
    # the sampler/trainer gap: sampler_gap's sums as token means
    row.update({f"sampler_{k}": g[k] / gap_tokens for k in ("gap_abs", "gap_kl", "gap_outside")})
    if tapo:
        row["tapo_kl"] = g["tapo_kl"] / ntok
    row.update({k: v for k, v in s.items() if k.startswith("cat/")})
    return row


# ----------------------------------------------------------------------------------------------------

def make_question(args, table):
    """record -> the question asked about its image (--prompt; the open question lists --class_list)."""
    def ask(record):
        mode = args.prompt if args.prompt != "auto" else "mcq" if "options" in record else "open"
        listed = listed_classes(table, record.get("dataset"), args.class_list) if table else []
        return question_for(record, mode, [c["name"] for c in listed])
    return ask


def make_reward(args, table, d):
    """reward.py's reward for --reward, with its verifier when a specificity term needs one."""
    reward_fn = rewards_lib.parse_reward(args.reward)
    if not reward_fn.needs_verifier:
        return reward_fn
    if args.verifier_model:  # a local instruction-tuned model judges; answers cached on disk
        judge = vlm.load_model(args.verifier_model, d.device, args.dtype)
        reward_fn.verifier = rewards_lib.LLMVerifier(
            text_generator(judge, vlm.Processor.from_pretrained(args.verifier_model)),
            cache_path=args.verifier_cache or os.path.join(args.out, "verifier_cache.sqlite"))
    elif table is None:
        raise SystemExit(f"--reward {args.reward} needs --classes (taxonomy verifier) or --verifier_model")
    else:
        reward_fn.verifier = rewards_lib.TaxonomyVerifier(table)
    return reward_fn


def main(argv=None):
    args = parse_args(argv)
    d = init_distributed(args.device)
    seed_process(args.seed, d.rank)  # dropout differs per rank; the samples do not
    os.makedirs(args.out, exist_ok=True)
    if args.prompts_per_step % d.world_size:
        raise SystemExit(f"--prompts_per_step {args.prompts_per_step} must be divisible by "
                         f"{d.world_size} ranks")
    if args.num_samples < 2 or (args.tapo and args.num_samples % 2):
        raise SystemExit("--num_samples must be >= 2 (and even with --tapo)")

    table = load_classes(args.classes) if args.classes else None
    names = NameTable()  # one table of names and aliases for all the files: two may not share one
    records = [r for p in args.data
               for r in read_records(p, check_images=True, skip_bad=args.skip_bad, classes=table, names=names)]
    # what the reward, the question and TAPO read from every record, checked before the model loads
    require_fields(records, rewards_lib.parse_reward(args.reward).record_fields, f"--reward {args.reward}")
    require_fields(records, ("options",) if args.prompt == "mcq" else (), "--prompt mcq")
    if args.class_list != "none" and table is None:
        raise SystemExit(f"--class_list {args.class_list} needs --classes")
    if args.tapo:
        check_triplets(records)
    confusions = load_confusions(args.confusions, table) if args.confusions else {}
    reward_fn = make_reward(args, table, d)
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(records) / args.prompts_per_step))
    training = trainer.setup_training(args, d, steps * args.num_iterations * args.mini_batches,
                                      reference=args.beta > 0, defaults=flag_defaults(make_parser()))
    warn_large_images(records, training.processor)
    check_context(training.policy, args.max_new_tokens)  # up front; each call checks its prompts' width too
    cursor = training.resumed.get("cursor", 0)
    totals = training.resumed.get("totals", {"skipped_updates": 0, "bad_images": 0})
    sampler = StepSampler(Items(records, args.seed, args.class_balanced), training,
                          ask=make_question(args, table), reward_fn=reward_fn, confusions=confusions,
                          args=args, device=d.device,
                          shaping=lambda n: overlong_penalty(n, args.max_new_tokens, args.overlong_cache))

    print0(f"{len(records)} items, {steps} steps of {args.prompts_per_step} prompts x {args.num_samples}, "
           f"reward {reward_fn.spec}, loss {args.loss}, {sum(p.numel() for p in training.params) / 1e6:.2f}M "
           f"trainable parameters on {d.world_size} rank(s)")
    log = JsonlLog(os.path.join(args.out, "log.jsonl"), d, training.start_step, report_to=args.report_to,
                   config=vars(args))
    bar = progress(training.start_step, steps, d, "grpo")
    for step in bar:
        t0 = time.time()
        r, cursor, info = collect_rollouts(sampler, cursor, d)
        adv = group_advantages(r.rewards, r.group_size, args.scale_rewards, device=d.device)
        t1 = time.time()
        training.policy.train()
        sums, optimizer = update(step_targets(r, adv, training, args), training, args, d)
        t2 = time.time()
        totals["skipped_updates"] += optimizer["skipped_updates"]
        totals["bad_images"] += r.bad_images
        row = {"step": step + 1, **step_metrics(r, sums, optimizer, d, t2 - t0, args.tapo),
               "lr": training.scheduler.get_last_lr()[0], "rollout_s": t1 - t0, "update_s": t2 - t1,
               **info, **totals}
        log.write(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.3f}",
                        kl=f"{row['kl']:.4f}")
        save_if_due(training, args, d, step + 1, steps, {"cursor": cursor, "totals": totals})
    log.close()
    print0(f"done: {args.out}/final")
    cleanup()


if __name__ == "__main__":
    main()
