"""mine_topk.py — DiVE-k's first stage: mine each training image's top-k confusions and make MCQs of them.

For every training image (docs/methods.md §3):
  1. sample N answers (default 20, temperature 1.0, top-p 0.95) to the open-ended question that lists the
     class names (`--class_list base`); the image is prefilled once for its N samples;
  2. keep the answers whose <answer> names a class exactly (reward.ClassMatcher: normalised name or alias)
     and count them; answers that name no class are counted as invalid;
  3. build the MCQ from the counts (`build_mcq`, the rules of docs/methods.md §3.2) and write it as a record:
     the original fields + `options`, `answer` (ground-truth letter), `counts` {name: count, most
     frequent first}, `mined_valid`, `mined_total`;
  4. beside the output write `confusions.json`: per class, the classes its images were mistaken for,
     most often first (grpo.py's TAPO mode takes its negatives from it), and `mcq.summary.json` (the
     output's name + .summary.json): the summary that is also printed, with every skipped image.

    python mine_topk.py --model out/sft/final --data data/toy/train.jsonl --classes data/toy/classes.json \
        --out out/mine/mcq.jsonl --num_samples 20 --k 5 --temperature 1.0 --top_p 0.95 --seed 0
    torchrun --standalone --nproc_per_node=8 mine_topk.py --model out/sft/final ...   (same flags)

`--candidates` runs the candidate step of DiVE-k's two-step inference instead (section 3.4): options
are the model's own top-k (no ground-truth insertion, no random padding, trivial images kept; images
with fewer than 2 valid candidates are skipped as too_few_options); `answer` is written only when the
ground truth is among the options. evaluate.py's two_step mode calls the same `sample_candidates` and `build_mcq`.

Valid answers are the classes listed in the prompt, or the base classes when the prompt lists none
(`--class_list none`): training on base-to-novel data must never turn a novel name into an option.

Determinism. Each rank takes every world_size-th image and forms batches of `--prompts_per_call`
consecutive ones; a batch's sampler generator is seeded from (seed, index of its first image), and an
MCQ's shuffle from (seed, image index). With `--prompts_per_call 1` every image has its own generator, so
the output is byte-for-byte the same for any number of ranks and across resumes. Larger batches are
faster but change which rows share a generator (and the padding) when the world size changes, so
outputs then agree in distribution only.

Resume. Each rank appends its finished images to its own shard (common.ResumableShards) after every
batch; rerunning the same command skips finished images. The flags that shape the MCQs are saved beside
the shards (OUT.flags.json) and a rerun must repeat them, paths as the files they name: every flag but
--out, --device and --skip_bad (RESUME_NEUTRAL); another is refused by name before the model loads.
Images that fail to load (missing, corrupt, over PIL's decompression-bomb limit) are skipped and counted,
never fatal.
"""

import argparse
import json
import os
import time
from collections import Counter


import vlm
from common import (ResumableShards, add_image_args, add_runtime_args, add_sampling_args, cleanup, generator_of,
                    init_distributed, nonnegative_int, option_count, print0, rng_of, run_flags, shard,
                    warn_large_images)
from data.prompts import open_question
from data.records import ImageError, listed_classes, load_classes, load_image, read_records, write_records
from engine import DECODE_KINDS, sample_completions
from reward import LETTERS, ClassMatcher, extract_answer

# ----------------------------------------------------------------------------------------------------
# counting answers and building the MCQ: pure functions, shared with evaluate.py and grpo.py


class AnswerCounts(Counter):
    """A Counter of the valid class names answered, in order of first occurrence, plus `invalid`: the
    answers that named no class (no <answer>, an unknown or ambiguous name, a hedge)."""
    invalid = 0

    @property
    def total(self):
        return sum(self.values()) + self.invalid


def count_answers(texts, matcher):
    """Count the canonical class names that the completions' <answer>s name (via reward.ClassMatcher)."""
    counts = AnswerCounts()
    for text in texts:
        name = matcher(extract_answer(text))
        if name is None:
            counts.invalid += 1
        else:
            counts[name] += 1
    return counts


def build_mcq(counts, ground_truth, *, k=5, all_classes=(), rng, skip_trivial=True, insert_gt=True,
              n_random=2):
    """DiVE-k's MCQ from the counts of one image (docs/methods.md §3.2). Returns (options, letter) or (None, reason).

    1. Rank the valid names by count; ties keep the order of first occurrence (Counter.most_common),
       so the same samples always give the same MCQ. Options = the k most frequent.
    2. If the only valid name is the ground truth there is nothing to discriminate: with `skip_trivial`
       return (None, "only_ground_truth").
    3. If at most one valid name was found, add `n_random` (2) other names drawn with `rng` from
       `all_classes` (never the ground truth), as long as the MCQ stays within k options.
    4. With `insert_gt`, a missing ground truth is appended (fewer than k options) or replaces the least
       frequent option.
    5. Fewer than 2 options -> (None, "too_few_options"). Else shuffle with `rng` and letter A, B, ...;
       `letter` is the ground truth's, or None when it is not among the options (insert_gt=False).
    """
    ranked = [name for name, c in Counter(counts).most_common() if c > 0]
    if skip_trivial and ground_truth is not None and ranked == [ground_truth]:
        return None, "only_ground_truth"
    options = ranked[:k]
    gt_to_add = insert_gt and ground_truth is not None and ground_truth not in options
    if len(ranked) <= 1 and n_random:
        pool = [c for c in all_classes if c not in options and c != ground_truth]
        room = k - len(options) - int(gt_to_add)
        options += rng.sample(pool, max(0, min(n_random, len(pool), room)))
    if gt_to_add:
        if len(options) < k:
            options.append(ground_truth)
        else:
            options[-1] = ground_truth
    if len(options) < 2:
        return None, "too_few_options"
    rng.shuffle(options)
    return options, (LETTERS[options.index(ground_truth)] if ground_truth in options else None)


def confusion_table(rows):
    """{class: [[other class, times answered], ...]}, most confused first (ties by name), from rows with
    "label" and "counts"; every class with at least one mined image appears (possibly with [])."""
    mixed = {}
    for row in rows:
        if row.get("counts") is None:
            continue
        confused = mixed.setdefault(row["label"], Counter())
        for name, c in row["counts"].items():
            if name != row["label"]:
                confused[name] += c
    return {label: [[name, c] for name, c in sorted(m.items(), key=lambda kv: (-kv[1], kv[0]))]
            for label, m in sorted(mixed.items())}


def mcq_rng(seed, index):
    """The MCQ shuffle of an image depends only on (seed, its index): never on batching or ranks."""
    return rng_of("mcq", seed, index)


# ----------------------------------------------------------------------------------------------------
# class lists (a mixed-domain table keeps one table per dataset under "parts")

def _name(entry):
    return entry if isinstance(entry, str) else entry["name"]


def _per_record(x):
    """A list (the same for every record) or a function record -> list, as a function."""
    return x if callable(x) else (lambda record: x)


# ----------------------------------------------------------------------------------------------------
# the candidate step: N samples per image, counted

def candidate_batches(model, processor, records, indices, class_names, valid=None, *, n, temperature=1.0,
                      top_p=1.0, max_new_tokens=256, seed=0, prompts_per_call=1, device="cpu",
                      decode="eager"):
    """Yield, for each batch of `prompts_per_call` consecutive `indices`, [(index, counts, texts, error)].

    `class_names`: the names listed in each prompt (a list, or a function record -> list; entries are names
    or class dicts; empty -> no list). `valid`: the classes counted as valid answers (default: the listed
    ones). An image that fails to load gives (index, None, None, reason); the rest of its batch goes on.
    """
    listed, valid = _per_record(class_names), _per_record(valid if valid is not None else class_names)
    matchers = {}  # one ClassMatcher per distinct class list
    for s in range(0, len(indices), prompts_per_call):
        batch_idx = list(indices[s:s + prompts_per_call])
        results, ok, images = {}, [], []
        for i in batch_idx:
            try:
                images.append(load_image(records[i]["image"], processor.pixel_bounds[1]))
                ok.append(i)
            except ImageError as e:
                results[i] = (None, None, f"image: {e}")
        if ok:
            questions = [open_question(records[i].get("dataset", ""), [_name(c) for c in listed(records[i])] or None)
                         for i in ok]
            batch = processor.encode(images, questions).to(device)
            # seeded by the batch's first image (not by rank or step), so a rerun samples the same answers
            generator = generator_of("mine", seed, batch_idx[0], device=device)
            roll = sample_completions(model, batch, group_size=n, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, generator=generator,
                                          cache_kind=DECODE_KINDS[decode], **processor.sampling_tokens)
            texts = processor.decode(roll.completion_ids, roll.completion_mask)
            for j, i in enumerate(ok):  # prompt-major rows: image j's samples are rows j*n .. j*n+n-1
                classes = valid(records[i])
                key = tuple(_name(c) for c in classes)
                if key not in matchers:
                    matchers[key] = ClassMatcher(classes)
                mine = texts[j * n:(j + 1) * n]
                results[i] = (count_answers(mine, matchers[key]), mine, None)
        yield [(i, *results[i]) for i in batch_idx]


def sample_candidates(model, processor, records, class_names, *, n, temperature, top_p, max_new_tokens, seed,
                      prompts_per_call, device, valid=None, indices=None, decode="eager"):
    """AnswerCounts per record (None where the image failed to load): the candidate step of mining and of
    two-step inference. `indices` are the records' global item indices (seeding); default 0..len-1."""
    indices = list(range(len(records))) if indices is None else list(indices)
    by_index = dict(zip(indices, records))
    out = {}
    for batch in candidate_batches(model, processor, by_index, indices, class_names, valid, n=n,
                                   temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                   seed=seed, prompts_per_call=prompts_per_call, device=device,
                                   decode=decode):
        out.update({i: counts for i, counts, _, _ in batch})
    return [out[i] for i in indices]


# ----------------------------------------------------------------------------------------------------
# one output row per image, and the summary

def mined_row(record, index, counts, texts, error, args, table):
    """The MCQ record of one image, or a row with "skipped": reason. Rows carry "key" (the item index)."""
    base = {k: v for k, v in record.items() if not k.startswith("_")}
    if error is not None:
        return {"key": index, "image": record["image"], "label": record["label"], "skipped": error}
    which = args.class_list if args.class_list != "none" else "base"
    pool = [c["name"] for c in listed_classes(table, record.get("dataset"), which)]
    # labels are canonical class names (read_records checked them), the same strings the matcher returns
    options, letter = build_mcq(counts, record["label"], k=args.k, all_classes=pool,
                                rng=mcq_rng(args.seed, index), skip_trivial=not args.candidates and args.skip_trivial,
                                insert_gt=not args.candidates, n_random=0 if args.candidates else 2)
    mined = {"counts": dict(counts.most_common()), "mined_valid": sum(counts.values()), "mined_total": counts.total}
    if args.keep_texts:
        mined["mined_texts"] = texts
    if options is None:
        return {"key": index, "image": record["image"], "label": record["label"], "skipped": letter, **mined}
    base.pop("answer", None)
    row = {"key": index, **base, "options": options, **({"answer": letter} if letter else {}), **mined}
    return row


def summarize_mining(rows, k):
    """Counts and rates over the merged rows (all ranks)."""
    mined = [r for r in rows if r.get("counts") is not None]
    skipped = [r for r in rows if "skipped" in r]
    reasons = Counter(r["skipped"].split(":")[0] for r in skipped)
    in_topk = [r["label"] in [name for name, _ in Counter(r["counts"]).most_common(k)] for r in mined]
    return {
        "images": len(rows), "mined": len(mined), "mcqs": len(rows) - len(skipped), "skipped": len(skipped),
        "skip_reasons": dict(sorted(reasons.items())),
        "gt_in_topk": sum(in_topk) / len(mined) if mined else 0.0,
        "mean_valid_options": sum(min(k, len(r["counts"])) for r in mined) / len(mined) if mined else 0.0,
        "valid_answer_rate": (sum(r["mined_valid"] for r in mined) / max(1, sum(r["mined_total"] for r in mined))),
        "skipped_items": [{"key": r["key"], "image": r["image"], "label": r["label"], "reason": r["skipped"]}
                          for r in skipped],
    }


def print_summary(s, k):
    print0(f"images {s['images']}  mined {s['mined']}  MCQs written {s['mcqs']}  skipped {s['skipped']} "
           f"{s['skip_reasons']}")
    print0(f"ground truth among the top-{k}: {100 * s['gt_in_topk']:.1f}%   mean distinct valid options: "
           f"{s['mean_valid_options']:.2f}   valid answers: {100 * s['valid_answer_rate']:.1f}%")
    for item in s["skipped_items"][:20]:
        print0(f"  skipped #{item['key']} {item['image']} ({item['label']}): {item['reason']}")
    if len(s["skipped_items"]) > 20:
        print0(f"  ... and {len(s['skipped_items']) - 20} more (all listed in the summary file)")


# ----------------------------------------------------------------------------------------------------

# the flags that cannot change a row: a resumed run may change them (every other flag must be as it was;
# --prompts_per_call too, as it decides which images share a generator)
RESUME_NEUTRAL = {"out", "device", "skip_bad"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", required=True, help="checkpoint folder or Hub id to sample from")
    a("--data", required=True, help="records JSONL (e.g. data/toy/train.jsonl)")
    a("--classes", required=True, help="classes.json of the dataset (class list, aliases, base)")
    a("--out", required=True, help="output MCQ records JSONL; confusions.json goes beside it")
    a("--k", type=option_count, default=5, help="options per MCQ (the k most frequent valid answers), 2 to 26")
    a("--class_list", default="base", choices=["base", "novel", "all", "none"],
      help="class names listed in the prompt (and counted as valid; none: base are valid)")
    a("--no_skip_trivial", dest="skip_trivial", action="store_false",
      help="keep images whose only valid answer is the ground truth (DiVE-k skips them)")
    a("--candidates", action="store_true",
      help="two-step inference candidate step: the model's own top-k, no ground truth added")
    a("--keep_texts", action="store_true", help="also store the N raw completions per record")
    a("--limit", type=nonnegative_int, default=0, help="only the first N records (0 = all)")
    a("--skip_bad", action="store_true", help="drop bad records (and say how many) instead of stopping")
    add_sampling_args(ap, num_samples=20, prompts_per_call=4, max_new_tokens=512, top_p=0.95)
    add_image_args(ap)
    add_runtime_args(ap)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for flag, path in (("--data", args.data), ("--classes", args.classes)):
        if os.path.realpath(args.out) == os.path.realpath(path):
            raise SystemExit(f"--out {args.out} is {flag}: the MCQs written there would replace it; give another --out")
    d = init_distributed(args.device)
    table = load_classes(args.classes)
    records = read_records(args.data, skip_bad=args.skip_bad, classes=table)
    records = records[:args.limit] if args.limit else records
    shards = ResumableShards(args.out, d, run_flags(args, RESUME_NEUTRAL))  # other flags: refused at once
    processor = vlm.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    warn_large_images(records, processor)
    model = vlm.load_model(args.model, d.device, args.dtype)

    pending = [i for i in shard(list(range(len(records))), d) if i not in shards.done]
    print0(f"{len(records)} images, {len(shards.done)} already done, {len(pending)} to mine on rank 0 "
           f"({d.world_size} rank(s)), {args.num_samples} samples each")
    listed = lambda r: listed_classes(table, r.get("dataset"), args.class_list)
    valid = lambda r: listed_classes(table, r.get("dataset"), args.class_list if args.class_list != "none" else "base")
    t0, done = time.time(), 0
    for batch in candidate_batches(model, processor, records, pending, listed, valid, n=args.num_samples,
                                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                   seed=args.seed, prompts_per_call=args.prompts_per_call, device=d.device,
                                   decode=args.decode):
        shards.append([mined_row(records[i], i, counts, texts, err, args, table) for i, counts, texts, err in batch])
        done += len(batch)
        if done == len(pending) or done % max(1, len(pending) // 10) < len(batch):
            print0(f"rank 0: {done}/{len(pending)} images, {done / (time.time() - t0):.2f} images/s")

    rows = shards.merge()  # all ranks wait here; rank 0 writes the key-ordered rows to args.out
    if d.is_main:
        mcqs = [{k: v for k, v in r.items() if k != "key"} for r in rows if "skipped" not in r]
        write_records(args.out, mcqs)  # the final file: MCQ records only, portable image paths
        folder = os.path.dirname(os.path.abspath(args.out))
        with open(os.path.join(folder, "confusions.json"), "w", encoding="utf-8") as f:  # a class per line
            dump = lambda x: json.dumps(x, ensure_ascii=False)
            f.write("{\n" + ",\n".join(f" {dump(label)}: {dump(others)}"
                                        for label, others in confusion_table(rows).items()) + "\n}\n")
        summary = summarize_mining(rows, args.k)
        with open(os.path.splitext(args.out)[0] + ".summary.json", "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), **summary}, f, ensure_ascii=False, indent=1)
        print_summary(summary, args.k)
        print0(f"wrote {args.out} ({len(mcqs)} MCQs) and {os.path.join(folder, 'confusions.json')}")
    cleanup()


if __name__ == "__main__":
    main()
