"""rollouts.py — what a GRPO step trains on: the items it draws and the completions sampled for them.

- `Items`: the training records as one endless stream of seeded epochs (`--class_balanced`: each class
  spread evenly over an epoch);
- `StepSampler.rollout`: G completions per item from engine.sample_completions (each prompt prefilled
  once), their rewards (reward.py) and the sampler's own log-probs; TAPO (Fine-R1): half of each group on
  the anchor image, half on a positive of the same class, and every completion's log-probs under a
  look-alike negative image;
- `collect_rollouts`: a step's groups on this rank; DAPO's dynamic sampling drops the groups whose rewards
  are all equal and draws more.
grpo.py turns them into advantages and updates.
"""

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import reward as rewards_lib
import trainer
from common import (all_reduce_sum, class_balanced_permutation, epoch_permutation, generator_of, rng_of,
                    seed_of)
from data.records import ImageError, load_image
from engine import DECODE_KINDS, sample_completions
from vlm import PromptBatch


# ----------------------------------------------------------------------------------------------------
# the items: an endless stream of records

class Items:
    """The training items as one endless stream: epoch e is a seeded permutation of the records; with
    `class_balanced`, one in which each class is spread evenly (`class_balanced_permutation`), so that a
    step's prompts are of as many classes as they can be and its reward varies less with which were drawn."""

    def __init__(self, records, seed, class_balanced=False):
        self.records, self.seed, self.epoch, self.order = records, seed, None, None
        self.class_balanced = class_balanced
        self.by_class = defaultdict(list)
        for r in records:
            self.by_class[r["label"]].append(r)

    def __getitem__(self, i):
        epoch, j = divmod(i, len(self.records))
        if epoch != self.epoch:
            self.epoch, self.order = epoch, (
                class_balanced_permutation([r["label"] for r in self.records], self.seed, epoch)
                if self.class_balanced else epoch_permutation(len(self.records), self.seed, epoch))
        return self.records[self.order[j]]


def tapo_images(record, items, confusions, rng):
    """TAPO. (positive, negative) image paths: the record's own fields (triplets.jsonl), else another image
    of the class (the anchor itself only when the class has no other) and an image of its most-confused
    class (mine_topk's table), else of a random other class."""
    others = [r["image"] for r in items.by_class[record["label"]] if r["image"] != record["image"]]
    positive = record.get("positive") or (rng.choice(others) if others else record["image"])
    negative = record.get("negative")
    if not negative:
        others = sorted(c for c in items.by_class if c != record["label"])
        confused = [c for c, _ in confusions.get(record["label"], []) if c in others]
        other = confused[0] if confused else rng.choice(others)
        negative = rng.choice(items.by_class[other])["image"]
    return positive, negative


def load_item(record, index, items, args, confusions):
    """(record, prompt images, negative image or None, unreadable images met) for stream item `index`.
    The prompt images are [anchor], or with TAPO [anchor, positive] (resized to the anchor's size) and a
    negative. An item with an unreadable image is counted and replaced by another drawn from the stream,
    so every rank keeps the same number of rows."""
    rng = rng_of("item", args.seed, index)  # per item: the same on any number of ranks
    bad = 0
    while True:
        try:
            anchor = load_image(record["image"])
            if not args.tapo:
                return record, [anchor], None, bad
            pos, neg = tapo_images(record, items, confusions, rng)
            pos, neg = load_image(pos), load_image(neg)
            fit = lambda image: image if image.size == anchor.size else image.resize(anchor.size)
            return record, [anchor, fit(pos)], fit(neg), bad
        except ImageError as e:
            print(f"warning: {record.get('_src', '')}: {e}", flush=True)
            bad += 1
            record = items[rng.randrange(10 ** 9)]


# ----------------------------------------------------------------------------------------------------
# one step's rollouts


# ----------------------------------------------------------------------------------------------------
# one step's rollouts

@dataclass
class Rollouts:
    """One step's samples on one rank. Completions come in groups of `group_size` consecutive rows, one
    group per prompt item; row i was sampled from (and is scored under) prompt row `prompt_rows[i]`."""
    prompts: PromptBatch     # the prompt rows (TAPO: each item's anchor and positive)
    prompt_rows: list            # (N,) the prompt row of each completion
    ids: torch.Tensor            # (N, L) completion tokens, right-padded
    mask: torch.Tensor           # (N, L) 1 up to and including the EOS
    rewards: torch.Tensor        # (N,)
    lengths: torch.Tensor        # (N,) completion tokens
    details: list                # (N,) reward.py's per-completion details (answer, correct, format, ...)
    group_size: int
    neg_logp: torch.Tensor | None = None  # TAPO: (N, L) log-probs of each completion under the negative image
    bad_images: int = 0
    # (N, L) each token's log-prob under the sampler (engine.py), against which the trainer's are compared;
    # NaN on a row scored under another prompt than it was sampled from (TAPO anchor-only)
    sampler_logp: torch.Tensor | None = None

    def __len__(self):
        return len(self.prompt_rows)

    @property
    def n_groups(self):
        return len(self) // self.group_size

    def rows_of(self, groups):
        return [g * self.group_size + j for g in groups for j in range(self.group_size)]

    def varied_groups(self):
        """For each group: do its rewards differ? (A group of equal rewards has advantage 0: no signal.)"""
        r = self.rewards.view(-1, self.group_size)
        return (r.max(1).values - r.min(1).values > 1e-6).tolist()

    def select(self, groups):
        """The given groups (indices), in that order; the prompt rows are kept as they are."""
        rows = self.rows_of(groups)
        pick = lambda t: None if t is None else t[rows]
        return Rollouts(self.prompts, [self.prompt_rows[i] for i in rows], self.ids[rows], self.mask[rows],
                        self.rewards[rows], self.lengths[rows], [self.details[i] for i in rows],
                        self.group_size, pick(self.neg_logp), self.bad_images, pick(self.sampler_logp))

    @staticmethod
    def cat(parts):
        """One Rollouts of all parts' groups, in order (dynamic sampling's draws)."""
        if len(parts) == 1:
            return parts[0]
        L = max(p.ids.shape[1] for p in parts)
        pad = lambda t: F.pad(t, (0, L - t.shape[1]))
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + len(p.prompts))
        negs, sampled = [p.neg_logp for p in parts], [p.sampler_logp for p in parts]
        return Rollouts(PromptBatch.cat([p.prompts for p in parts]),
                        [o + r for o, p in zip(offsets, parts) for r in p.prompt_rows],
                        torch.cat([pad(p.ids) for p in parts]), torch.cat([pad(p.mask) for p in parts]),
                        torch.cat([p.rewards for p in parts]), torch.cat([p.lengths for p in parts]),
                        [x for p in parts for x in p.details], parts[0].group_size,
                        None if negs[0] is None else torch.cat([pad(n) for n in negs]),
                        sum(p.bad_images for p in parts),
                        None if sampled[0] is None else torch.cat([pad(x) for x in sampled]))


@dataclass
class StepSampler:
    """What a step's rollouts are drawn with, besides the items themselves: the policy, the question, the
    reward and its shaping, TAPO's confusions, and the flags that shape sampling (grpo.py's)."""
    items: Items
    training: trainer.Training
    ask: Callable            # record -> the question asked about its image
    reward_fn: Callable      # reward.py's reward: (texts, records, item indices) -> (rewards, details)
    shaping: Callable        # completion lengths -> a term added to each reward (DAPO's overlong penalty)
    confusions: dict         # label -> its most-confused classes (mine_topk.py's confusions.json: TAPO)
    args: argparse.Namespace
    device: torch.device

    def rollout(self, records, first_index):
        """Sample G completions for each of `records` (stream items first_index, first_index + 1, ...) and
        score their rewards. TAPO: G/2 on the anchor and G/2 on the positive image, one group of G."""
        args, training, device = self.args, self.training, self.device
        G = args.num_samples
        loaded = [load_item(r, first_index + k, self.items, args, self.confusions)
                  for k, r in enumerate(records)]
        records = [rec for rec, *_ in loaded]
        images = [im for _, ims, _, _ in loaded for im in ims]
        per_item = len(images) // len(records)           # prompt rows per item: 1, or 2 with TAPO
        per_row = G // per_item                          # samples per prompt row
        questions = [self.ask(rec) for rec in records for _ in range(per_item)]
        prompts = training.processor.encode(images, questions).to(device)
        parts = []
        with trainer.generation_mode(training.policy), trainer.autocast(device, training.bf16):
            step = args.prompts_per_call * per_item
            for s in range(0, len(images), step):
                rows = list(range(s, min(s + step, len(images))))
                # eager: seeded by the call's first item in the stream, so with --prompts_per_call 1 an
                # item's samples do not depend on how items are spread over ranks; static and compiled:
                # each prompt row by its own item, so they never depend on the batching
                gen = generator_of("rollout", args.seed, first_index + s // per_item, device=device)
                seeds = None if args.decode == "eager" else [
                    seed_of("rollout", args.seed, first_index + j // per_item, j % per_item) for j in rows]
                parts.append(sample_completions(
                    training.policy, prompts.select(rows), group_size=per_row,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, generator=gen, seeds=seeds, cache_kind=DECODE_KINDS[args.decode],
                    **training.processor.sampling_tokens))
        L = max(p.completion_ids.shape[1] for p in parts)
        pad = lambda t, v: F.pad(t, (0, L - t.shape[1]), value=v)
        ids = torch.cat([pad(p.completion_ids, training.processor.pad_token_id) for p in parts])
        mask = torch.cat([pad(p.completion_mask, 0) for p in parts])
        sampler_logp = torch.cat([pad(p.logprobs, 0.0) for p in parts])
        prompt_rows = [i // per_row for i in range(len(ids))]
        if args.tapo and args.tapo_anchor_only:  # the positive's samples scored under the anchor (the paper)
            prompt_rows = [per_item * (i // G) for i in range(len(ids))]
            sampler_logp[[i for i in range(len(ids)) if prompt_rows[i] != i // per_row]] = float("nan")
        texts = training.processor.decode(ids, mask)
        rewards, details = self.reward_fn(texts, [rec for rec in records for _ in range(G)],
                                          [k for k in range(len(records)) for _ in range(G)])
        lengths = mask.sum(1).cpu()
        rewards = torch.tensor(rewards, dtype=torch.float32) + self.shaping(lengths)
        r = Rollouts(prompts, prompt_rows, ids, mask, rewards, lengths, details, G,
                     bad_images=sum(b for *_, b in loaded), sampler_logp=sampler_logp)
        if args.tapo:
            r.neg_logp = self.negative_logprobs(r, [neg for _, _, neg, _ in loaded], questions[::per_item])
        return r

    def negative_logprobs(self, r, negatives, questions):
        """TAPO. Each completion's log-probs under its item's negative (look-alike) image, no gradient."""
        neg_prompts = self.training.processor.encode(negatives, questions).to(r.ids.device)
        return score_rollouts(self.training.policy, r, self.args, self.training.bf16, neg_prompts,
                              [i // r.group_size for i in range(len(r))])


def score_rollouts(policy, r, args, bf16, prompts=None, prompt_rows=None):
    """The completions' log-probs under `policy`, without gradient: each under its own prompt row, or under
    `prompts` / `prompt_rows` when given (TAPO's negative images)."""
    return trainer.score_completions(policy, r.prompts if prompts is None else prompts,
                                     r.prompt_rows if prompt_rows is None else prompt_rows, r.ids, r.mask,
                                     micro_batch_size=args.micro_batch_size, temperature=args.temperature,
                                     shared_prefix=args.prefix_forward == "shared", bf16=bf16)


def collect_rollouts(sampler, cursor, d):
    """This rank's groups for one step, the new global cursor (the stream position) and the draws' info.

    Dynamic sampling (DAPO): groups whose rewards are all equal are dropped and more items drawn (all ranks
    draw together) until every rank has its share or --max_resample extra draws were made; then dropped
    groups fill the gap (advantage 0). An extra draw is as many items per rank as the rank shortest of
    groups needs at the rate kept so far (at most a full share): a step that misses one group of 16 draws
    two more, not 16.

    The info's reward_drawn / accuracy_drawn: the means over every completion drawn this step, on every rank.
    The kept groups' reward (the step's reward_mean) is biased toward half right by the filter, and stays
    there however much the policy learns; the drawn reward is what the policy scores on fresh prompts."""
    args, items = sampler.args, sampler.items
    P = args.prompts_per_step
    per_rank = P // d.world_size
    kept, dropped, n_kept, draws, drawn = [], [], 0, 0, [0.0, 0.0, 0.0]
    n, groups_drawn = per_rank, 0  # items per rank in this draw; groups drawn so far on every rank
    while True:
        start = cursor + d.rank * n
        r = sampler.rollout([items[start + i] for i in range(n)], start)
        cursor, draws, groups_drawn = cursor + n * d.world_size, draws + 1, groups_drawn + n * d.world_size
        accuracy = rewards_lib.summarize(r.details)["accuracy"]
        completions = len(r.rewards)
        drawn = [drawn[0] + float(r.rewards.sum()), drawn[1] + accuracy * completions, drawn[2] + completions]
        if not args.dynamic_sampling:
            return r, cursor, {"draws": 1, "filled_groups": 0, **drawn_means(drawn, d)}
        varied = r.varied_groups()
        kept.append(r.select([g for g, v in enumerate(varied) if v]))
        dropped.append(r.select([g for g, v in enumerate(varied) if not v]))
        n_kept += sum(varied)
        shortfalls = [0.0] * d.world_size
        shortfalls[d.rank] = max(per_rank - n_kept, 0)
        # every rank draws together
        kept_so_far, *shortfalls = all_reduce_sum([n_kept] + shortfalls, d.device)
        if max(shortfalls) == 0 or draws > args.max_resample:
            break
        rate = max(kept_so_far / groups_drawn, 1 / per_rank)
        n = min(per_rank, math.ceil(max(shortfalls) / rate - 1e-9))
    joined = Rollouts.cat([p for p in kept + dropped if len(p)])
    info = {"draws": draws, "filled_groups": max(per_rank - n_kept, 0), **drawn_means(drawn, d)}
    return joined.select(range(per_rank)), cursor, info


def drawn_means(sums, d):
    """[reward sum, accuracy sum, completions] of this rank's draws -> the means over every rank."""
    reward, accuracy, n = all_reduce_sum(sums, d.device)
    return {"reward_drawn": reward / max(n, 1), "accuracy_drawn": accuracy / max(n, 1)}
