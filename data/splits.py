"""The splits the papers use, as small pure functions on lists of (image, label_id) pairs.

- Base-to-novel (CoCoOp): sort class ids, base = the first ceil(n/2), novel = the rest.
- Few-shot (Dassl): per class, K items drawn with a seeded RNG (with replacement when a class has
  fewer than K); validation gets min(K, 4) per class. The papers use seeds 1, 2, 3.
- Validation carved from train when a dataset ships none (CoOp: 20% of each class).
- Mixed-domain: concatenate datasets, sampling each in proportion to its size.

Every function is deterministic given its seed and its input order: loaders list items in the order of
the dataset's index files (or sorted file names), never in the order a file system happens to return.
"""

import math
import random
from collections import defaultdict

SETTINGS = ("base2novel", "fewshot", "all")
VAL_SEED = 0  # carving validation/test out of train is part of the dataset, not of a few-shot seed


def base_ids(n_classes):
    """CoCoOp's base classes: the first ceil(n/2) ids."""
    return set(range(math.ceil(n_classes / 2)))


def mark_base(classes):
    """Set each class's `base` flag by the CoCoOp rule, unless the loader already set it (DiVE-k and the
    toy world ship their own base/novel membership)."""
    if all("base" in c for c in classes):
        return classes
    base = base_ids(len(classes))
    for c in classes:
        c["base"] = c["id"] in base
    return classes


def by_class(items):
    """{label_id: [items]} keeping the input order inside each class."""
    groups = defaultdict(list)
    for item in items:
        groups[item[1]].append(item)
    return groups


def keep_classes(items, ids):
    """The items whose label_id is in `ids`."""
    ids = set(ids)
    return [item for item in items if item[1] in ids]


def few_shot(items, shots, seed):
    """Dassl's few-shot rule: per class (in label order) `shots` items sampled with random.Random(seed),
    without replacement when the class has enough, with replacement otherwise.

    A simplification: Dassl draws from Python's global RNG after other calls, so the exact images differ
    from CoOp's published few-shot files; the rule (and determinism per seed) is the same.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    picked = []
    for label, group in sorted(by_class(items).items()):
        if len(group) >= shots:
            picked += rng.sample(group, shots)
        else:
            picked += rng.choices(group, k=shots)
    return picked


def carve(items, fraction, seed=VAL_SEED):
    """Split items per class into (rest, carved) with round(fraction * n) carved from each class (at
    least one when the class has two or more items, none from a single-item class). CoOp's rule for
    validation from train."""
    rng = random.Random(seed)
    rest, carved = [], []
    for label, group in sorted(by_class(items).items()):
        order = list(range(len(group)))
        rng.shuffle(order)
        n = min(max(1, round(fraction * len(group))), len(group) - 1) if len(group) >= 2 else 0
        take = set(order[:n])
        for i, item in enumerate(group):  # keep the original order inside each part
            (carved if i in take else rest).append(item)
    return rest, carved


def make_setting(classes, splits, setting, shots=None, seed=1):
    """The output files of a setting, {file stem: [(image, label_id)]}, from the official splits
    {"train", "val", "test"} of a dataset whose classes carry `base` flags.

    base2novel: train/val = base classes (K-shot and min(K, 4)-shot when `shots`), test_base, test_novel.
    fewshot:    train = K-shot over all classes (K = shots, default 4), val = min(K, 4)-shot, test.
    all:        the full official train, val and test.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    missing = [s for s in ("train", "val", "test") if s not in splits]
    if missing:
        raise ValueError(f"splits {missing} missing; carve them before choosing a setting")
    train, val, test = splits["train"], splits["val"], splits["test"]
    if setting == "base2novel":
        base = [c["id"] for c in classes if c["base"]]
        novel = [c["id"] for c in classes if not c["base"]]
        train, val = keep_classes(train, base), keep_classes(val, base)
        if shots:
            train, val = few_shot(train, shots, seed), few_shot(val, min(shots, 4), seed)
        return {"train": train, "val": val,
                "test_base": keep_classes(test, base), "test_novel": keep_classes(test, novel)}
    if setting == "fewshot":
        shots = shots or 4
        return {"train": few_shot(train, shots, seed), "val": few_shot(val, min(shots, 4), seed), "test": test}
    return {"train": train, "val": val, "test": test}


def mix(record_lists, size=None, seed=1):
    """Mixed-domain training set: each list of records (one per dataset, each with its `dataset` field)
    contributes in proportion to its size; `size` caps the total (each part gets round(size * n_i / N),
    without replacement). The result is shuffled so that batches mix domains."""
    rng = random.Random(seed)
    total = sum(len(r) for r in record_lists)
    mixed = []
    for records in record_lists:
        if size is None:
            mixed += records
        else:
            k = round(size * len(records) / total) if total else 0
            mixed += rng.sample(records, k) if k <= len(records) else rng.choices(records, k=k)
    rng.shuffle(mixed)
    return mixed
