"""Loaders: a user's downloaded dataset -> (class table, official splits).

Every loader returns `(classes, splits)`:
- `classes`: a list of {"id", "name", "aliases", "parents"} in class-id order (ids 0..n-1); `name` is the
  canonical human-readable name, `aliases` other spellings a correct answer may use, `parents` the
  hierarchy from the broadest to the closest parent (empty where the dataset has none). A loader that
  knows base/novel membership (DiVE-k's files) also sets "base".
- `splits`: {"train" | "val" | "test": [(absolute image path, label_id), ...]} in the order of the
  dataset's index files. A split the dataset does not ship is absent; `prepare` carves it.

The layouts are described in shared/datasets.md. Bad input fails with the file and line (RecordError)
or the file and item; a missing index file names the file and the layout expected.
"""

import os
import re
from pathlib import Path

from .records import RecordError, read_json, read_records

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------
# small helpers

def _need(path, layout):
    """Fail early, naming the file and the layout that was expected, if `path` is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (expected the {layout})")
    return Path(path)


def _find_root(root, marker, subfolders=()):
    """The folder holding `marker`: `root` itself or one of the usual subfolders a user may point above."""
    root = Path(root)
    for folder in [root] + [root / s for s in subfolders]:
        if (folder / marker).exists():
            return folder
    return root


def _lines(path, comments=False):
    """(line number, stripped text) for the non-blank lines of a text file (and non-'#' lines)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if text and not (comments and text.startswith("#")):
                yield number, text


def _fields(path, number, text, n, what):
    """Split a line on whitespace into exactly n fields; the last field keeps its spaces."""
    parts = text.split(None, n - 1)
    if len(parts) != n:
        raise RecordError(path, number, f"expected {what}, got {text!r}")
    return parts


def _int(path, number, text, what):
    try:
        return int(text)
    except ValueError:
        raise RecordError(path, number, f"{what} must be an integer, got {text!r}") from None


def make_class(cid, name, aliases=(), parents=()):
    """A class table entry; aliases are de-duplicated and never repeat the name or a parent."""
    seen, clean = {name}, []
    for alias in aliases:
        if alias and alias not in seen:
            seen.add(alias)
            clean.append(alias)
    parents = [p for i, p in enumerate(parents) if p and p != name and p not in parents[:i]]
    return {"id": cid, "name": name, "aliases": clean, "parents": parents}


def _classes_from_labels(path, entries):
    """Class names from (label_id, name) pairs as they appear in a split file; ids must agree."""
    names = {}
    for where, label, name in entries:
        if names.setdefault(label, name) != name:
            raise ValueError(f"{path}: {where}: label {label} is {name!r} here but {names[label]!r} before")
    missing = sorted(set(range(max(names) + 1)) - set(names)) if names else []
    if missing:
        raise ValueError(f"{path}: no entry for class id(s) {missing[:10]}")
    return [names[i] for i in range(len(names))]


# ----------------------------------------------------------------------------------------------
# names: canonical forms, aliases and parents

# CUB drops possessives and hyphens ("Brewer Blackbird", "Black footed Albatross"): restore them for an
# alias. Possessive first words of the 200 class names, and the names the two rules cannot restore.
CUB_POSSESSIVE = ("Anna", "Baird", "Bewick", "Brandt", "Brewer", "Clark", "Harris", "Heermann", "Henslow",
                  "Le Conte", "Lincoln", "Nelson", "Scott", "Swainson", "Wilson")
CUB_SPECIAL = {
    "Artic Tern": "Arctic Tern",  # the typo is in the official files
    "Forsters Tern": "Forster's Tern",
    "Chuck will Widow": "Chuck-will's-widow",
    "Whip poor Will": "Whip-poor-will",
    "Black and white Warbler": "Black-and-white Warbler",
    "Worm eating Warbler": "Worm-eating Warbler",
    "Gray crowned Rosy Finch": "Gray-crowned Rosy-Finch",
    "Western Wood Pewee": "Western Wood-Pewee",
}


def cub_name(folder):
    """'001.Black_footed_Albatross' -> 'Black footed Albatross' (the name as DiVE-k writes it)."""
    return re.sub(r"^\d+\.", "", folder).replace("_", " ").strip()


def restore_cub(name):
    """Hyphens and possessives put back: 'Nelson Sharp tailed Sparrow' -> "Nelson's Sharp-tailed Sparrow".
    A lower-case word ending in -ed after another word is the second half of a compound ('footed')."""
    if name in CUB_SPECIAL:
        return CUB_SPECIAL[name]
    for owner in CUB_POSSESSIVE:
        if name.startswith(owner + " "):
            name = owner + "'s" + name[len(owner):]
            break
    words = name.split()
    out = words[:1]
    for word in words[1:]:
        if word.islower() and word.endswith("ed"):
            out[-1] += "-" + word
        else:
            out.append(word)
    return " ".join(out)


def cub_aliases(folder):
    name = cub_name(folder)
    return [folder, re.sub(r"^\d+\.", "", folder), restore_cub(name)]


# Stanford Cars: "2012 Aston Martin V8 Vantage Convertible" -> make "Aston Martin".
CAR_MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")


def _year_first(name):
    """Cars names with the year first (CoOp's form) whichever end the year was at."""
    words = name.split()
    if len(words) > 1 and re.fullmatch(r"(19|20)\d\d", words[-1]) and not re.fullmatch(r"(19|20)\d\d", words[0]):
        words = [words[-1]] + words[:-1]
    return " ".join(words)


def car_make(name):
    words = _year_first(name).split()
    if words and re.fullmatch(r"(19|20)\d\d", words[0]):
        words = words[1:]
    rest = " ".join(words)
    for make in CAR_MULTI_WORD_MAKES:
        if rest.startswith(make + " "):
            return make
    return words[0] if words else ""


def car_class(cid, raw):
    name = _year_first(raw.replace("_", " ").strip())
    words = name.split()
    year_last = " ".join(words[1:] + words[:1]) if re.fullmatch(r"(19|20)\d\d", words[0]) else name
    return make_class(cid, name, [raw, year_last], [car_make(name)])


# Oxford-IIIT Pets: 12 cat breeds, 25 dog breeds. File names capitalise cats only ("Abyssinian_1.jpg",
# "american_bulldog_1.jpg"), CoOp lower-cases all: title case gives one canonical form for both.
PET_CATS = {"abyssinian", "bengal", "birman", "bombay", "british_shorthair", "egyptian_mau", "maine_coon",
            "persian", "ragdoll", "russian_blue", "siamese", "sphynx"}


def pet_class(cid, raw, species=None):
    name = " ".join(w[:1].upper() + w[1:] for w in raw.replace("_", " ").split())
    if species is None:
        species = "cat" if raw.lower().replace(" ", "_") in PET_CATS else "dog"
    return make_class(cid, name, [raw, raw.replace("_", " ").lower()], [species])


def named_class(dataset, cid, raw):
    """A class from a bare name (CoOp and DiVE-k files), with the dataset's naming rules applied."""
    if dataset.startswith("cars"):
        return car_class(cid, raw)
    if dataset.startswith("pets"):
        return pet_class(cid, raw)
    name = raw.replace("_", " ").strip()
    aliases = [raw]
    if dataset.startswith("cub"):
        aliases.append(restore_cub(name))
    return make_class(cid, name, aliases)


# ----------------------------------------------------------------------------------------------
# CUB-200-2011

CUB_LAYOUT = "CUB_200_2011 layout: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt"


def load_cub(root):
    """CUB-200-2011 from its four 1-based index files, joined on the image id.

    The class of an image comes from image_class_labels.txt, never from the file name (folder and
    file capitalisation differ in the archive). Splits: train (5,994) and test (5,794); no val.
    """
    root = _find_root(root, "images.txt", ["CUB_200_2011"])
    files = {name: _need(root / f"{name}.txt", CUB_LAYOUT)
             for name in ("classes", "images", "image_class_labels", "train_test_split")}
    classes = []
    for number, text in _lines(files["classes"]):
        cid, folder = _fields(files["classes"], number, text, 2, "'<class id> <folder name>'")
        if _int(files["classes"], number, cid, "class id") != len(classes) + 1:
            raise RecordError(files["classes"], number, f"class ids must run 1, 2, ... in order, got {cid}")
        classes.append(make_class(len(classes), cub_name(folder), cub_aliases(folder)))

    def table(name, what):
        rows = {}
        for number, text in _lines(files[name]):
            image_id, value = _fields(files[name], number, text, 2, what)
            rows[image_id] = (number, value)
        return rows

    labels = table("image_class_labels", "'<image id> <class id>'")
    is_train = table("train_test_split", "'<image id> <1 train | 0 test>'")
    splits = {"train": [], "test": []}
    for number, text in _lines(files["images"]):
        image_id, rel = _fields(files["images"], number, text, 2, "'<image id> <relative path>'")
        for name, rows in (("image_class_labels", labels), ("train_test_split", is_train)):
            if image_id not in rows:
                raise RecordError(files["images"], number, f"image id {image_id} has no line in {files[name]}")
        label_line, label = labels[image_id]
        label = _int(files["image_class_labels"], label_line, label, "class id")
        if not 1 <= label <= len(classes):
            raise RecordError(files["image_class_labels"], label_line, f"class id {label} not in classes.txt")
        split_line, flag = is_train[image_id]
        if flag not in ("0", "1"):
            raise RecordError(files["train_test_split"], split_line, f"expected 1 (train) or 0 (test), got {flag!r}")
        split = "train" if flag == "1" else "test"
        splits[split].append((str(root / "images" / rel), label - 1))
    return classes, splits


# ----------------------------------------------------------------------------------------------
# FGVC-Aircraft

AIRCRAFT_LAYOUT = "fgvc-aircraft-2013b/data layout: variants.txt, images_variant_{train,val,test}.txt, images/"


def load_aircraft(root):
    """FGVC-Aircraft at the variant level (100 classes), with manufacturer > family as parents.

    Lines are '<image id> <name>' where the name may hold spaces and slashes ('F/A-18'): split on the
    first space only. The hierarchy comes from joining the family and manufacturer files on the image id.
    """
    root = _find_root(root, "variants.txt", ["data", "fgvc-aircraft-2013b/data"])
    variants_file = _need(root / "variants.txt", AIRCRAFT_LAYOUT)
    variants = [text for _, text in _lines(variants_file)]
    index = {name: i for i, name in enumerate(variants)}
    levels = {"family": {}, "manufacturer": {}}  # image id -> name
    for level, rows in levels.items():
        for split in ("train", "val", "test"):
            path = root / f"images_{level}_{split}.txt"
            if path.exists():
                for number, text in _lines(path):
                    image_id, name = _fields(path, number, text, 2, f"'<image id> <{level}>'")
                    rows[image_id] = name
    splits, hierarchy = {}, {}
    for split in ("train", "val", "test"):
        path = _need(root / f"images_variant_{split}.txt", AIRCRAFT_LAYOUT)
        items = []
        for number, text in _lines(path):
            image_id, name = _fields(path, number, text, 2, "'<image id> <variant>'")
            if name not in index:
                raise RecordError(path, number, f"variant {name!r} is not in {variants_file}")
            items.append((str(root / "images" / f"{image_id}.jpg"), index[name]))
            hierarchy.setdefault(name, (levels["manufacturer"].get(image_id), levels["family"].get(image_id)))
        splits[split] = items
    classes = []
    for i, name in enumerate(variants):
        maker, family = hierarchy.get(name, (None, None))
        aliases = [f"{maker} {name}"] if maker and not name.startswith(maker) else []
        classes.append(make_class(i, name, aliases, [maker, family]))
    return classes, splits


# ----------------------------------------------------------------------------------------------
# Oxford-IIIT Pets (official annotations)

PETS_LAYOUT = "Oxford-IIIT Pets layout: annotations/list.txt, annotations/{trainval,test}.txt, images/"


def load_pets(root):
    """Oxford-IIIT Pets from annotations/: '<stem> <class 1..37> <species 1 cat, 2 dog> <breed id>'.

    Class name = the stem without its trailing _<number>; species gives the parent (cat / dog).
    Splits: trainval -> train, test; no val.
    """
    root = _find_root(root, "annotations/list.txt", ["oxford-iiit-pet"])
    listing = _need(root / "annotations" / "list.txt", PETS_LAYOUT)
    found = {}

    def rows(path):
        for number, text in _lines(path, comments=True):
            stem, cid, species, _breed = _fields(path, number, text, 4, "'<image> <class id> <species> <breed id>'")
            cid = _int(path, number, cid, "class id")
            species = _int(path, number, species, "species")
            if species not in (1, 2):
                raise RecordError(path, number, f"species must be 1 (cat) or 2 (dog), got {species}")
            yield number, stem, cid, species

    for number, stem, cid, species in rows(listing):
        found.setdefault(cid, (stem.rsplit("_", 1)[0], "cat" if species == 1 else "dog"))
    missing = sorted(set(range(1, max(found, default=0) + 1)) - set(found))
    if missing:
        raise ValueError(f"{listing}: no image of class id(s) {missing}")
    classes = [pet_class(cid - 1, *found[cid]) for cid in sorted(found)]
    splits = {}
    for split, name in (("train", "trainval.txt"), ("test", "test.txt")):
        path = _need(root / "annotations" / name, PETS_LAYOUT)
        items = []
        for number, stem, cid, _species in rows(path):
            if cid not in found:
                raise RecordError(path, number, f"class id {cid} is not in {listing}")
            items.append((str(root / "images" / f"{stem}.jpg"), cid - 1))
        splits[split] = items
    return classes, splits


# ----------------------------------------------------------------------------------------------
# CoOp split_zhou_*.json (Flowers-102, Stanford Cars, Pets, Food-101, DTD, EuroSAT, ...)

def find_coop_split(root):
    """The split_zhou_*.json in `root` (or `root` itself when it is the file)."""
    root = Path(root)
    if root.is_file():
        return root
    found = sorted(root.glob("split_zhou_*.json"))
    if len(found) != 1:
        what = "no split_zhou_*.json" if not found else f"several split files {[f.name for f in found]}"
        raise FileNotFoundError(f"{root}: {what} (give the file itself as --root)")
    return found[0]


def load_coop(root, dataset, images=None):
    """CoOp's split_zhou_<Name>.json: {"train"|"val"|"test": [[relative image path, label, classname]]}.

    Paths are relative to a dataset-specific image folder (Flowers: jpg/, Pets and Food: images/, Cars:
    the dataset folder); without `images` the first of those where the first image exists is used.
    `dataset` picks the naming rules (cars: make parent and year aliases; pets: species parent).
    """
    path = find_coop_split(root)
    data = read_json(path)
    entries = []
    for split in ("train", "val", "test"):
        for i, entry in enumerate(data.get(split, [])):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int)):
                raise ValueError(f"{path}: {split}[{i}]: expected [image path, label id, class name], got {entry!r}")
            entries.append((split, i, entry))
    if not entries:
        raise ValueError(f"{path}: no train/val/test entries")
    names = _classes_from_labels(path, [(f"{s}[{i}]", e[1], e[2]) for s, i, e in entries])
    if images is None:
        first = entries[0][2][0]
        candidates = [path.parent, path.parent / "images", path.parent / "jpg"]
        images = next((c for c in candidates if (c / first).exists()), path.parent)
    classes = [named_class(dataset, i, name) for i, name in enumerate(names)]
    splits = {}
    for split, _i, (rel, label, _name) in entries:
        splits.setdefault(split, []).append((str(Path(images) / rel), label))
    return classes, splits


# ----------------------------------------------------------------------------------------------
# official .mat files (optional: need scipy)

def _loadmat(path, layout):
    try:
        import scipy.io
    except ImportError:
        raise ImportError("reading the official .mat files needs scipy (pip install scipy); "
                          "or use CoOp's split_zhou_*.json") from None
    return scipy.io.loadmat(_need(path, layout), squeeze_me=True)


FLOWERS_LAYOUT = "Flowers-102 layout: imagelabels.mat, setid.mat, jpg/, cat_to_name.json"


def load_flowers_mat(root):
    """Flowers-102 from imagelabels.mat and setid.mat (trnid / valid / tstid, 1-based image numbers).
    The .mat files hold no names: cat_to_name.json ({"1": "pink primrose", ...}, shipped with CoOp's
    files) gives them."""
    root = Path(root)
    labels = _loadmat(root / "imagelabels.mat", FLOWERS_LAYOUT)["labels"].ravel()
    setid = _loadmat(root / "setid.mat", FLOWERS_LAYOUT)
    names = read_json(_need(root / "cat_to_name.json", FLOWERS_LAYOUT))
    classes = [make_class(i, names[str(i + 1)]) for i in range(len(names))]
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        splits[split] = [(str(root / "jpg" / f"image_{int(n):05d}.jpg"), int(labels[int(n) - 1]) - 1)
                         for n in setid[key].ravel()]
    return classes, splits


CARS_LAYOUT = ("Stanford Cars devkit layout: devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
               "cars_test_annos_withlabels.mat, cars_train/, cars_test/")


def load_cars_mat(root):
    """Stanford Cars from the devkit .mat files; names put the year last there, CoOp's form (year first)
    is the canonical one."""
    root = Path(root)
    meta = _loadmat(root / "devkit" / "cars_meta.mat", CARS_LAYOUT)
    classes = [car_class(i, str(name)) for i, name in enumerate(meta["class_names"].ravel())]
    test_annos = root / "cars_test_annos_withlabels.mat"
    if not test_annos.exists():
        test_annos = root / "devkit" / "cars_test_annos_withlabels.mat"
    splits = {}
    for split, annos, folder in (("train", root / "devkit" / "cars_train_annos.mat", "cars_train"),
                                 ("test", test_annos, "cars_test")):
        a = _loadmat(annos, CARS_LAYOUT)["annotations"].ravel()
        splits[split] = [(str(root / folder / str(f)), int(c) - 1) for f, c in zip(a["fname"], a["class"])]
    return classes, splits


# ----------------------------------------------------------------------------------------------
# DiVE-k split files

DIVEK_FILES = {
    "base2novel": {"train": ("zero_shot/subsample_base_train.json", True),
                   "test_base": ("zero_shot/subsample_base_val.json", True),
                   "test_novel": ("zero_shot/subsample_new_val.json", False)},
    "fewshot": {"train": ("fewshot/4_shots_all_train.json", None),
                "test": ("fewshot/4_shots_all_val.json", None)},
}
DIVEK_NAMES = {"cub_200_2011": "cub", "fgvc_aircraft": "aircraft", "oxford-iiit-pet": "pets",
               "oxford_flowers": "flowers", "stanford_cars": "cars", "food-101": "food"}


def _rebaser(images):
    """DiVE-k's image paths are relative to their data folder ('CUB_200_2011/images/...', or absolute
    on their machines): map each to the longest tail of it that exists under `images` (an absolute path
    that exists here is kept). Entries share their prefix, so the number of leading parts to drop is
    remembered and tried first."""
    drop = [0]

    def rebase(path):
        parts = Path(path).parts
        for n in [drop[0]] + list(range(len(parts))):
            candidate = Path(images, *parts[n:])
            if candidate.exists():
                drop[0] = n
                return str(candidate)
        return str(Path(images, *parts[drop[0]:]))  # missing: `prepare --check` reports it
    return rebase


def load_divek(root, setting, dataset, images=None):
    """DiVE-k's split files: JSON lists of {"image_path", "problem", "solution": "<answer>NAME</answer>"}.

    base2novel: zero_shot/subsample_{base_train, base_val, new_val}.json -> train, test (base), test
    (novel); fewshot: fewshot/4_shots_all_{train,val}.json -> train, test. Names may end with a period
    (stripped). Class ids follow zero_shot/all_class_to_idx.json when present, else base names (sorted)
    then novel names. Image paths are found under `images` (default: the parent of `root`).

    The train split is kept exactly as DiVE-k ships it, and DiVE-k has no validation split: "val"
    repeats up to 4 train images per class so that stages expecting a val file run (not held out).
    """
    root = Path(root)
    rebase = _rebaser(Path(images) if images else root.parent)
    layout = "DiVE-k layout: zero_shot/subsample_*.json and fewshot/4_shots_all_*.json"
    loaded = {}  # file key -> [(image path, raw name)]
    membership = {}  # raw name -> base?
    for key, (rel, is_base) in DIVEK_FILES[setting].items():
        path = _need(root / rel, layout)
        items = []
        for i, entry in enumerate(read_json(path)):
            match = re.search(r"<answer>(.*?)</answer>", str(entry.get("solution", "")), re.S)
            if not match or "image_path" not in entry:
                raise ValueError(f"{path}: item {i}: expected image_path and solution '<answer>NAME</answer>'")
            name = match.group(1).strip().rstrip(".").strip()
            if is_base is not None and membership.setdefault(name, is_base) != is_base:
                raise ValueError(f"{path}: item {i}: class {name!r} is in both the base and the novel files")
            items.append((rebase(entry["image_path"]), name))
        loaded[key] = items
    index_file = root / "zero_shot" / "all_class_to_idx.json"
    if index_file.exists():
        ids = {k.strip().rstrip(".").strip(): int(v) - 1 for k, v in read_json(index_file).items()}
        names = sorted(ids, key=ids.get)
    else:
        seen = {name for items in loaded.values() for _, name in items}
        names = sorted(seen, key=lambda n: (not membership.get(n, True), n))
    index = {name: i for i, name in enumerate(names)}
    classes = [named_class(dataset, i, name) for i, name in enumerate(names)]
    if membership:  # base/novel from the files; a class in none of them falls back to the CoCoOp rule
        for c, raw in zip(classes, names):
            c["base"] = membership.get(raw, c["id"] < (len(names) + 1) // 2)
    splits = {"train": [], "test": []}
    for key, items in loaded.items():
        for image, name in items:
            if name not in index:
                raise ValueError(f"{root / DIVEK_FILES[setting][key][0]}: class {name!r} is not in {index_file}")
            splits["train" if key == "train" else "test"].append((image, index[name]))
    seen_per_class = {}
    splits["val"] = []
    for image, label in splits["train"]:
        seen_per_class[label] = seen_per_class.get(label, 0) + 1
        if seen_per_class[label] <= 4:
            splits["val"].append((image, label))
    return classes, splits


# ----------------------------------------------------------------------------------------------
# a user's own data: class-per-folder and a JSONL manifest

def _images_in(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_folder(root):
    """`root/<class name>/*.jpg` (one pool: prepare carves test and val), or `root/{train,val,test}/<class
    name>/*.jpg` when train/ and test/ exist. Class ids follow the sorted folder names; underscores in a
    folder name become spaces in the class name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder (expected <root>/<class name>/<image>)")
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()} if split_layout \
        else {"train": root}
    folders = sorted({p.name for d in split_dirs.values() for p in d.iterdir() if p.is_dir()})
    if not folders:
        raise FileNotFoundError(f"{root}: no class folders (expected <root>/<class name>/<image>)")
    classes = [make_class(i, name.replace("_", " ").strip(), [name]) for i, name in enumerate(folders)]
    index = {name: i for i, name in enumerate(folders)}
    splits = {}
    for split, folder in split_dirs.items():
        splits[split] = [(str(image), index[d.name]) for d in sorted(folder.iterdir()) if d.is_dir()
                         for image in _images_in(d)]
    return classes, splits


def load_manifest(path):
    """A JSONL manifest, {"image": path, "label": name} per line, optionally "split" (train / val /
    test; default train) and "aliases" / "parents". Class ids follow the sorted label names."""
    records = read_records(path, shared_aliases=True)  # prepare drops an alias two classes share, saying so
    names = sorted({r["label"] for r in records})
    index = {name: i for i, name in enumerate(names)}
    extra = {}
    splits = {}
    for r in records:
        split = r.get("split", "train")
        if split not in ("train", "val", "test"):
            file, line = r["_src"].rsplit(":", 1)
            raise RecordError(file, int(line), f"split must be train, val or test, got {split!r}")
        splits.setdefault(split, []).append((r["image"], index[r["label"]]))
        extra.setdefault(r["label"], (r.get("aliases", []), r.get("parents", [])))
    classes = [make_class(i, name, *extra[name]) for i, name in enumerate(names)]
    return classes, splits


# ----------------------------------------------------------------------------------------------
# an optional taxonomy file: parents (and more aliases) for any dataset

TAXONOMY_FORMAT = """\
Taxonomy file: one class per line, fields separated by '|'; blank lines and lines starting with '#'
are ignored.
    <class> | <parent> > <parent> > ... | <alias>; <alias>; ...
<class> is the class's name or any of its aliases (e.g. CUB's folder name '001.Black_footed_Albatross'),
compared ignoring case, '_' and '-'. Parents run from the broadest to the closest (order > family >
genus); they replace the dataset's own parents. The alias field is optional (a scientific name, a
common name). Classes without a line keep their parents. Example:
    Black footed Albatross | Procellariiformes > Diomedeidae > Phoebastria | Phoebastria nigripes"""


def _key(name):
    return " ".join(re.sub(r"[_\-]", " ", name).lower().split()).rstrip(".")


def apply_taxonomy(classes, path):
    """Set parents (and add aliases) from a taxonomy file in TAXONOMY_FORMAT. Returns `classes`."""
    path = _need(path, "taxonomy file format (see --help)")
    lookup = {}
    for c in classes:
        for name in [c["name"]] + c["aliases"]:
            lookup.setdefault(_key(name), c)
    for number, text in _lines(path, comments=True):
        fields = [f.strip() for f in text.split("|")]
        if len(fields) not in (2, 3) or not fields[0]:
            raise RecordError(path, number, "expected '<class> | <parent> > <parent> ... [| <alias>; ...]'")
        cls = lookup.get(_key(fields[0]))
        if cls is None:
            raise RecordError(path, number, f"unknown class {fields[0]!r}")
        parents = [p.strip() for p in fields[1].split(">") if p.strip()]
        aliases = [a.strip() for a in fields[2].split(";")] if len(fields) == 3 else []
        cls.update(make_class(cls["id"], cls["name"], cls["aliases"] + aliases, parents))
    return classes
