"""Loaders and `python -m data.prepare` on fake copies of each dataset layout, quirks included.

Every layout is built in a temporary folder from a handful of PIL-drawn images and hand-written index
files; nothing is downloaded.
"""

import json
import os

import pytest
from PIL import Image

from data import loaders, prepare
from data.records import RecordError, load_classes, read_records, write_records


def jpg(path, colour=(120, 60, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, "JPEG")


def text(path, body):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(body)
    return path


# ----------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Brewer_Blackbird", "003.Artic_Tern", "004.Nelson_Sharp_tailed_Sparrow"]


def make_cub(root, per_class=6):
    """CUB_200_2011 with the capitalisation quirk: folder '001.Black_footed_Albatross' holds files
    'Black_Footed_Albatross_*.jpg'. The last image of each class is a test image."""
    root = root / "CUB_200_2011"
    images, labels, split = [], [], []
    for c, folder in enumerate(CUB_CLASSES, start=1):
        stem = folder.split(".", 1)[1].title()  # Black_Footed_Albatross: not the folder's capitalisation
        for k in range(per_class):
            image_id = len(images) + 1
            rel = f"{folder}/{stem}_{k:04d}_{image_id}.jpg"
            jpg(root / "images" / rel, (40 * c, 10 * k, 90))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(k < per_class - 1)}")
    text(root / "classes.txt", "".join(f"{i} {name}\n" for i, name in enumerate(CUB_CLASSES, start=1)))
    text(root / "images.txt", "\n".join(images) + "\n")
    text(root / "image_class_labels.txt", "\n".join(labels) + "\n")
    text(root / "train_test_split.txt", "\n".join(split) + "\n")
    return root


def test_cub_records_names_and_aliases(tmp_path):
    root = make_cub(tmp_path)
    classes, splits = loaders.load_cub(tmp_path)  # the folder above CUB_200_2011 works too
    assert [c["name"] for c in classes] == ["Black footed Albatross", "Brewer Blackbird", "Artic Tern",
                                             "Nelson Sharp tailed Sparrow"]
    assert "Black-footed Albatross" in classes[0]["aliases"] and "001.Black_footed_Albatross" in classes[0]["aliases"]
    assert "Brewer's Blackbird" in classes[1]["aliases"]
    assert "Arctic Tern" in classes[2]["aliases"]
    assert "Nelson's Sharp-tailed Sparrow" in classes[3]["aliases"]
    assert all(c["parents"] == [] for c in classes)
    assert len(splits["train"]) == 20 and len(splits["test"]) == 4 and "val" not in splits
    image, label = splits["train"][0]
    assert label == 0 and os.path.exists(image) and "Black_Footed_Albatross_0000" in image
    assert image.startswith(str(root))


def test_cub_class_comes_from_the_label_file_not_the_file_name(tmp_path):
    root = make_cub(tmp_path)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    lines[0] = "1 3"  # image 1 sits in the albatross folder, but the label file says tern
    (root / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    _, splits = loaders.load_cub(root)
    assert splits["train"][0][1] == 2


def test_cub_bad_index_files_name_file_and_line(tmp_path):
    root = make_cub(tmp_path)
    labels = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(labels[:-1]) + "\n")  # last image has no label
    with pytest.raises(RecordError, match=r"images.txt:24: image id 24 has no line in .*image_class_labels.txt"):
        loaders.load_cub(root)
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2\n")
    with pytest.raises(RecordError, match=r"classes.txt:2: expected"):
        loaders.load_cub(root)
    os.remove(root / "train_test_split.txt")
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        loaders.load_cub(root)


def test_taxonomy_file_sets_parents_and_aliases(tmp_path):
    classes, _ = loaders.load_cub(make_cub(tmp_path))
    path = text(tmp_path / "taxonomy.txt",
                "# order > family > genus | scientific name\n\n"
                "001.Black_footed_Albatross | Procellariiformes > Diomedeidae > Phoebastria | Phoebastria nigripes\n"
                "brewer blackbird | Passeriformes > Icteridae > Euphagus\n")
    loaders.apply_taxonomy(classes, path)
    assert classes[0]["parents"] == ["Procellariiformes", "Diomedeidae", "Phoebastria"]
    assert "Phoebastria nigripes" in classes[0]["aliases"] and "Black-footed Albatross" in classes[0]["aliases"]
    assert classes[1]["parents"] == ["Passeriformes", "Icteridae", "Euphagus"]
    assert classes[2]["parents"] == []
    text(path, "Brewer Blackbird | Icteridae\nDodo | Columbiformes\n")
    with pytest.raises(RecordError, match=r"taxonomy.txt:2: unknown class 'Dodo'"):
        loaders.apply_taxonomy(classes, path)


# ----------------------------------------------------------------------------------------------
# FGVC-Aircraft

AIRCRAFT = [  # variant, family, manufacturer
    ("737-800", "Boeing 737", "Boeing"), ("A320", "A320", "Airbus"), ("F/A-18", "F/A-18", "McDonnell Douglas"),
    ("Cessna 172", "Cessna 172", "Cessna"), ("Falcon 2000", "Falcon 2000", "Dassault Aviation")]


def make_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"
    text(data / "variants.txt", "".join(v + "\n" for v, _, _ in AIRCRAFT))
    text(data / "families.txt", "".join(sorted({f + "\n" for _, f, _ in AIRCRAFT})))
    text(data / "manufacturers.txt", "".join(sorted({m + "\n" for _, _, m in AIRCRAFT})))
    n = 0
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        rows = {"variant": [], "family": [], "manufacturer": []}
        for variant, family, maker in AIRCRAFT:
            for _ in range(per_class):
                n += 1
                image_id = f"{1000000 + n:07d}"
                jpg(data / "images" / f"{image_id}.jpg")
                for level, name in (("variant", variant), ("family", family), ("manufacturer", maker)):
                    rows[level].append(f"{image_id} {name}\n")
        for level, lines in rows.items():
            text(data / f"images_{level}_{split}.txt", "".join(lines))
    return data


def test_aircraft_hierarchy_names_with_spaces_and_slashes(tmp_path):
    make_aircraft(tmp_path)
    classes, splits = loaders.load_aircraft(tmp_path / "fgvc-aircraft-2013b")
    by_name = {c["name"]: c for c in classes}
    assert list(by_name) == [v for v, _, _ in AIRCRAFT]
    assert by_name["737-800"]["parents"] == ["Boeing", "Boeing 737"]
    assert by_name["737-800"]["aliases"] == ["Boeing 737-800"]
    assert by_name["A320"]["parents"] == ["Airbus"] and by_name["A320"]["aliases"] == ["Airbus A320"]
    assert by_name["F/A-18"]["parents"] == ["McDonnell Douglas"]
    assert by_name["Cessna 172"]["parents"] == ["Cessna"] and by_name["Cessna 172"]["aliases"] == []
    assert by_name["Falcon 2000"]["parents"] == ["Dassault Aviation"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [10, 5, 5]
    assert [label for _, label in splits["val"]] == [0, 1, 2, 3, 4]
    assert all(os.path.exists(image) for items in splits.values() for image, _ in items)


def test_aircraft_unknown_variant_names_the_line(tmp_path):
    data = make_aircraft(tmp_path)
    with open(data / "images_variant_test.txt", "a") as f:
        f.write("1000099 Concorde\n")
    with pytest.raises(RecordError, match=r"images_variant_test.txt:6: variant 'Concorde' is not in"):
        loaders.load_aircraft(data)


# ----------------------------------------------------------------------------------------------
# Oxford-IIIT Pets

PETS = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)]  # name, species


def make_pets(root):
    root = root / "oxford-iiit-pet"
    listing = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog"]
    trainval, test = [], []
    for cid, (name, species) in enumerate(PETS, start=1):
        for k in range(1, 5):
            stem = f"{name}_{k}"
            jpg(root / "images" / f"{stem}.jpg")
            line = f"{stem} {cid} {species} {cid}"
            listing.append(line)
            (trainval if k <= 3 else test).append(line)
    text(root / "annotations" / "list.txt", "\n".join(listing) + "\n")
    text(root / "annotations" / "trainval.txt", "\n".join(trainval) + "\n")
    text(root / "annotations" / "test.txt", "\n".join(test) + "\n")
    return root


def test_pets_species_parents_and_comment_lines(tmp_path):
    make_pets(tmp_path)
    classes, splits = loaders.load_pets(tmp_path)
    assert [c["name"] for c in classes] == ["Abyssinian", "American Bulldog", "Bengal"]
    assert [c["parents"] for c in classes] == [["cat"], ["dog"], ["cat"]]
    assert "american_bulldog" in classes[1]["aliases"]
    assert len(splits["train"]) == 9 and len(splits["test"]) == 3
    assert splits["test"][1] == (str(tmp_path / "oxford-iiit-pet" / "images" / "american_bulldog_4.jpg"), 1)


def test_pets_malformed_line(tmp_path):
    root = make_pets(tmp_path)
    with open(root / "annotations" / "test.txt", "a") as f:
        f.write("Bengal_9 3 cat 3\n")
    with pytest.raises(RecordError, match=r"test.txt:4: species must be an integer"):
        loaders.load_pets(root)


# ----------------------------------------------------------------------------------------------
# CoOp split_zhou_*.json

CARS = ["2000 AM General Hummer SUV", "2012 Aston Martin V8 Vantage Convertible", "2012 Tesla Model S Sedan",
        "2007 Chevrolet Express Van"]


def make_coop(folder, file_name, names, image_dir, image_name):
    split = {}
    for s, per_class in (("train", 3), ("val", 1), ("test", 2)):
        split[s] = []
        for label, name in enumerate(names):
            for k in range(per_class):
                rel = image_name(s, label, k)
                jpg(folder / image_dir / rel)
                split[s].append([rel, label, name])
    text(folder / file_name, json.dumps(split))
    return folder


def test_coop_cars_make_parents_and_year_aliases(tmp_path):
    folder = make_coop(tmp_path / "stanford_cars", "split_zhou_StanfordCars.json", CARS, ".",
                       lambda s, label, k: f"cars_{'test' if s == 'test' else 'train'}/{s}{label:02d}{k}.jpg")
    classes, splits = loaders.load_coop(folder, "cars")
    assert [c["name"] for c in classes] == CARS
    assert [c["parents"] for c in classes] == [["AM General"], ["Aston Martin"], ["Tesla"], ["Chevrolet"]]
    assert "AM General Hummer SUV 2000" in classes[0]["aliases"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 4, 8]
    assert all(os.path.exists(image) for items in splits.values() for image, _ in items)


def test_coop_pets_finds_its_image_folder(tmp_path):
    folder = make_coop(tmp_path / "oxford_pets", "split_zhou_OxfordPets.json", ["abyssinian", "american_bulldog"],
                       "images", lambda s, label, k: f"{['Abyssinian', 'american_bulldog'][label]}_{s}{k}.jpg")
    classes, splits = loaders.load_coop(folder, "pets")
    assert [c["name"] for c in classes] == ["Abyssinian", "American Bulldog"]
    assert [c["parents"] for c in classes] == [["cat"], ["dog"]]
    assert splits["train"][0][0] == str(folder / "images" / "Abyssinian_train0.jpg")


def test_coop_inconsistent_labels_are_reported(tmp_path):
    text(tmp_path / "split_zhou_Food101.json", json.dumps(
        {"train": [["a/1.jpg", 0, "apple_pie"], ["b/1.jpg", 0, "baklava"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"train\[1\]: label 0 is 'baklava' here but 'apple_pie' before"):
        loaders.load_coop(tmp_path, "food")


# ----------------------------------------------------------------------------------------------
# DiVE-k split files

def make_divek(root):
    """DiVE-k's data/CUB_200_2011 folder; images live in a separate data root under CUB_200_2011/images."""
    names = {"base": ["Black footed Albatross", "Brewer Blackbird"], "novel": ["Artic Tern", "Nelson Sharp tailed Sparrow"]}
    images = root / "datasets"
    split_root = root / "DiVE-k" / "data" / "CUB_200_2011"

    def entries(class_names, prefix, n):
        out = []
        for name in class_names:
            for k in range(n):
                rel = f"CUB_200_2011/images/{name.replace(' ', '_')}/{prefix}_{k}.jpg"
                jpg(images / rel)
                out.append({"image_path": rel, "problem": "This is an image containing a bird. ...",
                            "solution": f"<answer>{name}.</answer>" if k % 2 == 0 else f"<answer>{name}</answer>"})
        return out

    text(split_root / "zero_shot" / "subsample_base_train.json", json.dumps(entries(names["base"], "tr", 3)))
    text(split_root / "zero_shot" / "subsample_base_val.json", json.dumps(entries(names["base"], "va", 2)))
    text(split_root / "zero_shot" / "subsample_new_val.json", json.dumps(entries(names["novel"], "nv", 2)))
    text(split_root / "zero_shot" / "all_class_to_idx.json", json.dumps(
        {"Black footed Albatross.": "1", "Brewer Blackbird.": "2", "Artic Tern.": "3", "Nelson Sharp tailed Sparrow.": "4"}))
    every = names["base"] + names["novel"]
    text(split_root / "fewshot" / "4_shots_all_train.json", json.dumps(entries(every, "fs", 4)))
    text(split_root / "fewshot" / "4_shots_all_val.json", json.dumps(entries(every, "fv", 1)))
    return split_root, images


def test_divek_strips_periods_and_keeps_its_base_novel_split(tmp_path):
    split_root, images = make_divek(tmp_path)
    classes, splits = loaders.load_divek(split_root, "base2novel", "cub", images)
    assert [c["name"] for c in classes] == ["Black footed Albatross", "Brewer Blackbird", "Artic Tern",
                                             "Nelson Sharp tailed Sparrow"]
    assert [c["base"] for c in classes] == [True, True, False, False]
    assert "Arctic Tern" in classes[2]["aliases"]
    assert len(splits["train"]) == 6 and len(splits["test"]) == 8
    assert all(os.path.exists(image) for items in splits.values() for image, _ in items)
    assert {label for _, label in splits["train"]} == {0, 1}

    _, few = loaders.load_divek(split_root, "fewshot", "cub", images)
    assert len(few["train"]) == 16 and len(few["test"]) == 4


def test_divek_image_paths_are_found_under_the_images_folder(tmp_path):
    split_root, images = make_divek(tmp_path)
    data = json.loads((split_root / "zero_shot" / "subsample_base_train.json").read_text())
    data[0]["image_path"] = "/home/someone/" + data[0]["image_path"]  # absolute on the authors' machine
    text(split_root / "zero_shot" / "subsample_base_train.json", json.dumps(data))
    _, splits = loaders.load_divek(split_root, "base2novel", "cub", images)
    assert splits["train"][0][0] == str(images / "CUB_200_2011/images/Black_footed_Albatross/tr_0.jpg")


# ----------------------------------------------------------------------------------------------
# a user's own data

def test_folder_layout_and_manifest(tmp_path):
    for name in ("zebra_finch", "Alder Flycatcher"):
        for k in range(5):
            jpg(tmp_path / "birds" / name / f"{k}.jpg")
    (tmp_path / "birds" / "zebra_finch" / "notes.txt").write_text("not an image")
    classes, splits = loaders.load_folder(tmp_path / "birds")
    assert [c["name"] for c in classes] == ["Alder Flycatcher", "zebra finch"]
    assert len(splits["train"]) == 10 and set(splits) == {"train"}

    manifest = tmp_path / "manifest.jsonl"
    rows = [{"image": f"birds/zebra_finch/{k}.jpg", "label": "zebra finch", "split": "test" if k == 4 else "train"}
            for k in range(5)] + [{"image": "birds/Alder Flycatcher/0.jpg", "label": "Alder Flycatcher",
                                   "aliases": ["Empidonax alnorum"]}]
    text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    classes, splits = loaders.load_manifest(manifest)
    assert [c["name"] for c in classes] == ["Alder Flycatcher", "zebra finch"]
    assert classes[0]["aliases"] == ["Empidonax alnorum"]
    assert len(splits["train"]) == 5 and len(splits["test"]) == 1
    assert os.path.exists(splits["test"][0][0])
    with open(manifest, "a") as f:
        f.write(json.dumps({"image": "x.jpg", "label": "zebra finch", "split": "holdout"}) + "\n")
    with pytest.raises(RecordError, match=r"manifest.jsonl:7: split must be train, val or test"):
        loaders.load_manifest(manifest)


# ----------------------------------------------------------------------------------------------
# official .mat files (only with scipy)

def test_flowers_and_cars_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    import numpy as np
    flowers = tmp_path / "oxford_flowers"
    for i in range(1, 7):
        jpg(flowers / "jpg" / f"image_{i:05d}.jpg")
    os.makedirs(flowers, exist_ok=True)
    scipy_io.savemat(flowers / "imagelabels.mat", {"labels": np.array([[1, 1, 1, 2, 2, 2]])})
    scipy_io.savemat(flowers / "setid.mat", {"trnid": np.array([[1, 4]]), "valid": np.array([[2, 5]]),
                                             "tstid": np.array([[3, 6]])})
    text(flowers / "cat_to_name.json", json.dumps({"1": "pink primrose", "2": "globe thistle"}))
    classes, splits = loaders.load_flowers_mat(flowers)
    assert [c["name"] for c in classes] == ["pink primrose", "globe thistle"]
    assert splits["train"] == [(str(flowers / "jpg" / "image_00001.jpg"), 0), (str(flowers / "jpg" / "image_00004.jpg"), 1)]

    cars = tmp_path / "stanford_cars"
    os.makedirs(cars / "devkit")
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "AM General Hummer SUV 2000", "Tesla Model S Sedan 2012"
    scipy_io.savemat(cars / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, file in (("train", cars / "devkit" / "cars_train_annos.mat"), ("test", cars / "cars_test_annos_withlabels.mat")):
        annos = np.array([("00001.jpg", 1), ("00002.jpg", 2)], dtype=[("fname", object), ("class", object)])
        scipy_io.savemat(file, {"annotations": annos[None, :]})
    classes, splits = loaders.load_cars_mat(cars)
    assert [c["name"] for c in classes] == ["2000 AM General Hummer SUV", "2012 Tesla Model S Sedan"]
    assert classes[1]["parents"] == ["Tesla"] and "Tesla Model S Sedan 2012" in classes[1]["aliases"]
    assert splits["test"] == [(str(cars / "cars_test" / "00001.jpg"), 0), (str(cars / "cars_test" / "00002.jpg"), 1)]


# ----------------------------------------------------------------------------------------------
# python -m data.prepare

def test_prepare_cub_base2novel_few_shot(tmp_path, capsys):
    make_cub(tmp_path)
    out = tmp_path / "out"
    prepare.main(["cub", "--root", str(tmp_path / "CUB_200_2011"), "--out", str(out), "--setting", "base2novel",
                  "--shots", "2", "--seed", "1"])
    printed = capsys.readouterr().out
    assert "4 classes (2 base, 2 novel)" in printed and "test_novel.jsonl" in printed
    table = load_classes(out)
    assert table["dataset"] == "cub" and table["domain"] == "bird"
    assert [c["base"] for c in table["classes"]] == [True, True, False, False]
    files = {s: read_records(out / f"{s}.jsonl", check_images=True) for s in ("train", "val", "test_base", "test_novel")}
    assert [len(files[s]) for s in ("train", "val", "test_base", "test_novel")] == [4, 4, 2, 2]
    assert {r["label"] for r in files["train"]} == {"Black footed Albatross", "Brewer Blackbird"}
    assert {r["label"] for r in files["test_novel"]} == {"Artic Tern", "Nelson Sharp tailed Sparrow"}
    record = files["train"][0]
    assert record["dataset"] == "cub" and record["split"] == "train" and "Black-footed Albatross" in record["aliases"]
    # val is carved from train (CUB has none): never the same image
    assert not {r["image"] for r in files["train"]} & {r["image"] for r in files["val"]}


def test_prepare_is_deterministic_per_seed(tmp_path):
    make_cub(tmp_path, per_class=9)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2), ("d", 3)):
        prepare.main(["cub", "--root", str(tmp_path), "--out", str(tmp_path / name), "--setting", "fewshot",
                      "--shots", "2", "--seed", str(seed)])
        runs[name] = (tmp_path / name / "train.jsonl").read_bytes()
    assert runs["a"] == runs["b"]
    assert runs["c"] != runs["a"] or runs["d"] != runs["a"]
    assert len(read_records(tmp_path / "a" / "test.jsonl")) == 4


def test_prepare_aircraft_all_and_pets_with_taxonomy(tmp_path):
    make_aircraft(tmp_path)
    prepare.main(["aircraft", "--root", str(tmp_path / "fgvc-aircraft-2013b"), "--out", str(tmp_path / "air"),
                  "--setting", "all"])
    test = read_records(tmp_path / "air" / "test.jsonl")
    assert len(test) == 5 and test[0]["parents"] == ["Boeing", "Boeing 737"]
    assert len(read_records(tmp_path / "air" / "val.jsonl")) == 5  # the official val, not carved

    make_pets(tmp_path)
    tax = text(tmp_path / "pets_taxonomy.txt", "Abyssinian | animal > cat | Abyssinian cat\n")
    prepare.main(["pets", "--root", str(tmp_path / "oxford-iiit-pet"), "--out", str(tmp_path / "pets"),
                  "--taxonomy", str(tax)])
    classes = load_classes(tmp_path / "pets")["classes"]
    assert classes[0]["parents"] == ["animal", "cat"] and "Abyssinian cat" in classes[0]["aliases"]
    assert classes[1]["parents"] == ["dog"]


def test_prepare_divek_writes_the_files_split(tmp_path):
    split_root, images = make_divek(tmp_path)
    prepare.main(["divek", "--root", str(split_root), "--images", str(images), "--out", str(tmp_path / "out")])
    test_base = read_records(tmp_path / "out" / "test_base.jsonl", check_images=True)
    test_novel = read_records(tmp_path / "out" / "test_novel.jsonl", check_images=True)
    assert len(test_base) == 4 and len(test_novel) == 4 and test_base[0]["dataset"] == "cub"
    assert len(read_records(tmp_path / "out" / "train.jsonl")) == 6


def test_prepare_check_reports_bad_images_with_file_and_line(tmp_path, capsys):
    root = make_cub(tmp_path)
    (root / "images" / CUB_CLASSES[0] / "Black_Footed_Albatross_0001_2.jpg").write_bytes(b"\xff\xd8 broken")
    args = ["cub", "--root", str(root), "--out", str(tmp_path / "out"), "--setting", "all", "--check"]
    with pytest.raises(SystemExit, match="1 bad record"):
        prepare.main(args)
    err = capsys.readouterr().err
    train = read_records(tmp_path / "out" / "train.jsonl")
    line = next(r["_src"] for r in train if "_0001_2.jpg" in r["image"])
    assert f"bad record: {line}: field 'image': " in err and "Black_Footed_Albatross_0001_2.jpg" in err

    prepare.main(args + ["--skip_bad"])
    assert "dropped 1 bad record(s)" in capsys.readouterr().err
    assert len(read_records(tmp_path / "out" / "train.jsonl", check_images=True)) == len(train) - 1

    with pytest.raises(SystemExit):  # the check subcommand on a prepared folder, after the image broke again
        (root / "images" / CUB_CLASSES[1] / "Brewer_Blackbird_0000_7.jpg").write_bytes(b"")
        prepare.main(["check", str(tmp_path / "out")])
    assert "Brewer_Blackbird_0000_7.jpg" in capsys.readouterr().err


def test_prepare_mix_keeps_each_dataset(tmp_path):
    make_cub(tmp_path)
    make_pets(tmp_path)
    prepare.main(["cub", "--root", str(tmp_path), "--out", str(tmp_path / "cub"), "--setting", "all"])
    prepare.main(["pets", "--root", str(tmp_path), "--out", str(tmp_path / "pets"), "--setting", "all"])
    prepare.main(["mix", "--from", str(tmp_path / "cub"), str(tmp_path / "pets"), "--out", str(tmp_path / "mix")])
    train = read_records(tmp_path / "mix" / "train.jsonl")
    n_cub, n_pets = (len(read_records(tmp_path / d / "train.jsonl")) for d in ("cub", "pets"))
    assert sorted(r["dataset"] for r in train) == sorted(["cub"] * n_cub + ["pets"] * n_pets)
    table = load_classes(tmp_path / "mix")
    assert set(table["parts"]) == {"cub", "pets"} and table["parts"]["pets"]["folder"] == str(tmp_path / "pets")


def test_help_documents_every_dataset_and_setting(capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--help"])
    out = capsys.readouterr().out
    for word in ("cub", "aircraft", "pets", "flowers", "cars", "food", "coop", "divek", "folder", "jsonl", "toy",
                 "mix", "check", "base2novel", "fewshot", "all"):
        assert word in out
    with pytest.raises(SystemExit):
        prepare.main(["cub", "--help"])
    out = capsys.readouterr().out
    assert "Taxonomy file" in out and "--shots" in out and "--skip_bad" in out


def test_an_alias_shared_by_two_classes_is_dropped_at_prepare_and_caught_by_check(tmp_path, capsys):
    """An answer naming an alias of two classes would be credited to both by the exact reward (the mining
    matcher calls it ambiguous): prepare drops it from both and says so; `check` names a records file
    whose aliases collide with another class."""
    from reward import is_correct
    manifest = tmp_path / "manifest.jsonl"
    rows = []
    for name, aliases in (("Common Tern", ["tern", "Sterna hirundo"]), ("Arctic Tern", ["Tern", "Artic Tern"]),
                          ("Herring Gull", [])):
        for k in range(4):
            jpg(tmp_path / "img" / f"{name}{k}.jpg")
            rows.append({"image": f"img/{name}{k}.jpg", "label": name, "aliases": aliases})
    text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    prepare.main(["jsonl", "--root", str(manifest), "--out", str(tmp_path / "out"), "--setting", "all"])
    assert "alias 'Tern' names 'Arctic Tern' and 'Common Tern': dropped" in capsys.readouterr().out
    table = load_classes(tmp_path / "out")
    aliases = {c["name"]: c["aliases"] for c in table["classes"]}
    assert aliases["Arctic Tern"] == ["Artic Tern"] and aliases["Common Tern"] == ["Sterna hirundo"]
    train = read_records(tmp_path / "out" / "train.jsonl", classes=table)
    assert not any(is_correct("tern", r) for r in train)  # credited to neither
    assert any(is_correct("Artic Tern", r) for r in train)
    # a records file made elsewhere, where one record's alias is another class's name
    bad = [dict(r, aliases=r["aliases"] + ["common tern"]) if r["label"] == "Herring Gull" else r for r in train]
    write_records(tmp_path / "out" / "train.jsonl", bad)
    with pytest.raises(SystemExit):
        prepare.main(["check", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "alias 'common tern' of 'Herring Gull' also names class 'Common Tern'" in err and "train.jsonl:" in err


def test_check_catches_every_record_level_problem_before_a_run(tmp_path, capsys):
    from data.records import write_classes
    folder = tmp_path / "prepared"
    write_classes(folder / "classes.json", {"dataset": "d", "domain": "bird", "classes": [
        {"id": 0, "name": "Common Tern", "aliases": []}, {"id": 1, "name": "Herring Gull", "aliases": []}]})
    jpg(folder / "ok.jpg")
    Image.new("RGB", (402, 2)).save(folder / "strip.png")
    ok = {"image": "ok.jpg", "label": "Common Tern"}
    rows = [ok, dict(ok, options=["Common Tern", "Herring Gull", "x"], answer="AB"), dict(ok, image="strip.png"),
            dict(ok, label="Sooty Tern"), dict(ok, label="Herring Gull", aliases=["common tern"]),
            dict(ok, options=["Common Tern", "Herring Gull"], answer="")]
    text(folder / "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit):
        prepare.main(["check", str(folder)])
    err = capsys.readouterr().err
    path = folder / "test.jsonl"
    for line, reason in [(2, "answer 'AB' is not one of"), (3, "aspect ratio over 200:1"),
                         (4, "unknown label 'Sooty Tern'"), (5, "also names class 'Common Tern'"),
                         (6, "answer '' is not one of")]:
        assert f"bad record: {path}:{line}: " in err and reason in err.split(f"{path}:{line}: ")[1].splitlines()[0]
    assert f"{path}:1:" not in err


def test_a_manifest_whose_labels_differ_by_an_invisible_character_is_refused(tmp_path):
    """'Common Tern' and 'Common Te\\u200brn' (a zero-width space pasted in) would become two classes that no
    answer can tell apart: prepare stops at the second one's line, naming the first's (aliases a raw
    manifest may still share: prepare drops those, saying so)."""
    manifest = tmp_path / "manifest.jsonl"
    jpg(tmp_path / "img" / "a.jpg")
    rows = [{"image": "img/a.jpg", "label": "Common Tern"},
            {"image": "img/a.jpg", "label": "Common Te\u200brn"}]
    text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"manifest.jsonl:2: label 'Common Te\\u200brn' also names class "
                                          r"'Common Tern' \(label 'Common Tern' at .*manifest.jsonl:1\)"):
        prepare.main(["jsonl", "--root", str(manifest), "--out", str(tmp_path / "out"), "--setting", "all"])
