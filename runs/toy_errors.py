"""runs/toy_errors.py — what a model's wrong names on the toy world are, and how much base - novel is luck.

    python runs/toy_errors.py out/toy/seed_0/eval/start [out/toy/seed_0/eval/divek ...]

For each evaluation folder (predictions_open.jsonl of evaluate.py, the open question listing the split's
classes) and each split, the answers in kinds: right; the right colour and shape with another epithet,
listed or not (an epithet of the other split: a name the prompt did not offer); another colour or shape;
no class at all. Then how much the model's epithets say about the pattern (mutual information between the
true pattern and the pattern of the named class, over answers with the right colour and shape; 2 bits =
knows every epithet, 0 = guesses), and base - novel with its standard error over classes: a class's images
share its name, so a model that happens to know one epithet well and another badly moves a whole class,
and with 32 classes a side the two halves differ by chance by about that much.
"""

import argparse
import json
import math
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import read_jsonl  # noqa: E402
from reward import ClassMatcher  # noqa: E402

KINDS = ("right", "epithet (listed)", "epithet (unlisted)", "colour/shape", "no class")


def kind(row, by_name, match):
    """The kind of one open-question answer relative to its label (KINDS); `match`: a reward.ClassMatcher."""
    if row["correct"]:
        return "right"
    named = match(row.get("answer"))
    if named is None:
        return "no class"
    truth, said = by_name[row["label"]], by_name[named]
    if said["parents"][1] != truth["parents"][1]:
        return "colour/shape"
    return "epithet (listed)" if said["base"] == truth["base"] else "epithet (unlisted)"


def pattern_information(rows, by_name, match):
    """Mutual information (bits) between the true pattern and the named class's pattern, over answers
    that name a class of the right colour and shape."""
    joint = Counter()
    for r in rows:
        named = match(r.get("answer"))
        if named and by_name[named]["parents"][1] == by_name[r["label"]]["parents"][1]:
            joint[by_name[r["label"]]["attributes"]["pattern"], by_name[named]["attributes"]["pattern"]] += 1
    n = sum(joint.values())
    if not n:
        return 0.0, 0
    true, said = Counter(), Counter()
    for (t, s), k in joint.items():
        true[t] += k
        said[s] += k
    return sum(k / n * math.log2(k * n / (true[t] * said[s])) for (t, s), k in joint.items()), n


def class_gap(rows):
    """(base - novel accuracy, its standard error over classes), in points."""
    per_class = defaultdict(list)
    for r in rows:
        per_class[(r["base"], r["label"])].append(float(r["correct"]))
    side = {b: [sum(v) / len(v) for (bb, _), v in per_class.items() if bb == b] for b in (True, False)}
    mean = {b: sum(v) / len(v) for b, v in side.items()}
    var = {b: sum((x - mean[b]) ** 2 for x in v) / (len(v) - 1) / len(v) for b, v in side.items()}
    return 100 * (mean[True] - mean[False]), 100 * math.sqrt(var[True] + var[False])


def report(folder, table):
    by_name = {c["name"]: c for c in table["classes"]}
    match = ClassMatcher(table["classes"])
    rows = [r for r in read_jsonl(os.path.join(folder, "predictions_open.jsonl")) if "skipped" not in r]
    lines = [f"{folder}:"]
    for base in (True, False):
        part = [r for r in rows if r["base"] == base]
        counts = Counter(kind(r, by_name, match) for r in part)
        lines.append(f"  {'base ' if base else 'novel'} ({len(part)}): " +
                     ", ".join(f"{k} {100 * counts[k] / len(part):.0f}%" for k in KINDS))
    bits, n = pattern_information(rows, by_name, match)
    gap, se = class_gap(rows)
    lines.append(f"  epithet knowledge: {bits:.2f} of 2 bits (over {n} answers of the right colour and shape); "
                 f"base - novel {gap:+.1f} ± {se:.1f} (standard error over classes)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="evaluate.py output folders (OUT/seed_N/eval/RUN)")
    ap.add_argument("--classes", default=None, help="classes.json (default: the folder's world, ../../data)")
    args = ap.parse_args(argv)
    for folder in args.folders:
        path = args.classes or os.path.join(folder, "..", "..", "data", "classes.json")
        with open(path) as f:
            print(report(folder, json.load(f)))


if __name__ == "__main__":
    main()
