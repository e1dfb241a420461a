"""runs/compare.py — the toy comparison's table, each paper's claim beside what the toy worlds show, and plots.

    python runs/compare.py out/toy/seed_0                      # one world: the table, the differences
    python runs/compare.py out/toy/seed_0 out/toy/seed_1 ...   # several: mean ± std per cell, verdicts
    python runs/compare.py out/toy_micro16/seed_0 --reference out/toy/seed_0 out/toy/seed_1 out/toy/seed_2
                                       # a world rerun with its float path perturbed, cell by cell against its SE

Each folder is one world (one seed) as runs/toy.sh leaves it: eval/<run>/metrics_*.json (evaluate.py) and
<run>/log.jsonl (grpo.py) for the runs in RUNS. It prints one row per run, then for each paper its
headline claim, the paper's number, the same difference here and a verdict, then whether each recipe moved
the held-out number it trains for from the model it starts from (`objectives`: the same rule; the format-only
control should stay within 3 points), then each model's held-out format (the worst world's share per question,
`held_out_format`: at least 95% everywhere, or the model has lost it), then whether each GRPO run's training
reward rose
(`training_rewards`); and writes, beside the
folders (or in --out), curves.png (each GRPO run's reward, accuracy, KL, entropy and completion length
per step, averaged over seeds) and accuracy.png (base / novel / HM per run, ± std over seeds).

The verdict rule (`verdict`), fixed before any table was seen: d = the per-seed difference between the
two runs the claim compares (both trained from the same start model on the same world, so the pair shares
the world's and the start model's luck), m = its mean and s = its standard deviation over seeds (ddof 1).
    |m| <= s                          within noise
    m > s, in the claim's direction   reproduced
    m > s, against it                 opposite
One seed has no s, so no verdict: the difference is printed alone. SpeciaRL's claim has two parts
(specificity rises, correctness does not fall): reproduced when the first is reproduced and the second
not contradicted; opposite when either is contradicted (specificity falls, or correctness falls, beyond
noise); within noise otherwise. A recipe's own objective is judged as its issue asks: it improves when its
mean change exceeds twice its standard error (s / sqrt(n)) and the format-only control's change of the same
number (`objective_verdict`). Every difference is printed as mean ± s (SE s / sqrt(n)); beside each claim, the
SE its mean would have from the test set alone (`test_set_floor`: a paired bootstrap over the test classes).
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import read_jsonl  # noqa: E402
from metrics import compute_metrics, headline, mean_std, plot_bars, plot_curves, summary, text_table  # noqa: E402

RUNS = [  # (folder, row name), in the table's order; runs/toy.sh trains and evaluates each
    ("start", "start"),
    ("format", "format only"),
    ("exact", "Visual-RFT"),
    ("divek", "DiVE-k"),
    ("speciarl", "SpeciaRL"),
    ("cot", "CoT SFT"),
    ("tapo", "Fine-R1"),
    ("dapo", "CoT SFT+DAPO"),
]
# (evaluate.py mode, metric, header). sampled: the share of the two-step's samples (T 1, top-p 0.95) that name the
# label, the held-out counterpart of GRPO's training accuracy
COLUMNS = [
    ("open", "base_acc", "base"), ("open", "novel_acc", "novel"), ("open", "hm", "HM"),
    ("two_step", "acc", "two-step"), ("two_step", "sampled", "sampled"), ("mcq", "acc", "MCQ"),
    ("open_world", "correctness", "correct"), ("open_world", "specificity", "specific"),
    ("open_world", "spec_hm", "spec HM"),
]
# the reward and accuracy of every completion drawn (grpo.py's reward_drawn: with DAPO's dynamic sampling the
# kept groups' reward_mean sits near half right however much the policy learns)
CURVES = ("reward_drawn", "accuracy_drawn", "kl", "entropy", "completion_length")


def verdict(diffs, direction=+1):
    """'reproduced' / 'opposite' / 'within noise' for per-seed differences whose claimed sign is
    `direction` (the rule in the module docstring); None for fewer than two seeds."""
    m, sd, n = mean_std(diffs)
    if n < 2:
        return None
    if abs(m) <= sd:
        return "within noise"
    return "reproduced" if m * direction > 0 else "opposite"


def speciarl_verdict(d_specific, d_correct):
    """SpeciaRL's two-part claim: specificity rises (d_specific > 0) without correctness falling."""
    spec, corr = verdict(d_specific, +1), verdict(d_correct, +1)
    if spec is None:
        return None
    if spec == "opposite" or corr == "opposite":
        return "opposite"
    return "reproduced" if spec == "reproduced" else "within noise"


def differences(values, a, b, key):
    """Per-seed values[a][key] - values[b][key], for the seeds that have both."""
    return [x - y for x, y in zip(values[a][key], values[b][key]) if x is not None and y is not None]


def claims(values):
    """[(claim, the paper's number, per-seed differences, verdict)] for the runs present in `values`
    ({run: {header: [value per seed, in %]}})."""
    out = []
    if "divek" in values and "exact" in values:
        d = differences(values, "divek", "exact", "HM")
        out.append(("DiVE-k - Visual-RFT, HM", "+6.16 (mean of 5 datasets)", d, verdict(d)))
    if "speciarl" in values and "start" in values:
        ds, dc = differences(values, "speciarl", "start", "specific"), differences(values, "speciarl", "start", "correct")
        v = speciarl_verdict(ds, dc)
        out.append(("SpeciaRL - start, specific", "+17.8 (CUB -> 5 domains)", ds, v))
        out.append(("SpeciaRL - start, correct", "+0.2 (not lower)", dc, v))
    if "tapo" in values and "dapo" in values:
        d = differences(values, "tapo", "dapo", "HM")
        out.append(("Fine-R1: TAPO - DAPO, HM", "> 0 (the paper's ablation)", d, verdict(d)))
    return out


CLAIM_NUMBERS = {  # claim -> (run a, run b, evaluate.py mode, metric): the number `claims` takes b from a in
    "DiVE-k - Visual-RFT, HM": ("divek", "exact", "open", "hm"),
    "SpeciaRL - start, specific": ("speciarl", "start", "open_world", "specificity"),
    "SpeciaRL - start, correct": ("speciarl", "start", "open_world", "correctness"),
    "Fine-R1: TAPO - DAPO, HM": ("tapo", "dapo", "open", "hm"),
}


def class_bootstrap_se(folder, a, b, mode, metric, draws=500, seed=0):
    """The test set's part of a claim's noise in one world: the standard deviation, in points, of metric(a) -
    metric(b) over paired resamples of the test classes (base and novel classes each drawn with replacement,
    every image of a drawn class in: a class's images share its name, so the class is the unit, as in
    runs/toy_errors.py). None when either run's predictions are missing."""
    rows = {}
    for run in (a, b):
        path = os.path.join(folder, "eval", run, f"predictions_{mode}.jsonl")
        if not os.path.exists(path):
            return None
        rows[run] = {}
        for r in read_jsonl(path):
            if "skipped" not in r:
                rows[run].setdefault(r["label"], []).append(r)
    classes = sorted(set(rows[a]) & set(rows[b]))
    strata = [[c for c in classes if rows[a][c][0].get("base", True) == side] for side in (True, False)]
    rng, diffs = random.Random(seed), []
    for _ in range(draws):
        drawn = [rng.choice(stratum) for stratum in strata for _ in stratum]
        m = [compute_metrics([r for c in drawn for r in rows[run][c]])["mean"][metric] for run in (a, b)]
        diffs.append(100 * (m[0] - m[1]))
    mu = sum(diffs) / draws
    return (sum((d - mu) ** 2 for d in diffs) / draws) ** 0.5


def test_set_floor(folders, draws=500):
    """{claim: the standard error its mean over the folders would have from the test set alone}: sqrt(sum of
    each world's class_bootstrap_se squared) / n. A claim's SE over worlds cannot fall below it however
    alike the worlds are; more test images of the same classes lower only its within-class part."""
    out = {}
    for claim, (a, b, mode, metric) in CLAIM_NUMBERS.items():
        se = [class_bootstrap_se(f, a, b, mode, metric, draws) for f in folders]
        if se and all(x is not None for x in se):
            out[claim] = sum(x * x for x in se) ** 0.5 / len(se)
    return out


OBJECTIVES = [  # (run, the held-out number its recipe trains for, the run it starts from, what counts)
    ("format", "HM", "start", "control"),  # no task signal: it should stay where it starts (within 3 points)
    ("exact", "base", "start", "rise"),    # Visual-RFT: base accuracy, the base classes listed
    ("divek", "MCQ", "start", "rise"),     # DiVE-k: the held-out MCQ ...
    ("divek", "base", "start", "rise"),    # ... and base accuracy
    ("speciarl", "specific", "start", "rise"),  # SpeciaRL: specificity ...
    ("speciarl", "correct", "start", "keep"),   # ... without losing correctness
    ("tapo", "base", "cot", "rise"),       # Fine-R1's TAPO and plain DAPO: base accuracy over their CoT SFT start
    ("dapo", "base", "cot", "rise"),
]
CONTROL_BAND = 3.0  # points: how far the format-only control's HM may move and still count as unmoved


def standard_error(diffs):
    """The standard error of the mean of per-seed differences (s / sqrt(n)); None for fewer than two."""
    m, sd, n = mean_std(diffs)
    return None if sd is None else sd / n ** 0.5


def objective_verdict(diffs, kind, control=None):
    """Whether a recipe moved its own held-out number from its start (per-seed differences, in points):
    rise: 'improves' when the mean change exceeds twice its standard error and the format-only control's
    change of the same number (`control`, its mean; m > 0 on one seed: printed as such), 'worse' when it falls
    by more than twice its standard error, 'within noise' otherwise; keep: 'kept' unless it falls beyond noise
    ('falls': the module's rule); control: 'unmoved' when |m| <= 3 points."""
    m, sd, n = mean_std(diffs)
    if m is None:
        return "-"
    if kind == "control":
        return "unmoved" if abs(m) <= CONTROL_BAND else "moved"
    if kind == "keep":
        v = verdict(diffs) if n > 1 else ("opposite" if m < 0 else "reproduced")
        return ("falls" if v == "opposite" else "kept") + (" (one seed)" if n == 1 else "")
    if n == 1:
        return ("improves" if m > 0 else "worse" if m < 0 else "within noise") + " (one seed)"
    se = standard_error(diffs)
    if m > 2 * se and (control is None or m > control):
        return "improves"
    return "worse" if m < -2 * se else "within noise"


def objectives(values):
    """[(recipe, objective, its start's mean, the recipe's mean, per-seed differences, verdict)] for the runs
    present in `values`: what each recipe trains for, measured on held-out images against the model it starts
    from, and beside the format-only control's change of the same number (GRPO with no task signal)."""
    names, out = dict(RUNS), []
    for run, header, start, kind in OBJECTIVES:
        if run in values and start in values:
            d = differences(values, run, start, header)
            control = (mean_std(differences(values, "format", "start", header))[0]
                       if "format" in values and "start" in values and run != "format" else None)
            out.append((names[run], f"{header} (from {names[start]})", mean_std(values[start][header])[0],
                        mean_std(values[run][header])[0], d, objective_verdict(d, kind, control)))
    return out


def spread(d):
    """'+m ± s (SE e)' for per-seed differences; '+m' for one seed; '-' for none."""
    m, sd, n = mean_std(d)
    if m is None:
        return "-"
    return f"{m:+.1f}" + (f" ± {sd:.1f} (SE {standard_error(d):.1f})" if sd is not None else "")


def format_objectives(rows, n_seeds):
    body = [[name, objective, f"{a:.1f}", f"{b:.1f}", spread(d), v] for name, objective, a, b, d, v in rows]
    seeds = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
    return text_table(["own objective (held out)", "number", "start", "after", f"change ({seeds})", "verdict"], body)


def format_claims(rows, n_seeds, floors=None):
    """The claims table; with `floors` (test_set_floor) a column of each claim's SE from the test set alone."""
    floors = floors or {}
    body = [[claim, paper, spread(d)] + ([f"{floors[claim]:.1f}" if claim in floors else "-"] if floors else [])
            + [v or ("one seed: no verdict" if len(d) == 1 else "-")] for claim, paper, d, v in rows]
    header = ["claim", "paper", f"here ({n_seeds} seed{'s' if n_seeds > 1 else ''})"]
    return text_table(header + (["SE of the test set"] if floors else []) + ["verdict"], body)


def reward_rise(rewards):
    """(rise, its standard error) of a run's per-step training reward: the mean of the last quarter of
    steps minus the mean of the first, the error from the steps' spread within each quarter."""
    q = len(rewards) // 4
    if q < 2:
        return None, None
    first, last = rewards[:q], rewards[-q:]
    (m1, s1, _), (m2, s2, _) = mean_std(first), mean_std(last)
    return m2 - m1, (s1 ** 2 / q + s2 ** 2 / q) ** 0.5


def training_rewards(folders):
    """[(run name, first quarter, last quarter, rise, standard error, verdict)] for each GRPO run, over the
    seeds: quarters and rises averaged, errors combined. The reward is every drawn completion's
    (reward_drawn; logs without it: reward_mean). A run learns what it trains on when its reward
    rises by >= 0.05 and by more than twice the error."""
    out = []
    names = dict(RUNS)
    for run, _ in RUNS:
        curves = [[r.get("reward_drawn", r.get("reward_mean")) for r in read_jsonl(p) if "reward_mean" in r]
                  for p in (os.path.join(f, run, "log.jsonl") for f in folders) if os.path.exists(p)]
        rises = [(reward_rise(c), c) for c in curves]
        rises = [(r, se, c) for (r, se), c in rises if r is not None]
        if not rises:
            continue
        n = len(rises)
        q = lambda c, last: mean_std(c[-(len(c) // 4):] if last else c[:len(c) // 4])[0]
        first, last = (sum(q(c, end) for *_, c in rises) / n for end in (False, True))
        rise = sum(r for r, _, _ in rises) / n
        se = sum(s ** 2 for _, s, _ in rises) ** 0.5 / n
        out.append((names[run], first, last, rise, se, "rises" if rise >= 0.05 and rise > 2 * se else "flat"))
    return out


def format_training_rewards(rows, n_seeds):
    body = [[name, f"{a:.3f}", f"{b:.3f}", f"{r:+.3f} ± {se:.3f}", v] for name, a, b, r, se, v in rows]
    seeds = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
    return text_table([f"training reward ({seeds})", "first quarter", "last quarter", "rise ± SE", "verdict"], body)


FORMAT_COLUMNS = [("open", "format", "open"), ("two_step", "format", "two-step"), ("open_world", "format", "open-world"),
                  ("mcq", "format", "MCQ")]
FORMAT_FLOOR = 95.0  # %: a model that answers fewer held-out questions in format has lost its format


def held_out_format(folders):
    """[(run name, {header: [format % per folder, None where not evaluated]})] for the runs evaluated in any
    folder: the share of each held-out question's answers in the <think></think><answer></answer> format."""
    names = dict(RUNS)
    return [(names[run], row) for run, row in collect(folders, FORMAT_COLUMNS).items()]


def format_held_out_format(rows):
    """The lowest share over the worlds per question, and whether every world is at FORMAT_FLOOR or above."""
    body = []
    for name, row in rows:
        cells = [[v for v in row[h] if v is not None] for *_, h in FORMAT_COLUMNS]
        body.append([name] + [f"{min(c):.1f}" if c else "-" for c in cells]
                    + ["yes" if all(v >= FORMAT_FLOOR for c in cells for v in c) else "no"])
    return text_table(["format (%, worst world)"] + [h for *_, h in FORMAT_COLUMNS] + [f">= {FORMAT_FLOOR:.0f}"], body)


# the start a recipe can improve on: greedy answers often wrong while the knowledge is there (docs/LOG.md)
START_BANDS = {"greedy base": (45, 70), "greedy novel": (45, 70), "top-5": (85, 100), "probe": (90, 100)}


def start_knowledge(folders, values):
    """Per world: the start's greedy base / novel accuracy (listed question; `values`: collect()'s), the
    ground truth's share in its mined top-5 (mine/mcq.summary.json) and its knowledge probe
    (eval/start/probe.json), in %; None where a file is missing."""
    def read(path, key, scale=1.0):
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return scale * json.load(f)[key]
    start = values.get("start", {"base": [None] * len(folders), "novel": [None] * len(folders)})
    return [{"greedy base": start["base"][i], "greedy novel": start["novel"][i],
             "top-5": read(os.path.join(f, "mine", "mcq.summary.json"), "gt_in_topk", 100.0),
             "probe": read(os.path.join(f, "eval", "start", "probe.json"), "acc")} for i, f in enumerate(folders)]


def format_start(rows, folders):
    body = [[os.path.basename(os.path.normpath(f))] + ["-" if r[k] is None else f"{r[k]:.1f}" for k in START_BANDS]
            + ["yes" if all(r[k] is not None and lo <= r[k] <= hi for k, (lo, hi) in START_BANDS.items()) else "no"]
            for f, r in zip(folders, rows)]
    bands = ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in START_BANDS.items())
    return text_table(["start (%)"] + list(START_BANDS) + ["in bands"], body) + f"\n  bands: {bands}"


def perturbation(folder, reference):
    """(rows, outside, total): each cell of `folder` (one world, its float path perturbed) minus the same cell
    of the unperturbed run of that world (the folder of `reference` with the same name, e.g. seed_0), beside
    the cell's standard error over `reference` (the unperturbed worlds): rows = [(run name, [(difference,
    SE)])], outside = how many differences exceed their SE."""
    same = [r for r in reference if os.path.basename(os.path.normpath(r)) == os.path.basename(os.path.normpath(folder))]
    if len(same) != 1:
        raise SystemExit(f"--reference: no single unperturbed folder named like {folder} among {reference}")
    here, there, worlds = collect([folder]), collect(same), collect(reference)
    rows, outside, total = [], 0, 0
    for run, name in RUNS:
        if run not in here or run not in there:
            continue
        cells = []
        for *_, h in COLUMNS:
            a, b = here[run][h][0], there[run][h][0]
            se = standard_error(worlds[run][h])
            cells.append(None if a is None or b is None or se is None else (a - b, se))
            if cells[-1] is not None:
                total += 1
                outside += abs(a - b) > se
        rows.append((name, cells))
    return rows, outside, total


def format_perturbation(rows, outside, total):
    body = [[name] + ["-" if c is None else f"{c[0]:+.1f}{'*' if abs(c[0]) > c[1] else ' '}({c[1]:4.1f})" for c in cells]
            for name, cells in rows]
    return (text_table(["perturbed - unperturbed (SE)"] + [h for *_, h in COLUMNS], body)
            + f"\n  {outside} of {total} cells outside their SE over the unperturbed worlds (*)")


def collect(folders, columns=COLUMNS):
    """{run: {header: [value per folder, in % or None]}} for the runs with any of `columns` in any folder."""
    values = {}
    for run, _ in RUNS:
        rows = [headline(os.path.join(f, "eval", run), columns) for f in folders]
        if any(v is not None for r in rows for v in r.values()):
            values[run] = {h: [None if r[h] is None else 100 * r[h] for r in rows] for *_, h in columns}
    return values


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="one runs/toy.sh output folder per seed (OUT/seed_N)")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: the folders' parent)")
    ap.add_argument("--no_plots", action="store_true")
    ap.add_argument("--reference", nargs="+", default=None,
                    help="the unperturbed worlds (OUT/seed_N ...): print each folder's cells against the unperturbed "
                         "run of its world, beside the cell's SE over them (runs/toy.sh's PREFIX or MICRO perturbs)")
    args = ap.parse_args(argv)
    if args.reference:
        for folder in args.folders:
            print(f"{folder} against {args.reference}:")
            print(format_perturbation(*perturbation(folder, args.reference)))
            print(format_held_out_format(held_out_format([folder])))
            print()
        return
    values = collect(args.folders)
    names = dict(RUNS)
    evals = [os.path.join(f, "eval", run) for run in values for f in args.folders]
    labels = [names[run] for run in values for _ in args.folders]
    print(summary(evals, labels, COLUMNS))
    print()
    if "start" in values:
        print(format_start(start_knowledge(args.folders, values), args.folders))
        print()
    print(format_claims(claims(values), len(args.folders), test_set_floor(args.folders)))
    own = objectives(values)
    if own:
        print()
        print(format_objectives(own, len(args.folders)))
    formats = held_out_format(args.folders)
    if formats:
        print()
        print(format_held_out_format(formats))
    rises = training_rewards(args.folders)
    if rises:
        print()
        print(format_training_rewards(rises, len(args.folders)))
    if args.no_plots:
        return
    out = args.out or os.path.dirname(os.path.abspath(args.folders[0]))
    os.makedirs(out, exist_ok=True)
    logs = [(os.path.join(f, run, "log.jsonl"), names[run]) for run in values for f in args.folders
            if os.path.exists(os.path.join(f, run, "log.jsonl"))]
    seeds = f"{len(args.folders)} seed{'s' if len(args.folders) > 1 else ''}"
    if logs:
        plot_curves([p for p, _ in logs], os.path.join(out, "curves.png"), CURVES, [n for _, n in logs])
    plot_bars({names[run]: values[run] for run in values}, os.path.join(out, "accuracy.png"),
              title=f"base / novel / HM with the split's class list ({seeds}; bars: mean, whiskers: std)")


if __name__ == "__main__":
    main()
