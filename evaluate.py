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
left out of every rate.

    python evaluate.py --model out/grpo --data data/toy/test_base.jsonl data/toy/test_novel.jsonl \
        --classes data/toy/classes.json --mode open mcq --out out/eval/grpo
    torchrun --standalone --nproc_per_node=8 evaluate.py --model out/grpo ...   (same flags)
    python evaluate.py --compare out/eval/sft out/eval/grpo          # one table from prediction files
    python evaluate.py --summary out/eval/sft out/eval/grpo --names SFT GRPO  # a row per folder
    python evaluate.py --plot out/grpo/log.jsonl --plot_out curves.png  # needs matplotlib (optional)

Outputs in --out, per mode: predictions_<mode>.jsonl, one row per record in --data order: key (index in
its file), file, mode, model, image, label, dataset, base, completion, answer (parsed), prediction,
correct, inclusion, format, [category], [options, choice, target], [candidates, fallback, sampled], or
`skipped`.
metrics_<mode>.json:
    {"mode": "open", "per_dataset": {"cub": {"n", "skipped", "acc", "inclusion", "format",
        "base_n", "novel_n", "base_acc", "novel_acc", "hm", "base_inclusion", "novel_inclusion",
        "hm_inclusion", [open_world: "correctness", "specificity", "spec_hm", "unjudged", "cat_<c>"],
        [two_step: "sampled"]}},
     "mean": {same keys, + "datasets"}}
with every rate a fraction in [0, 1] (the table prints percentages).

Resume: each (data file, mode) keeps per-rank shards keyed by record index (common.ResumableShards);
rerunning the same command skips finished images. Data-parallel results are merged in key order; with
`--prompts_per_call 1` they are byte-for-byte those of one process (larger batches pad rows differently).
"""

import argparse
import glob
import hashlib
import json
import os
import time
from collections import Counter, defaultdict


import vlm
from common import (ResumableShards, add_image_args, add_runtime_args, add_sampling_args, barrier, cleanup,
                    init_distributed, nonnegative_int, option_count, print0, read_jsonl, shard, warn_large_images,
                    write_jsonl)
from data.prompts import mcq_question, open_question, open_world_question
from data.records import ImageError, classes_of, load_classes, load_image, read_records, require_fields
from engine import sample_completions
from mine_topk import build_mcq, listed_classes, mcq_rng, sample_candidates
from reward import (CATEGORIES, LETTERS, LLMVerifier, TaxonomyVerifier, extract_answer, format_ok, is_correct,
                    mcq_choice, mcq_correct, open_world_metrics, specificity_categories, text_inclusion)

MODES = ("open", "open_world", "mcq", "two_step")
COUNT_KEYS = ("n", "skipped", "base_n", "novel_n", "unjudged")

# ----------------------------------------------------------------------------------------------------
# metrics: pure functions of the prediction rows


def harmonic_mean(a, b):
    """2ab / (a + b); 0 when a + b == 0; None when either side is missing."""
    if a is None or b is None:
        return None
    return 2 * a * b / (a + b) if a + b else 0.0


class ClassIndex:
    """A record's class entry in the class table (per dataset for a mixed-domain table)."""

    def __init__(self, table):
        self.table, self.cache = table, {}

    def entries(self, dataset):
        if dataset not in self.cache:
            self.cache[dataset] = {c["name"]: c for c in classes_of(self.table, dataset)}
        return self.cache[dataset]

    def is_base(self, record):
        entry = self.entries(record.get("dataset")).get(record["label"])
        return bool(entry.get("base", True)) if entry is not None else True

    def has_novel(self, dataset):
        return any(not c.get("base", True) for c in self.entries(dataset).values())


def _rate(flags):
    flags = [bool(f) for f in flags if f is not None]
    return sum(flags) / len(flags) if flags else None


def compute_metrics(predictions, table=None):
    """Metrics dict (schema in the module docstring) from prediction rows. Base/novel membership from
    `table` (classes.json) when given, else from the rows' `base` field."""
    index = ClassIndex(table) if table is not None else None
    is_base = (lambda r: index.is_base(r)) if index else (lambda r: r.get("base", True))
    groups = defaultdict(list)
    for row in predictions:
        groups[row.get("dataset") or ""].append(row)
    per = {}
    for ds in sorted(groups):
        rows = groups[ds]
        done = [r for r in rows if "skipped" not in r]
        m = {"n": len(done), "skipped": len(rows) - len(done), "acc": _rate(r["correct"] for r in done),
             "inclusion": _rate(r["inclusion"] for r in done), "format": _rate(r.get("format") for r in done)}
        if (index.has_novel(ds) if index else any(not is_base(r) for r in rows)):
            base, novel = [r for r in done if is_base(r)], [r for r in done if not is_base(r)]
            m["base_n"], m["novel_n"] = len(base), len(novel)
            for key, short in (("correct", "acc"), ("inclusion", "inclusion")):
                b, n = _rate(r[key] for r in base), _rate(r[key] for r in novel)
                m[f"base_{short}"], m[f"novel_{short}"] = b, n
                m["hm" if short == "acc" else "hm_inclusion"] = harmonic_mean(b, n)
        sampled = [r["sampled"] for r in done if "sampled" in r]  # two_step (rows resumed from older shards lack it)
        if sampled:
            m["sampled"] = sum(sampled) / len(sampled)
        if any("category" in r for r in done):  # open_world
            cats = [r.get("category") for r in done]
            ow = open_world_metrics(cats)
            m.update(correctness=ow["correctness"], specificity=ow["specificity"], spec_hm=ow["hm"],
                     unjudged=ow["unjudged"])
            for c in CATEGORIES + (None,):
                m[f"cat_{c or 'no_answer'}"] = sum(x == c for x in cats) / len(cats) if cats else None
        per[ds] = m
    mean = {"datasets": len(per)}
    for key in dict.fromkeys(k for m in per.values() for k in m):
        values = [m[key] for m in per.values() if m.get(key) is not None]
        mean[key] = sum(values) if key in COUNT_KEYS else (sum(values) / len(values) if values else None)
    for hm, a, b in (("hm", "base_acc", "novel_acc"), ("hm_inclusion", "base_inclusion", "novel_inclusion"),
                     ("spec_hm", "correctness", "specificity")):
        if hm in mean:
            mean[hm] = harmonic_mean(mean.get(a), mean.get(b))
    modes = sorted({r.get("mode") for r in predictions if r.get("mode")})
    return {"mode": modes[0] if len(modes) == 1 else "+".join(modes) or None, "per_dataset": per, "mean": mean}


TABLE_COLUMNS = [("n", "n"), ("skipped", "skip"), ("acc", "acc"), ("inclusion", "incl"), ("base_acc", "base"),
                 ("novel_acc", "novel"), ("hm", "HM"), ("hm_inclusion", "HM-incl"), ("correctness", "corr"),
                 ("specificity", "spec"), ("spec_hm", "spec-HM")]


def format_table(metrics_list, names):
    """One text table: a line per (run, dataset), + the mean when a run has several datasets. Rates in %."""
    lines = []
    for metrics, name in zip(metrics_list, names):
        per = metrics["per_dataset"]
        items = list(per.items()) + ([("mean", metrics["mean"])] if len(per) > 1 else [])
        lines += [(name, metrics.get("mode") or "", ds, m) for ds, m in items]
    cols = [(k, h) for k, h in TABLE_COLUMNS if any(m.get(k) is not None for *_, m in lines)]
    header = ["run", "mode", "dataset"] + [h for _, h in cols]
    body = []
    for name, mode, ds, m in lines:
        cells = []
        for k, _ in cols:
            v = m.get(k)
            cells.append("-" if v is None else str(int(v)) if k in COUNT_KEYS else f"{100 * v:.2f}")
        body.append([str(name), mode, ds] + cells)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


# ----------------------------------------------------------------------------------------------------
# prediction


def greedy(model, processor, images, questions, args, device):
    batch = processor.encode(images, questions).to(device)
    roll = sample_completions(model, batch, max_new_tokens=args.max_new_tokens, greedy=True,
                                  **processor.sampling_tokens)
    return processor.decode(roll.completion_ids, roll.completion_mask)


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
        cats = specificity_categories([row["answer"] for row, _ in pairs], [rec for _, rec in pairs], verifier_for(ds))
        for (row, _), c in zip(pairs, cats):
            row["category"] = c


def fill_choice(row, text, options):
    """An MCQ answer: the chosen option's text is the prediction."""
    row.update(completion=text, answer=extract_answer(text), format=format_ok(text), options=options)
    choice = mcq_choice(row["answer"], options)
    row["choice"] = LETTERS[choice] if choice is not None else None
    row["prediction"] = options[choice] if choice is not None else None


def predict_batch(mode, records, idx, ctx):
    """Prediction rows for records[idx] in `mode` (ctx: model, processor, args, table, index, ...)."""
    args, index, device = ctx["args"], ctx["index"], ctx["device"]
    rows, ok, images = [], [], []
    for i in idx:
        rec = records[i]
        row = {"key": i, "file": ctx["file"], "mode": mode, "model": args.model, "image": rec["image"],
               "label": rec["label"], "dataset": rec.get("dataset", ""), "base": index.is_base(rec)}
        try:
            images.append(load_image(rec["image"], ctx["processor"].pixel_bounds[1]))
            ok.append((i, row))
        except ImageError as e:
            row["skipped"] = str(e)  # counted in the metrics, never fatal
        rows.append(row)
    if not ok:
        return rows
    recs = [records[i] for i, _ in ok]
    listed = ctx["listed"][mode]
    if mode == "two_step":
        counts = sample_candidates(ctx["model"], ctx["processor"], recs, listed, n=args.num_samples,
                                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                   seed=args.seed, prompts_per_call=len(ok), device=device, indices=[i for i, _ in ok])
        asks = []
        for (i, row), rec, image, c in zip(ok, recs, images, counts):
            c = c if c is not None else Counter()  # (the image was readable a moment ago: practically never)
            options, _ = build_mcq(c, None, k=args.k, rng=mcq_rng(args.seed, i), skip_trivial=False,
                                   insert_gt=False, n_random=0)
            row.update(candidates=dict(c.most_common()), fallback=None, completion=None, answer=None, format=None,
                       options=options, choice=None,
                       sampled=sum(v for name, v in c.items() if is_correct(name, rec)) / args.num_samples)
            if options is not None:
                asks.append((row, rec, image, options))
            else:  # fewer than 2 valid candidates: nothing to choose between
                row["fallback"] = "single" if len(c) == 1 else "none"
                row["prediction"] = next(iter(c)) if len(c) == 1 else None
        if asks:
            texts = greedy(ctx["model"], ctx["processor"], [a[2] for a in asks],
                           [mcq_question(rec.get("dataset", ""), opts) for _, rec, _, opts in asks], args, device)
            for (row, rec, _, options), text in zip(asks, texts):
                fill_choice(row, text, options)
        for (_, row), rec in zip(ok, recs):
            row["correct"] = is_correct(row["prediction"], rec)
            row["inclusion"] = text_inclusion(row["prediction"], rec)
        return rows
    if mode == "open":
        questions = [open_question(r.get("dataset", ""), [c["name"] for c in listed(r)] or None) for r in recs]
    elif mode == "open_world":
        questions = [open_world_question(r.get("dataset", "")) for r in recs]
    else:
        questions = [mcq_question(r.get("dataset", ""), r["options"]) for r in recs]
    texts = greedy(ctx["model"], ctx["processor"], images, questions, args, device)
    for (_, row), rec, text in zip(ok, recs, texts):
        if mode == "mcq":
            fill_choice(row, text, rec["options"])
            row["target"] = rec["answer"]
            row["correct"] = mcq_correct(row["answer"], rec)
        else:
            row.update(completion=text, answer=extract_answer(text), format=format_ok(text))
            row["prediction"] = row["answer"]
            row["correct"] = is_correct(row["answer"], rec)
        row["inclusion"] = text_inclusion(row["prediction"], rec)
    if mode == "open_world":
        judge([row for _, row in ok], recs, ctx["verifier_for"])
    return rows


def make_verifier_for(args, table, d):
    """dataset -> verifier: the taxonomy verifier of its class table, or the LLM judge falling back to it."""
    generate, cache = None, {}
    if args.verifier_model:
        vmodel = vlm.load_model(args.verifier_model, d.device, args.dtype)
        generate = vlm.text_generator(vmodel, vlm.Processor.from_pretrained(args.verifier_model))

    def verifier_for(ds):
        if ds not in cache:
            part = (table.get("parts") or {}).get(ds)
            taxonomy = TaxonomyVerifier(part or {"domain": table.get("domain"), "classes": classes_of(table, ds)})
            path = args.verifier_cache or os.path.join(args.out, "verifier_cache.sqlite")
            cache[ds] = LLMVerifier(generate, path, fallback=taxonomy) if generate else taxonomy
        return cache[ds]
    return verifier_for


# ----------------------------------------------------------------------------------------------------
# --compare and --plot


def compare(paths, table=None):
    """Metrics recomputed from prediction files (or folders of predictions_*.jsonl), as one table."""
    metrics, names = [], []
    for path in paths:
        files = sorted(glob.glob(os.path.join(path, "predictions_*.jsonl"))) if os.path.isdir(path) else [path]
        if not files:
            raise SystemExit(f"{path}: no predictions_*.jsonl found")
        for f in files:
            by_mode = defaultdict(list)
            for row in read_jsonl(f):
                by_mode[row.get("mode")].append(row)
            for rows in by_mode.values():
                metrics.append(compute_metrics(rows, table))
                names.append(path)
    return format_table(metrics, names)


SUMMARY_COLUMNS = [  # (mode, metric, header): the headline numbers of each mode
    ("open", "base_acc", "base"), ("open", "novel_acc", "novel"), ("open", "hm", "HM"), ("open", "acc", "open acc"),
    ("two_step", "acc", "two-step"), ("mcq", "acc", "MCQ"),
    ("open_world", "correctness", "correct"), ("open_world", "specificity", "specific"),
    ("open_world", "spec_hm", "spec HM"),
]


def headline(folder, columns=SUMMARY_COLUMNS):
    """{header: value} of an evaluation folder: each column's metric from its metrics_<mode>.json (the mean
    over datasets), None where the mode was not run."""
    found = {}
    for path in glob.glob(os.path.join(folder, "metrics_*.json")):
        with open(path) as f:
            m = json.load(f)
        found[m["mode"]] = m["mean"] if len(m["per_dataset"]) > 1 else next(iter(m["per_dataset"].values()))
    return {header: found.get(mode, {}).get(key) for mode, key, header in columns}


def mean_std(values):
    """(mean, sample standard deviation with ddof 1, n) of the values that are not None; std is None for
    fewer than two values, mean too for none."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    return m, ((sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else None), len(v)


def text_table(header, body):
    """Rows of cells as aligned text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def summary(folders, names=None, columns=SUMMARY_COLUMNS):
    """One row per evaluation folder (e.g. a model after each stage) with the headline metric of every
    mode found in its metrics_<mode>.json; '-' where a mode was not run. Folders given the same name are
    one run on several seeds: their row shows mean ± std (ddof 1) over them, in %."""
    names = [str(n) for n in (names or folders)]
    if len(names) != len(folders):
        raise SystemExit(f"--names: {len(names)} names for {len(folders)} folders")
    groups = {}
    for name, folder in zip(names, folders):
        groups.setdefault(name, []).append(headline(folder, columns))
    cols = [h for *_, h in columns if any(r[h] is not None for rows in groups.values() for r in rows)]

    def cell(values):
        m, sd, n = mean_std([None if v is None else 100 * v for v in values])
        return "-" if m is None else f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}"
    body = [[name] + [cell([r[h] for r in rows]) for h in cols] for name, rows in groups.items()]
    return text_table(["model"] + cols, body)


PLOT_KEYS = ("reward_mean", "reward", "loss", "accuracy", "kl", "entropy", "completion_length")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
        return None


def smooth(values, window):
    """Centred moving average over `window` steps (shorter at the ends): a trend through per-step noise."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def plot_curves(logs, out, keys=None, labels=None):
    """Training curves (y = keys, x = step) from JSONL logs as a PNG, a line per label: logs given the
    same label (one run on several seeds) are averaged step by step; the line is that mean smoothed over
    about a tenth of the steps, the band around it the per-step values (their min..max over seeds).
    Labels default to each log's folder name. Returns the path, or None without matplotlib (an optional
    extra)."""
    plt = _pyplot()
    if plt is None:
        return None
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(log))) or log for log in logs]
    series = {}
    for log, label in zip(logs, labels):
        series.setdefault(label, []).append(read_jsonl(log))
    rows_of = [r for runs in series.values() for rows in runs for r in rows]
    present = lambda k: any(isinstance(r.get(k), (int, float)) for r in rows_of)
    numeric = [k for r in rows_of for k, v in r.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")]
    keys = [k for k in keys if present(k)] if keys else [k for k in PLOT_KEYS if present(k)] or list(dict.fromkeys(numeric))[:6]
    if not keys:
        print(f"no numeric keys to plot in {logs}")
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for label, runs in series.items():
            by_step = defaultdict(list)
            for rows in runs:
                for j, r in enumerate(rows):
                    if isinstance(r.get(key), (int, float)):
                        by_step[r.get("step", j)].append(r[key])
            if by_step:
                steps = sorted(by_step)
                mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
                line, = ax.plot(steps, smooth(mean, max(3, len(steps) // 10)), label=label, lw=1.5)
                ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                color=line.get_color(), alpha=0.15, lw=0)
                if len(runs) == 1:  # one seed: the band is the per-step line itself
                    ax.plot(steps, mean, color=line.get_color(), alpha=0.35, lw=0.6)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def plot_bars(values, out, keys=("base", "novel", "HM"), title=None):
    """Grouped bars, a group per run: values = {run: {key: [value per seed, in %]}}; bar = the mean, error
    bar = the standard deviation over seeds (none for one seed). Returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    runs = list(values)
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(runs)), 3.6))
    for j, key in enumerate(keys):
        stats = [mean_std(values[run].get(key, [])) for run in runs]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(runs))]
        ax.bar(xs, [m or 0 for m, _, _ in stats], width, yerr=[sd or 0 for _, sd, _ in stats], capsize=2, label=key)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(runs, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return out


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
    add_sampling_args(ap, num_samples=20, prompts_per_call=8, max_new_tokens=512, top_p=0.95)  # two_step samples
    add_image_args(ap)
    add_runtime_args(ap)  # --seed: two_step's candidate sampling and option shuffle
    a("--compare", nargs="+", metavar="PRED_OR_DIR", help="print one table from prediction files")
    a("--summary", nargs="+", metavar="DIR", help="one row per evaluation folder (metrics_*.json)")
    a("--names", nargs="+", default=None,
      help="row names for --summary (folders with the same name: seeds of one run, shown as mean ± std), "
           "line labels for --plot (logs with the same label: averaged)")
    a("--plot", nargs="+", metavar="LOG", help="plot training curves from JSONL logs")
    a("--plot_out", default="curves.png", help="PNG written by --plot")
    a("--plot_keys", nargs="+", default=None, help="log keys to plot (default: the usual ones)")
    args = ap.parse_args(argv)
    if not (args.compare or args.plot or args.summary) and not all([args.model, args.data, args.classes, args.out]):
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
    def read(paths):
        out = []
        for path in paths:
            records = read_records(path, skip_bad=args.skip_bad, classes=table)
            out.append((path, records[:args.limit] if args.limit else records))
        return out

    files = read(args.data)
    mcq_files = read(args.mcq_data) if args.mcq_data else files
    files_for = {mode: mcq_files if mode == "mcq" else files for mode in args.mode}
    for _, records in files_for.get("mcq", ()):
        require_fields(records, ("options", "answer"), "--mode mcq")
    processor = vlm.Processor.from_pretrained(args.model, args.min_pixels, args.max_pixels)
    warn_large_images([r for _, records in files + (mcq_files if args.mcq_data else []) for r in records], processor)
    model = vlm.load_model(args.model, d.device, args.dtype)
    ctx = {"args": args, "index": index, "device": d.device, "model": model, "processor": processor,
           "listed": {m: class_list_for(m, args, table, index) for m in MODES},
           "verifier_for": make_verifier_for(args, table, d) if "open_world" in args.mode else None}
    os.makedirs(args.out, exist_ok=True)
    for mode in args.mode:
        t0, parts = time.time(), []
        for path, records in files_for[mode]:
            tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
            stem = os.path.splitext(os.path.basename(path))[0]
            shards = ResumableShards(os.path.join(args.out, "parts", f"{mode}.{stem}.{tag}.jsonl"), d)
            other = {r.get("model") for r in shards.rows} - {args.model}
            if other:
                raise SystemExit(f"{args.out} holds unfinished {mode} predictions of another model {other}: "
                                 "use another --out or delete its parts/ folder")
            pending = [i for i in shard(list(range(len(records))), d) if i not in shards.done]
            print0(f"[{mode}] {path}: {len(records)} images, {len(shards.done)} done, "
                       f"{len(pending)} to do on rank 0")
            ctx["file"] = stem
            for s in range(0, len(pending), args.prompts_per_call):
                shards.append(predict_batch(mode, records, pending[s:s + args.prompts_per_call], ctx))
            parts.append(shards)
        rows = [row for shards in parts for row in shards.merge()]  # merge only once every file is done
        if d.is_main:
            write_jsonl(os.path.join(args.out, f"predictions_{mode}.jsonl"), rows)
            for shards in parts:
                os.remove(shards.path)
            if not os.listdir(os.path.join(args.out, "parts")):
                os.rmdir(os.path.join(args.out, "parts"))
            metrics = compute_metrics(rows, table)
            with open(os.path.join(args.out, f"metrics_{mode}.json"), "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=1)
            print(format_table([metrics], [os.path.basename(os.path.normpath(args.out))]))
            print(f"[{mode}] {len(rows)} predictions in {time.time() - t0:.1f}s -> {args.out}")
        barrier()
    cleanup()


if __name__ == "__main__":
    main()
