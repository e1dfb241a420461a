"""The toy world: hierarchy, look-alikes, the base/novel split, images, derived files, determinism."""

import colorsys
import os
import re
from collections import Counter

import numpy as np
import pytest

from data import splits, toy
from data.prompts import LETTERS, mcq_question, open_question, open_world_question
from data.records import class_names, load_classes, read_records

SMALL = dict(train_per_class=3, val_per_class=1, test_per_class=2, pretrain_per_class=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The default 64-class world with few images per class, generated once for this module."""
    out = tmp_path_factory.mktemp("toy")
    toy.generate(str(out), seed=0, **SMALL)
    table = load_classes(out)
    files = {f[:-6]: read_records(out / f, check_images=True, known_labels=set(class_names(table)))
             for f in os.listdir(out) if f.endswith(".jsonl")}
    return out, table, files


def test_classes_hierarchy_and_names():
    classes = toy.make_world()
    assert len(classes) == 64 and len({c["name"] for c in classes}) == 64
    for c in classes:
        a = c["attributes"]
        assert c["name"] == f"{a['pattern']} {a['colour']} {a['shape']}"
        assert c["parents"] == [a["shape"], f"{a['colour']} {a['shape']}"]
        assert c["aliases"] == [f"{a['colour']} {a['pattern']} {a['shape']}"]
    striped_red_triangle = next(c for c in classes if c["name"] == "striped red triangle")
    assert striped_red_triangle["parents"] == ["triangle", "red triangle"]


def test_epithet_names_hide_the_pattern_behind_a_word_that_depends_on_the_colour():
    plain, named = toy.make_world(), toy.make_world(names="epithets")
    assert len({c["name"] for c in named}) == 64
    for p, c in zip(plain, named):  # same classes, split and hierarchy; only the pattern word differs
        assert {k: p[k] for k in ("id", "parents", "base", "attributes")} == {k: c[k] for k in ("id", "parents", "base", "attributes")}
        epithet, rest = c["name"].split(" ", 1)
        assert epithet in toy.EPITHETS and rest == f"{c['attributes']['colour']} {c['attributes']['shape']}"
        assert c["aliases"] == [f"{c['attributes']['colour']} {epithet} {c['attributes']['shape']}"]
        assert not set(c["name"].split()) & set(toy.PATTERNS)
    by_parent = {}
    for c in named:
        by_parent.setdefault(c["parents"][1], []).append(c["name"].split()[0])
    assert all(len(set(words)) == 4 for words in by_parent.values())  # a permutation within each colour+shape
    meaning = {}  # (epithet, colour) -> pattern: one meaning whatever the shape
    for c in named:
        a = c["attributes"]
        assert meaning.setdefault((c["name"].split()[0], a["colour"]), a["pattern"]) == a["pattern"]
    meanings = {}
    for c in named:
        meanings.setdefault(c["name"].split()[0], set()).add(c["attributes"]["pattern"])
    assert all(len(m) >= 3 for m in meanings.values())  # no epithet stands for one pattern
    with pytest.raises(ValueError, match="toy names"):
        toy.make_world(names="latin")


def test_epithet_world_files(tmp_path):
    toy.generate(str(tmp_path), seed=0, names="epithets", **SMALL)
    table = load_classes(tmp_path)
    assert table["config"]["names"] == "epithets"
    names = set(class_names(table))
    mcq = read_records(tmp_path / "test_mcq.jsonl", known_labels=names)
    assert mcq and all(set(r["options"]) <= names and len(r["options"]) == 8 for r in mcq)
    sft = read_records(tmp_path / "sft.jsonl", known_labels=names)
    assert all(r["target"].endswith(f"<answer>{r['label']}</answer>") for r in sft)


def test_lookalikes_differ_in_one_attribute():
    classes = toy.make_world()
    for c in classes:
        near = toy.lookalikes(c, classes)
        assert len(near) == 9  # 3 other values for each of 3 attributes
        for n in near:
            assert sum(n["attributes"][k] != c["attributes"][k] for k in ("shape", "colour", "pattern")) == 1


def test_split_follows_the_cocoop_rule_and_novel_classes_are_new_combinations():
    classes = toy.make_world()
    assert {c["id"] for c in classes if c["base"]} == splits.base_ids(64)
    base = [c for c in classes if c["base"]]
    for first, second in (("shape", "colour"), ("shape", "pattern"), ("colour", "pattern")):
        every = {(c["attributes"][first], c["attributes"][second]) for c in classes}
        seen = {(c["attributes"][first], c["attributes"][second]) for c in base}
        assert seen == every  # every attribute value and every pair of values appears in some base class
    for c in base:  # TAPO negatives and test MCQs need base look-alikes of every base class
        near_base = [n for n in toy.lookalikes(c, classes) if n["base"]]
        assert {k for n in near_base for k in ("shape", "colour", "pattern")
                if n["attributes"][k] != c["attributes"][k]} == {"shape", "colour", "pattern"}


def test_other_sizes():
    classes = toy.make_world(3, 5, 4)
    assert len(classes) == 60 and sum(c["base"] for c in classes) == 30
    assert {c["id"] for c in classes if c["base"]} == splits.base_ids(60)
    with pytest.raises(ValueError, match="2..6 shapes"):
        toy.make_world(1, 4, 4)


def _fill_hue(image):
    """Median hue (degrees) of the strongly saturated pixels: the shape's fill. Backgrounds and inks
    are grey-ish, and blending a fill with white or black ink changes its lightness, not its hue."""
    pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3) / 255
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    return np.median(hsv[hsv[:, 1] > 0.45, 0]) * 360


def _hue(rgb):
    return colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0] * 360


def test_images_show_their_colour_and_vary_within_a_class():
    classes = toy.make_world()
    for c in classes:
        images = [toy.render(c["attributes"], np.random.default_rng([7, c["id"], k])) for k in range(2)]
        assert images[0].size == (56, 56) and images[0].mode == "RGB"
        assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
        for image in images:
            hue = _fill_hue(image)
            nearest = min(toy.COLOURS, key=lambda name: min(abs(_hue(toy.COLOURS[name]) - hue),
                                                            360 - abs(_hue(toy.COLOURS[name]) - hue)))
            assert nearest == c["attributes"]["colour"], (c["name"], hue)


def _edge_density(image):
    """Share of neighbouring pixel pairs with a strong step: outlines only for a solid shape, many more
    for a pattern (pixel noise alone never reaches the threshold)."""
    x = np.asarray(image, dtype=int)
    return ((np.abs(x[:, 1:] - x[:, :-1]).sum(-1) > 120).mean() + (np.abs(x[1:] - x[:-1]).sum(-1) > 120).mean()) / 2


def test_patterns_are_visible():
    for shape in toy.SHAPES[:4]:
        for colour in list(toy.COLOURS)[:4]:
            density = {}
            for pattern in toy.PATTERNS[:4]:
                attributes = {"shape": shape, "colour": colour, "pattern": pattern}
                density[pattern] = np.mean([_edge_density(toy.render(attributes, np.random.default_rng([3, k])))
                                            for k in range(3)])
            assert min(density["striped"], density["dotted"], density["checked"]) > 2 * density["solid"], (shape, colour)


def test_a_blank_image_shows_no_shape():
    for k in range(3):
        pixels = np.asarray(toy.blank(np.random.default_rng([5, k])), dtype=float)
        solid = toy.render({"shape": "square", "colour": "red", "pattern": "solid"}, np.random.default_rng([5, k]))
        assert pixels.std(axis=(0, 1)).max() < 10 < np.asarray(solid, dtype=float).std(axis=(0, 1)).max()
        assert _edge_density(toy.blank(np.random.default_rng([5, k]))) < _edge_density(solid)


def test_world_files_and_counts(world):
    out, table, files = world
    assert table["dataset"] == "toy" and table["domain"] == "shape" and len(table["classes"]) == 64
    assert set(files) == {"train", "val", "test_base", "test_novel", "sft", "sft_cot", "pretrain", "triplets", "test_mcq"}
    base, novel = set(class_names(table, "base")), set(class_names(table, "novel"))
    assert Counter(r["label"] for r in files["train"]) == {name: 3 for name in base}
    assert {r["label"] for r in files["val"]} == base
    assert Counter(r["label"] for r in files["test_base"]) == {name: 2 for name in base}
    assert Counter(r["label"] for r in files["test_novel"]) == {name: 2 for name in novel}
    record = files["train"][0]
    assert record["image"].startswith(str(out / "images")) and record["dataset"] == "toy"
    assert record["parents"] == ["circle", "red circle"]
    assert all(r["image"].endswith(".png") for r in files["test_novel"])


def test_sft_targets(world):
    _, _, files = world
    assert [r["image"] for r in files["sft"]] == [r["image"] for r in files["train"]]
    assert {r["question"] for r in files["sft"]} == {open_question("toy"), open_world_question("toy")}
    for r in files["sft"]:
        shape, colour_shape = r["parents"]
        colour = colour_shape.split()[0]
        pattern = r["label"].split()[0]
        assert r["target"] == (f"<think>shape: {shape}. colour: {colour}. pattern: {pattern}.</think>"
                               f"<answer>{r['label']}</answer>")


def test_cot_targets_follow_the_fine_r1_format(world):
    _, table, files = world
    base = set(class_names(table, "base"))
    by_name = {c["name"]: c["attributes"] for c in table["classes"]}
    assert [r["image"] for r in files["sft_cot"]] == [r["image"] for r in files["train"]]
    assert [r["question"] for r in files["sft_cot"][:3]] == [  # the five wordings the toy comparison asks, in turn
        open_question("toy"), open_question("toy", class_names(table, "base")), open_world_question("toy")]
    sizes = Counter(len(r["options"]) for r in files["sft_cot"][4::5])
    assert set(sizes) <= {2, 3, 4, 5} and len(sizes) >= 3, sizes  # the two-step's MCQs: 2-5 options, varied
    for i, r in enumerate(files["sft_cot"]):
        assert ("options" in r) == (i % 5 in (3, 4))
        think, answer = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", r["target"], re.S).groups()
        assert answer == r["label"]
        a = by_name[r["label"]]
        assert think.startswith(f"Visual analysis: {a['shape']}, {a['colour']}, {a['pattern']}.\nCandidates compared: ")
        compared = re.search(r"Candidates compared: (.*)\.\n", think).group(1).split("; ")
        candidates = [c.split(": ")[0] for c in compared]
        assert r["label"] in candidates and 2 <= len(candidates) <= 5
        assert set(candidates) <= base or "options" in r  # an MCQ's options may be novel classes
        for name, text in zip(candidates, compared):  # what rules a look-alike out: for an epithet, its meaning
            wrong = [k for k in toy.ATTRIBUTES if by_name[name][k] != a[k]]
            assert text == f"{name}: {by_name[name][wrong[0]] if wrong else 'matches'}"
        assert think.endswith(f"Prediction: {r['label']}.")
        if i % 5 == 4:  # the two-step's MCQ: the class and base look-alikes, each option compared, in order
            assert candidates == r["options"] and r["question"] == mcq_question("toy", r["options"])
            assert set(candidates) <= base  # in this world every base class has base look-alikes
            assert all(sum(by_name[n][k] != a[k] for k in toy.ATTRIBUTES) == 1 for n in candidates if n != r["label"])
            assert r["options"][LETTERS.index(r["answer"])] == r["label"]
        elif "options" in r:  # the held-out MCQ's cube; the candidates: the options one attribute away, in order
            assert len(r["options"]) == 8 and r["question"] == mcq_question("toy", r["options"])
            assert candidates == [n for n in r["options"]
                                  if sum(by_name[n][k] != a[k] for k in toy.ATTRIBUTES) <= 1] and len(candidates) == 4
            assert r["options"][LETTERS.index(r["answer"])] == r["label"]


def test_pretrain_covers_all_classes_and_never_asks_for_a_name_openly(world):
    _, table, files = world
    names = set(class_names(table))
    pretrain = files["pretrain"]
    assert {r["label"] for r in pretrain} == names  # novel classes too
    assert Counter(r["task"] for r in pretrain) == {"shape": 128, "colour": 128, "pattern": 128, "mcq": 128}
    test_images = {r["image"] for s in ("test_base", "test_novel") for r in files[s]}
    train_images = {r["image"] for r in files["train"]}
    assert not {r["image"] for r in pretrain} & (test_images | train_images)
    by_class = {c["name"]: c["attributes"] for c in table["classes"]}
    for r in pretrain:
        answer = re.search(r"<answer>(.*)</answer>", r["target"]).group(1)
        if r["task"] == "mcq":  # a name only ever answers a question that lists it
            assert 3 <= len(r["options"]) <= 5 and r["label"] in r["options"]
            assert r["answer"] == LETTERS[r["options"].index(r["label"])] and answer == r["label"]
            assert r["question"] == mcq_question("toy", r["options"])
        else:
            assert not any(name in r["target"] for name in names)
            assert answer == by_class[r["label"]][r["task"]]


def test_pretrain_naming_asks_the_mining_question_with_the_true_class_listed(tmp_path):
    toy.generate(str(tmp_path), seed=0, names="epithets", pretrain_naming=True, **SMALL)
    table = load_classes(tmp_path)
    assert table["config"]["pretrain_naming"] is True
    by_name = {c["name"]: c for c in table["classes"]}
    pretrain = read_records(tmp_path / "pretrain.jsonl", known_labels=set(by_name))
    assert Counter(r["task"] for r in pretrain)["open_list"] == 128  # one per pretrain image
    sizes = set()
    for r in (r for r in pretrain if r["task"] == "open_list"):
        listed = r["question"].split("Choose one of: ")[1].split(". First think")[0].split(", ")
        assert r["label"] in listed and len(set(listed)) == len(listed) and set(listed) <= set(by_name)
        assert [by_name[n]["id"] for n in listed] == sorted(by_name[n]["id"] for n in listed)  # id order, as mined
        assert r["question"] == open_question("toy", listed)
        assert r["target"].endswith(f"<answer>{r['label']}</answer>")
        sizes.add(len(listed))
    n_base = len(class_names(table, "base"))  # the mining prompt lists the base classes: never more
    assert min(sizes) >= 2 and max(sizes) <= n_base and len(sizes) > 10
    # without the flag (the default world) no pretraining question names a class openly: tested above


def test_naming_confusions_mix_up_epithets_of_one_colour_for_every_shape():
    classes = toy.make_world(names="epithets")
    confused = toy.naming_confusions(classes, 6, seed=0)
    pairs = {(c["attributes"]["colour"], c["attributes"]["pattern"]) for c in classes if c["id"] in confused}
    assert len(pairs) == 6 and len(confused) == 6 * 4  # every shape of a confused (colour, pattern) pair
    for c in classes:
        if c["id"] in confused:
            said = confused[c["id"]]
            assert [k for k in toy.ATTRIBUTES if said["attributes"][k] != c["attributes"][k]] == ["pattern"]
    assert any(c["base"] != confused[c["id"]]["base"] for c in classes if c["id"] in confused)  # other split too
    assert confused != toy.naming_confusions(classes, 6, seed=1)  # each world its own


def test_a_confused_start_names_look_alikes_but_learns_what_the_names_mean(tmp_path):
    toy.generate(str(tmp_path), seed=0, names="epithets", pretrain_naming=True, confused_pairs=6, confusion=0.7,
                 **dict(SMALL, pretrain_per_class=16))
    table = load_classes(tmp_path)
    by_name = {c["name"]: c for c in table["classes"]}
    confused = toy.naming_confusions(table["classes"], 6, seed=0)

    pretrain = read_records(tmp_path / "pretrain.jsonl", known_labels=set(by_name))
    said_other = Counter()
    for r in pretrain:
        truth = by_name[r["label"]]
        answer = re.search(r"<answer>(.*)</answer>", r["target"]).group(1)
        if r["task"] == "open_list":  # the rationale is true; the name is the look-alike's, for confused classes
            assert r["target"].startswith(toy.short_target(truth).split("<answer>")[0])
            assert answer in r["question"].split("Choose one of: ")[1]  # the name said is among those listed
            if answer != truth["name"]:
                assert truth["id"] in confused and by_name[answer] is confused[truth["id"]]
            said_other[truth["id"] in confused] += answer != truth["name"]
        elif r["task"] == "meaning":  # a class's pattern, over a blank image
            assert r["question"] == toy.MEANING_QUESTION.format(name=r["label"])
            assert answer == truth["attributes"]["pattern"] and "/blank_pretrain/" in r["image"]
        else:  # attribute questions and MCQs stay right
            assert answer in (truth["name"], *truth["attributes"].values())
    n_confused = 16 * 24  # 16 images of each of 24 confused classes
    assert said_other[False] == 0 and abs(said_other[True] / n_confused - 0.7) < 0.08
    probe = read_records(tmp_path / "probe.jsonl", known_labels=set(by_name))
    assert Counter(r["label"] for r in probe) == Counter({n: 4 for n in by_name})
    for r in probe:  # a blank image never trained on: only knowledge of the name answers it
        assert "/blank_test/" in r["image"] and r["expected"] == by_name[r["label"]]["attributes"]["pattern"]
    assert {r["image"] for r in pretrain if r["task"] == "meaning"}.isdisjoint(r["image"] for r in probe)
    with pytest.raises(ValueError, match="confusion"):
        toy.generate(str(tmp_path / "bad"), names="epithets", pretrain_naming=True, confused_pairs=0,
                     confusion=0.5, **SMALL)


def test_a_hedging_start_says_the_parent_in_the_open_world_wording(tmp_path):
    """--hedge: half the naming questions in SpeciaRL's open-world wording, the parent ("red circle") a
    hedge share of those answers, the (possibly confused) name otherwise; the listed wording never hedges."""
    toy.generate(str(tmp_path), seed=0, names="epithets", pretrain_naming=True, confused_pairs=6, confusion=0.7,
                 hedge=0.6, **dict(SMALL, pretrain_per_class=16))
    table = load_classes(tmp_path)
    by_name = {c["name"]: c for c in table["classes"]}
    confused = toy.naming_confusions(table["classes"], 6, seed=0)
    said = Counter()
    for r in read_records(tmp_path / "pretrain.jsonl", known_labels=set(by_name)):
        truth = by_name[r["label"]]
        answer = re.search(r"<answer>(.*)</answer>", r["target"]).group(1)
        if r["task"] == "open_world":
            assert r["question"] == open_world_question("toy")
            assert r["target"].startswith(toy.short_target(truth).split("<answer>")[0])  # a true rationale
            kind = ("parent" if answer == truth["parents"][-1] else "name" if answer == truth["name"]
                    else "look-alike" if by_name[answer] is confused.get(truth["id"]) else "other")
            said[kind] += 1
        elif r["task"] == "open_list":
            assert answer in (truth["name"], confused.get(truth["id"], truth)["name"])
        said[r["task"]] += 1
    n = 64 * 16  # pretraining images, each with one naming question
    assert said["other"] == 0 and said["open_world"] + said["open_list"] == n
    assert abs(said["open_world"] / n - 0.5) < 0.05 and abs(said["parent"] / said["open_world"] - 0.6) < 0.06
    assert said["look-alike"] > 0  # a named answer is the naming habit, confusion included
    with pytest.raises(ValueError, match="hedge"):
        toy.generate(str(tmp_path / "bad"), names="epithets", hedge=0.5, **SMALL)


def test_cot_per_class_keeps_the_first_images_of_each_class(tmp_path, world):
    _, table, files = world
    few = toy.generate(str(tmp_path), seed=0, cot_per_class=2, **SMALL)["sft_cot"]
    first = {}
    for r in files["train"]:
        first.setdefault(r["label"], []).append(os.path.basename(r["image"]))
    assert Counter(r["label"] for r in few) == Counter({n: 2 for n in class_names(table, "base")})
    by_label = Counter()
    for r in few:  # the training order, the first two images of each class
        assert os.path.basename(r["image"]) == first[r["label"]][by_label[r["label"]]]
        by_label[r["label"]] += 1


def test_triplets(world):
    _, table, files = world
    by_name = {c["name"]: c for c in table["classes"]}
    train_label = {r["image"]: r["label"] for r in files["train"]}
    assert len(files["triplets"]) == len(files["train"])
    for r in files["triplets"]:
        assert train_label[r["positive"]] == r["label"] and r["positive"] != r["image"]
        assert train_label[r["negative"]] == r["negative_label"]
        negative = by_name[r["negative_label"]]
        assert negative["base"] and negative in toy.lookalikes(by_name[r["label"]], table["classes"])


def test_test_mcq(world):
    _, table, files = world
    by_name = {c["name"]: c for c in table["classes"]}
    assert [r["image"] for r in files["test_mcq"]] == [r["image"] for r in files["test_base"]]
    letters = Counter()
    for r in files["test_mcq"]:
        options = r["options"]
        assert len(options) == 8 and len(set(options)) == 8
        assert options[LETTERS.index(r["answer"])] == r["label"]
        assert r["question"] == mcq_question("toy", options)
        attrs = [by_name[o]["attributes"] for o in options]
        # a cube: two values per attribute, every combination once
        assert all(len({x[k] for x in attrs}) == 2 for k in toy.ATTRIBUTES)
        # and every option sits in it alike, so no rule over the options' text can find the answer:
        # each has 3 options one attribute away, 3 two away, 1 three away
        for x in attrs:
            distances = sorted(sum(x[k] != y[k] for k in toy.ATTRIBUTES) for y in attrs if y is not x)
            assert distances == [1, 1, 1, 2, 2, 2, 3]
        letters[r["answer"]] += 1
    assert len(letters) == 8  # the true option is not always in the same place


def test_same_seed_same_bytes(tmp_path):
    sizes = dict(n_shapes=2, n_colours=2, n_patterns=2, train_per_class=2, val_per_class=1, test_per_class=1,
                 pretrain_per_class=1)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        toy.generate(str(tmp_path / name), seed=seed, **sizes)
    names = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".jsonl") or f == "classes.json")
    assert len(names) == 10
    for f in names:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    image = "images/train/00_solid_red_circle_000.png"
    assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()


def test_prepare_toy_command(tmp_path, capsys):
    from data import prepare
    prepare.main(["toy", "--out", str(tmp_path / "toy"), "--shapes", "2", "--colours", "3", "--patterns", "2",
                  "--size", "32", "--train_per_class", "2", "--test_per_class", "1", "--pretrain_per_class", "1",
                  "--check"])
    out = capsys.readouterr().out
    assert "toy: 12 classes (6 base, 6 novel)" in out and "every image opened" in out
    train = read_records(tmp_path / "toy" / "train.jsonl")
    assert len(train) == 12
    from data.records import load_image
    assert load_image(train[0]["image"]).size == (32, 32)
    with pytest.raises(ValueError, match="at most 112"):
        toy.generate(str(tmp_path / "big"), size=128)
