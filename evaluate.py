"""evaluate.py — score a model on prepared records: predictions as JSONL, metrics as JSON, a table.

Modes (`--mode`, several allowed in one run so the model is loaded once):
  open        open-ended question, optionally listing class names (`--class_list`); accuracy = normalised
              exact match with the label or an alias (reward.is_correct); text inclusion (label substring
              of the answer) is reported beside it for comparison with published tables only.
  open_world  SpeciaRL's prompt (no list, "None" abstains); each answer gets a specificity category from
              reward.TaxonomyVerifier built from classes.json, or from an LLM judge (`--verifier_model`,
              verdicts cached in SQLite). Correctness = share of items neither wrong nor abstaining (no
              answer counts as not correct); Specificity = share of the correct ones that are specific
              or more specific; spec_hm = their harmonic mean (docs/methods.md §6).
  mcq         closed-world: records carry `options` and `answer` (toy test_mcq.jsonl, or mine_topk.py).
  two_step    DiVE-k's two-step inference: sample N answers with the split's class list (mine_topk's
              candidate step), take the top-k valid names by frequency as options (no ground-truth
              insertion), ask the MCQ greedily; the chosen option is the prediction, judged by is_correct.
              An image with a single valid candidate takes it as the prediction without an MCQ
              (`fallback: "single"`); one with none has no prediction and counts as wrong ("none"), as
              does an MCQ answer that names no single option. Also `sampled`: the share of the N samples
              that name the label (the accuracy of sampling at --temperature and --top_p: what GRPO rewards).

Decoding is greedy, batched through engine.sample_completions. Base/novel membership comes from the class
table's `base` flag of each record's label. Per dataset (record `dataset` field): acc, and when the
dataset has novel classes base_acc, novel_acc and hm = 2BN/(B+N) (0 when B+N = 0; null when a side has
no items). Few-shot tables (all classes base) report plain acc. The mean over datasets averages each
rate; its hm is the HM of the mean base and mean novel accuracies (CoCoOp's convention), likewise
hm_inclusion and spec_hm. Images that fail to load are recorded as skipped, counted in `skipped`, and
left out of every rate (as are those over PIL's decompression-bomb limit, named up front).

    python evaluate.py --model out/grpo/final --data data/toy/test_base.jsonl data/toy/test_novel.jsonl \
        --classes data/toy/classes.json --mode open mcq --out out/eval/grpo
    torchrun --standalone --nproc_per_node=8 evaluate.py --model out/grpo/final ...   (same flags)
    python evaluate.py --compare out/eval/sft out/eval/grpo          # one table from prediction files
    python evaluate.py --summary out/eval/sft out/eval/grpo --names SFT GRPO  # a row per folder
    python evaluate.py --plot out/grpo/log.jsonl --plot_out curves.png  # needs matplotlib (optional)

Outputs in --out, per mode: predictions_<mode>.jsonl, one row per record in --data order: key (index in
its file), file, mode, model (a folder's real path, or the Hub id), image, label, dataset, base,
completion, answer (parsed), prediction, correct, inclusion, format, [category], [options, choice,
target], [candidates, fallback, sampled], or `skipped`.
metrics_<mode>.json:
    {"mode": "open", "per_dataset": {"cub": {"n", "skipped", "acc", "inclusion", "format",
        "base_n", "novel_n", "base_acc", "novel_acc", "hm", "base_inclusion", "novel_inclusion",
        "hm_inclusion", [open_world: "correctness", "specificity", "spec_hm", "unjudged", "cat_<c>"],
        [two_step: "sampled"]}},
     "mean": {same keys, + "datasets"}}
with every rate a fraction in [0, 1] (the table prints percentages).

Resume: each (data file, mode) pass keeps per-rank shards keyed by record index in OUT/parts/
(common.ResumableShards); rerunning the same command skips finished images. The flags that shape a row are
saved beside them and a rerun must repeat them (paths as the files they name): every flag but --out,
--device, --skip_bad, --verifier_cache, --report_to and, as a pass's data file and mode name its parts,
--data, --mcq_data and --mode (RESUME_NEUTRAL). Another is refused by name before the model loads.
Data-parallel results are merged in key order; with `--prompts_per_call 1` they are byte-for-byte those of
one process (larger batches pad rows differently).
"""

import argparse
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

import vlm
from common import (ResumableShards, Tracker, add_image_args, add_report_args, add_runtime_args,
                    add_sampling_args, as_file, barrier, cleanup, init_distributed, nonnegative_int,
                    option_count, print0, run_flags, shard, warn_large_images, write_jsonl)
from data.prompts import mcq_question, open_question, open_world_question
from data.records import (ImageError, NameTable, classes_of, listed_classes, load_classes, load_image,
                          read_records, require_fields)
from engine import DECODE_KINDS, sample_completions, text_generator
from mine_topk import build_mcq, mcq_rng, sample_candidates
from metrics import ClassIndex, compare, compute_metrics, format_table, plot_curves, summary
from reward import (LETTERS, LLMVerifier, TaxonomyVerifier, extract_answer, format_ok, is_correct, mcq_choice,
                    mcq_correct, specificity_categories, text_inclusion)

MODES = ("open", "open_world", "mcq", "two_step")
# ----------------------------------------------------------------------------------------------------
# prediction


def class_list_for(mode, args, table, index):
    """record -> listed class entries. two_step always lists classes: 'none' (or no flag) means 'split',
    the base names for a base-class image and the novel names for a novel one."""
    which = args.class_list or ("split" if mode == "two_step" else "none")
    if mode == "two_step" and which == "none":
        which = "split"
    if which == "split":
        return lambda r: listed_classes(table, r.get("dataset"), "base" if index.is_base(r) else "novel")
    return lambda r: listed_classes(table, r.get("dataset"), which)


def judge(rows, records, verifier_for):
    """Specificity category of each answered row, one verifier call per dataset in the batch."""
    by_ds = defaultdict(list)
    for row, rec in zip(rows, records):
        by_ds[rec.get("dataset", "")].append((row, rec))
    for ds, pairs in by_ds.items():
        answers, recs = [row["answer"] for row, _ in pairs], [rec for _, rec in pairs]
        cats = specificity_categories(answers, recs, verifier_for(ds))
        for (row, _), c in zip(pairs, cats):
            row["category"] = c


def fill_choice(row, text, options):
    """An MCQ answer: the chosen option's text is the prediction."""
    row.update(completion=text, answer=extract_answer(text), format=format_ok(text), options=options)
    choice = mcq_choice(row["answer"], options)
    row["choice"] = LETTERS[choice] if choice is not None else None
    row["prediction"] = options[choice] if choice is not None else None


@dataclass
class Evaluator:
    """The model and what every evaluation mode asks it with: one method per mode, each turning a batch of
    readable records (and their images) into the predictions of their rows."""
    model: torch.nn.Module
    processor: vlm.Processor
    args: argparse.Namespace
    index: ClassIndex
    listed: dict               # mode -> (record -> the class entries its question lists)
    verifier_for: Callable | None  # dataset -> specificity verifier (open_world)

    def greedy(self, images, questions):
        """The model's greedy answers to (image, question) pairs."""
        batch = self.processor.encode(images, questions).to(self.model.device)
        roll = sample_completions(self.model, batch, max_new_tokens=self.args.max_new_tokens, greedy=True,
                                  cache_kind=DECODE_KINDS[self.args.decode], **self.processor.sampling_tokens)
        return self.processor.decode(roll.completion_ids, roll.completion_mask)

    def predict(self, mode, records, idx, file):
        """Prediction rows for records[idx] in `mode`; a record whose image does not load is a skipped row."""
        rows, ok, images = [], [], []
        for i in idx:
            rec = records[i]
            row = {"key": i, "file": file, "mode": mode, "model": as_file(self.args.model),  # as compared
                   "image": rec["image"], "label": rec["label"], "dataset": rec.get("dataset", ""),
                   "base": self.index.is_base(rec)}
            try:
                images.append(load_image(rec["image"], self.processor.pixel_bounds[1]))
                ok.append((i, row))
            except ImageError as e:
                row["skipped"] = str(e)  # counted in the metrics, never fatal
            rows.append(row)
        if ok:
            keys = [i for i, _ in ok]
            getattr(self, mode)(keys, [row for _, row in ok], [records[i] for i in keys], images)
        return rows

    def open(self, keys, rows, recs, images):
        """The open question (listing the classes of --class_list): the answer is the prediction."""
        listed = self.listed["open"]
        questions = [open_question(r.get("dataset", ""), [c["name"] for c in listed(r)] or None)
                     for r in recs]
        self.fill_open(rows, recs, self.greedy(images, questions))

    def open_world(self, keys, rows, recs, images):
        """SpeciaRL's open-world question, each answer judged into a specificity category."""
        questions = [open_world_question(r.get("dataset", "")) for r in recs]
        self.fill_open(rows, recs, self.greedy(images, questions))
        judge(rows, recs, self.verifier_for)

    @staticmethod
    def fill_open(rows, recs, texts):
        for row, rec, text in zip(rows, recs, texts):
            row.update(completion=text, answer=extract_answer(text), format=format_ok(text))
            row["prediction"] = row["answer"]
            row["correct"] = is_correct(row["answer"], rec)
            row["inclusion"] = text_inclusion(row["prediction"], rec)

    def mcq(self, keys, rows, recs, images):
        """The records' own multiple-choice questions."""
        texts = self.greedy(images, [mcq_question(r.get("dataset", ""), r["options"]) for r in recs])
        for row, rec, text in zip(rows, recs, texts):
            fill_choice(row, text, rec["options"])
            row["target"] = rec["answer"]
            row["correct"] = mcq_correct(row["answer"], rec)
            row["inclusion"] = text_inclusion(row["prediction"], rec)

    def two_step(self, keys, rows, recs, images):
        """DiVE-k's two-step inference: N sampled answers -> the top-k valid names as options -> the MCQ."""
        args = self.args
        counts = sample_candidates(self.model, self.processor, recs, self.listed["two_step"],
                                   n=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   prompts_per_call=len(recs), device=self.model.device, indices=keys,
                                   decode=args.decode)
        asks = []
        for i, row, rec, image, c in zip(keys, rows, recs, images, counts):
            c = c if c is not None else Counter()  # (the image was readable a moment ago: practically never)
            options, _ = build_mcq(c, None, k=args.k, rng=mcq_rng(args.seed, i), skip_trivial=False,
                                   insert_gt=False, n_random=0)
            row.update(candidates=dict(c.most_common()), fallback=None, completion=None, answer=None,
                       format=None, options=options, choice=None,
                       sampled=sum(v for name, v in c.items() if is_correct(name, rec)) / args.num_samples)
            if options is not None:
                asks.append((row, rec, image, options))
            else:  # fewer than 2 valid candidates: nothing to choose between
                row["fallback"] = "single" if len(c) == 1 else "none"
                row["prediction"] = next(iter(c)) if len(c) == 1 else None
        if asks:
            texts = self.greedy([a[2] for a in asks],
                                [mcq_question(rec.get("dataset", ""), opts) for _, rec, _, opts in asks])
            for (row, rec, _, options), text in zip(asks, texts):
                fill_choice(row, text, options)
        for row, rec in zip(rows, recs):
            row["correct"] = is_correct(row["prediction"], rec)
            row["inclusion"] = text_inclusion(row["prediction"], rec)


def make_verifier_for(args, table, d):
    """dataset -> verifier: the taxonomy verifier of its class table, or the LLM judge falling back to it."""
    generate, cache = None, {}
    if args.verifier_model:
        vmodel = vlm.load_model(args.verifier_model, d.device, args.dtype)
        generate = text_generator(vmodel, vlm.Processor.from_pretrained(args.verifier_model))

    def verifier_for(ds):
        if ds not in cache:
            part = (table.get("parts") or {}).get(ds)
            taxonomy = TaxonomyVerifier(part or {"domain": table.get("domain"),
                                                 "classes": classes_of(table, ds)})
            path = args.verifier_cache or os.path.join(args.out, "verifier_cache.sqlite")
            cache[ds] = LLMVerifier(generate, path, fallback=taxonomy) if generate else taxonomy
        return cache[ds]
    return verifier_for


def part_path(parts, mode, path):
    """Where the (mode, data file) pass keeps its merged rows; its shards and flags go beside them."""
    tag = hashlib.sha1(as_file(path).encode()).hexdigest()[:8]  # the file itself, however the flag names it
    return os.path.join(parts, f"{mode}.{stem_of(path)}.{tag}.jsonl")


def stem_of(path):
    return os.path.splitext(os.path.basename(path))[0]


# The flags that cannot change a row, which a resumed evaluation may change; every other flag must be as it
# was, --prompts_per_call too (batching changes the padding, hence the greedy answers). --data, --mcq_data
# and --mode: each pass keeps its own parts, named by its mode and data file; --compare to --plot_keys run
# no evaluation.
RESUME_NEUTRAL = {"out", "device", "skip_bad", "verifier_cache", "report_to", "data", "mcq_data", "mode",
                  "compare", "summary", "names", "plot", "plot_out", "plot_keys"}


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", help="checkpoint folder or Hub id to evaluate")
    a("--data", nargs="+", help="records JSONL file(s), e.g. test_base.jsonl test_novel.jsonl")
    a("--mcq_data", nargs="+", default=None,
      help="the records --mode mcq reads, when they are not --data's (e.g. test_mcq.jsonl beside the open "
           "questions' test_base/test_novel: every mode in one process, the model loaded once)")
    a("--classes", help="classes.json (base flags, aliases, hierarchy)")
    a("--out", help="output folder: predictions_<mode>.jsonl, metrics_<mode>.json")
    a("--mode", nargs="+", default=["open"], choices=MODES, help="one or more evaluation modes")
    a("--class_list", default=None, choices=["none", "base", "novel", "all", "split"],
      help="class names listed in open / two_step prompts (split = the image's base or novel list); default "
           "none for open, split for two_step")
    a("--k", type=option_count, default=5, help="two_step: options (most frequent valid answers), 2 to 26")
    a("--verifier_model", default=None, help="open_world: local text model as LLM judge")
    a("--verifier_cache", default=None, help="SQLite verdict cache (default OUT/verifier_cache.sqlite)")
    a("--limit", type=nonnegative_int, default=0, help="only the first N records of each file (0 = all)")
    a("--skip_bad", action="store_true", help="drop bad records (and say how many) instead of stopping")
    # the samples of two_step
    add_sampling_args(ap, num_samples=20, prompts_per_call=8, max_new_tokens=512, top_p=0.95)
    add_image_args(ap)
    add_runtime_args(ap)  # --seed: two_step's candidate sampling and option shuffle
    add_report_args(ap)  # each mode's metrics, as keys like open/mean/hm
    a("--compare", nargs="+", metavar="PRED_OR_DIR", help="print one table from prediction files")
    a("--summary", nargs="+", metavar="DIR", help="one row per evaluation folder (metrics_*.json)")
    a("--names", nargs="+", default=None,
      help="row names for --summary (folders with the same name: seeds of one run, shown as mean ± std), "
           "line labels for --plot (logs with the same label: averaged)")
    a("--plot", nargs="+", metavar="LOG", help="plot training curves from JSONL logs")
    a("--plot_out", default="curves.png", help="PNG written by --plot")
    a("--plot_keys", nargs="+", default=None, help="log keys to plot (default: the usual ones)")
    args = ap.parse_args(argv)
    evaluating = not (args.compare or args.plot or args.summary)
    if evaluating and not all([args.model, args.data, args.classes, args.out]):
        ap.error("--model, --data, --classes and --out are required (or use --compare / --summary / --plot)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        print(compare(args.compare, load_classes(args.classes) if args.classes else None))
        return
    if args.summary:
        print(summary(args.summary, args.names))
        return
    if args.plot:
        plot_curves(args.plot, args.plot_out, args.plot_keys, args.names)
        return
    d = init_distributed(args.device)
    table = load_classes(args.classes)
    index = ClassIndex(table)
    names = NameTable()  # one table of names and aliases for every --data and --mcq_data file

    def read(paths):
        out = []
        for path in paths:
            records = read_records(path, skip_bad=args.skip_bad, classes=table, names=names)
            out.append((path, records[:args.limit] if args.limit else records))
        return out

    files = read(args.data)
    mcq_files = read(args.mcq_data) if args.mcq_data else files
    files_for = {mode: mcq_files if mode == "mcq" else files for mode in args.mode}
    for _, records in files_for.get("mcq", ()):
        require_fields(records, ("options", "answer"), "--mode mcq")
    # every pass's parts before the model loads: a rerun with other flags is refused at once
    parts, flags = os.path.join(args.out, "parts"), run_flags(args, RESUME_NEUTRAL)
    passes = {mode: [(path, records, ResumableShards(part_path(parts, mode, path), d, flags, parts))
                     for path, records in files_for[mode]] for mode in args.mode}
    processor = vlm.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    warn_large_images([r for _, records in files + (mcq_files if args.mcq_data else []) for r in records],
                      processor)
    model = vlm.load_model(args.model, d.device, args.dtype)
    listed = {m: class_list_for(m, args, table, index) for m in MODES}
    evaluator = Evaluator(model, processor, args, index, listed,
                          make_verifier_for(args, table, d) if "open_world" in args.mode else None)
    os.makedirs(args.out, exist_ok=True)
    tracker = Tracker(args.report_to if d.is_main else "none", args.out, vars(args))
    for mode, todo in passes.items():
        t0 = time.time()
        for path, records, shards in todo:
            pending = [i for i in shard(list(range(len(records))), d) if i not in shards.done]
            print0(f"[{mode}] {path}: {len(records)} images, {len(shards.done)} done, "
                       f"{len(pending)} to do on rank 0")
            for s in range(0, len(pending), args.prompts_per_call):
                batch = pending[s:s + args.prompts_per_call]
                shards.append(evaluator.predict(mode, records, batch, stem_of(path)))
        rows = [row for _, _, shards in todo for row in shards.merge()]  # merge only once every file is done
        if d.is_main:
            write_jsonl(os.path.join(args.out, f"predictions_{mode}.jsonl"), rows)
            for _, _, shards in todo:
                os.remove(shards.path)
            if not os.listdir(parts):
                os.rmdir(parts)
            metrics = compute_metrics(rows, table)
            with open(os.path.join(args.out, f"metrics_{mode}.json"), "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=1)
            tracker.log({mode: metrics})
            print(format_table([metrics], [os.path.basename(os.path.normpath(args.out))]))
            print(f"[{mode}] {len(rows)} predictions in {time.time() - t0:.1f}s -> {args.out}")
        barrier()
    tracker.close()
    cleanup()


if __name__ == "__main__":
    main()
