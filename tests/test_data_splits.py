"""The papers' splits: CoCoOp base/novel, Dassl few-shot, validation carving, mixed-domain mixtures."""

from collections import Counter

import pytest

from data import splits


def items(per_class):
    """(image, label) pairs; per_class = number of images of each class id in order."""
    return [(f"c{label}_{k}.jpg", label) for label, n in enumerate(per_class) for k in range(n)]


def classes(n):
    return [{"id": i, "name": f"class {i}", "aliases": [], "parents": []} for i in range(n)]


@pytest.mark.parametrize("n, n_base", [(200, 100), (196, 98), (100, 50), (102, 51), (37, 19), (101, 51), (1, 1)])
def test_base_is_the_first_half_rounded_up(n, n_base):
    assert splits.base_ids(n) == set(range(n_base))
    table = splits.mark_base(classes(n))
    assert [c["id"] for c in table if c["base"]] == list(range(n_base))


def test_mark_base_keeps_a_loaders_own_membership():
    table = classes(4)
    for c, base in zip(table, [False, True, False, True]):
        c["base"] = base
    assert [c["base"] for c in splits.mark_base(table)] == [False, True, False, True]


def test_few_shot_takes_k_per_class_deterministically():
    pool = items([10, 10, 10])
    picked = splits.few_shot(pool, 4, seed=1)
    assert Counter(label for _, label in picked) == {0: 4, 1: 4, 2: 4}
    assert all(Counter(picked)[item] == 1 for item in picked)  # enough images: no repeats
    assert set(picked) <= set(pool)
    assert picked == splits.few_shot(pool, 4, seed=1)
    assert any(splits.few_shot(pool, 4, seed=s) != picked for s in (2, 3))


def test_few_shot_samples_with_replacement_when_a_class_is_small():
    picked = splits.few_shot(items([2, 10]), 4, seed=1)
    small = [item for item in picked if item[1] == 0]
    assert len(small) == 4 and set(small) <= {("c0_0.jpg", 0), ("c0_1.jpg", 0)}
    with pytest.raises(ValueError):
        splits.few_shot(items([3]), 0, seed=1)


def test_carve_takes_a_fraction_of_every_class():
    pool = items([10, 5, 2, 1])
    rest, val = splits.carve(pool, 0.2)
    assert Counter(label for _, label in val) == {0: 2, 1: 1, 2: 1}  # round(0.2 n), at least one; never a lone image
    assert sorted(rest + val) == sorted(pool) and not set(rest) & set(val)
    assert (rest, val) == splits.carve(pool, 0.2)


def test_base2novel_keeps_base_classes_in_training():
    table = splits.mark_base(classes(5))  # base = 0, 1, 2
    official = {"train": items([6] * 5), "val": items([3] * 5), "test": items([2] * 5)}
    files = splits.make_setting(table, official, "base2novel")
    assert set(files) == {"train", "val", "test_base", "test_novel"}
    assert {label for _, label in files["train"]} == {0, 1, 2} == {label for _, label in files["val"]}
    assert {label for _, label in files["test_base"]} == {0, 1, 2}
    assert {label for _, label in files["test_novel"]} == {3, 4}
    assert len(files["train"]) == 18

    shot = splits.make_setting(table, official, "base2novel", shots=5, seed=2)
    assert Counter(label for _, label in shot["train"]) == {0: 5, 1: 5, 2: 5}
    assert Counter(label for _, label in shot["val"]) == {0: 4, 1: 4, 2: 4}  # min(5, 4) = 4, drawn from 3 with replacement
    assert shot["test_novel"] == files["test_novel"]


def test_fewshot_and_all_settings():
    table = splits.mark_base(classes(3))
    official = {"train": items([8] * 3), "val": items([8] * 3), "test": items([2] * 3)}
    few = splits.make_setting(table, official, "fewshot", seed=1)  # K defaults to 4
    assert set(few) == {"train", "val", "test"}
    assert Counter(label for _, label in few["train"]) == {0: 4, 1: 4, 2: 4}
    assert Counter(label for _, label in splits.make_setting(table, official, "fewshot", 16, 1)["val"]) == {0: 4, 1: 4, 2: 4}
    assert splits.make_setting(table, official, "all") == official
    with pytest.raises(ValueError, match="missing"):
        splits.make_setting(table, {"train": official["train"], "test": official["test"]}, "all")
    with pytest.raises(ValueError):
        splits.make_setting(table, official, "zero_shot")


def test_mix_is_proportional_and_keeps_the_dataset_field():
    cub = [{"image": f"c{i}", "label": "x", "dataset": "cub"} for i in range(60)]
    cars = [{"image": f"k{i}", "label": "y", "dataset": "cars"} for i in range(30)]
    everything = splits.mix([cub, cars], seed=1)
    assert Counter(r["dataset"] for r in everything) == {"cub": 60, "cars": 30}
    assert everything[:60] != cub  # shuffled
    capped = splits.mix([cub, cars], size=30, seed=1)
    assert Counter(r["dataset"] for r in capped) == {"cub": 20, "cars": 10}
    assert capped == splits.mix([cub, cars], size=30, seed=1)
