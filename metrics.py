"""metrics.py — from prediction rows to numbers: the metrics of each evaluation mode, the tables that
compare runs, and the plots.

- `compute_metrics`: base / novel / HM per dataset and their mean (CoCoOp's convention), MCQ and two-step
  accuracy, SpeciaRL's open-world correctness / specificity (evaluate.py's docstring lists every key);
- `compare` (evaluate.py --compare): metrics recomputed from prediction files; `summary` (--summary): the
  headline numbers of evaluation folders, seeds of one run as mean ± std (runs/compare.py's table);
- `plot_curves` (--plot) and `plot_bars`: PNGs with matplotlib, an optional extra.
Pure functions of files and rows: no model, no torch.
"""

import glob
import json
import os
from collections import defaultdict

from common import read_jsonl
from data.records import classes_of
from reward import CATEGORIES, open_world_metrics

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
        # two_step's (rows resumed from shards of an older version lack it)
        sampled = [r["sampled"] for r in done if "sampled" in r]
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
    mode = modes[0] if len(modes) == 1 else "+".join(modes) or None
    return {"mode": mode, "per_dataset": per, "mean": mean}


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
    return text_table(header, body, left=3)


# ----------------------------------------------------------------------------------------------------
# --compare and --plot


def compare(paths, table=None):
    """Metrics recomputed from prediction files (or folders of predictions_*.jsonl), as one table."""
    metrics, names = [], []
    for path in paths:
        files = (sorted(glob.glob(os.path.join(path, "predictions_*.jsonl"))) if os.path.isdir(path)
                 else [path])
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
    ("open", "base_acc", "base"), ("open", "novel_acc", "novel"), ("open", "hm", "HM"),
    ("open", "acc", "open acc"),
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


def text_table(header, body, left=1):
    """Rows of cells as aligned text: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < left else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths)))
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
    if keys:
        keys = [k for k in keys if present(k)]
    else:
        keys = [k for k in PLOT_KEYS if present(k)] or list(dict.fromkeys(numeric))[:6]
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
    bar = the standard deviation over seeds (none for one seed). Returns the path, or None without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    runs = list(values)
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(runs)), 3.6))
    for j, key in enumerate(keys):
        stats = [mean_std(values[run].get(key, [])) for run in runs]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(runs))]
        ax.bar(xs, [m or 0 for m, _, _ in stats], width, yerr=[sd or 0 for _, sd, _ in stats], capsize=2,
               label=key)
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
