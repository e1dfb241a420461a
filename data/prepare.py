"""Prepare a dataset: read a user's download, write the JSONL records every stage reads.

    python -m data.prepare cub --root /data/CUB_200_2011 --out data/cub --setting base2novel --shots 16 --seed 1
    python -m data.prepare aircraft --root /data/fgvc-aircraft-2013b --out data/aircraft --setting fewshot --shots 4
    python -m data.prepare toy --out data/toy --seed 0
    python -m data.prepare check data/cub              # open every image of a prepared folder

What it does, in order:
1. a loader (data/loaders.py) reads the dataset's own index files into a class table (canonical name,
   aliases, parents) and its official splits; an optional --taxonomy file sets parents;
2. the splits the papers use are cut (data/splits.py): validation carved from train where a dataset
   ships none, base/novel by the CoCoOp rule, K-shot by the Dassl rule with a seed;
3. DIR/classes.json and the JSONL files are written atomically, and a table of counts is printed;
4. with --check every image is opened: bad records are listed with file and line (exit status 1), or
   with --skip_bad dropped from the files and counted.

Prepared folder: classes.json, then base2novel: train.jsonl (base classes), val.jsonl (base),
test_base.jsonl, test_novel.jsonl; fewshot / all: train.jsonl, val.jsonl, test.jsonl (all classes).
Image paths are absolute, or relative to DIR for images inside it (the toy world), so DIR can move.
"""

import argparse
import os
import sys
import time

from . import loaders, splits, toy
from .prompts import domain
from .records import (class_names, drop_shared_aliases, load_classes, make_record, read_records, scan_records,
                      write_classes, write_records)

SETTINGS_HELP = """\
settings (--setting):
  base2novel  CoCoOp: classes sorted by id, base = first ceil(n/2), novel = the rest. train.jsonl and
              val.jsonl hold base classes only (K-shot and min(K,4)-shot with --shots K), then
              test_base.jsonl and test_novel.jsonl. CUB 100/100, Cars 98/98, Aircraft 50/50,
              Flowers 51/51, Pets 19/18.
  fewshot     Dassl: K images per class (--shots, default 4; with replacement where a class has fewer),
              val min(K,4) per class, seeded by --seed (the papers use 1, 2, 3); test.jsonl: all classes.
  all         the full official train / val / test.
  Validation is carved from train where a dataset has none (CoOp: --val_fraction 0.2 of each class,
  fixed seed, so it does not change with --seed)."""

# ----------------------------------------------------------------------------------------------
# loading

def _coop_or(args, fallback):
    """CoOp's split json when one is in --root (the primary path), else the official files."""
    try:
        split_file = loaders.find_coop_split(args.root)
    except FileNotFoundError:
        split_file = None
    if args.layout == "coop" or (args.layout == "auto" and split_file is not None):
        return loaders.load_coop(args.root, args.dataset, args.images)
    return fallback(args.root)


def load(args):
    """(dataset name, classes, splits) for the parsed command line."""
    d = args.dataset
    if d == "cub":
        return "cub", *loaders.load_cub(args.root)
    if d == "aircraft":
        return "aircraft", *loaders.load_aircraft(args.root)
    if d == "pets":
        official = os.path.exists(os.path.join(args.root, "annotations", "list.txt")) or \
            os.path.exists(os.path.join(args.root, "oxford-iiit-pet", "annotations", "list.txt"))
        if args.layout == "official" or (args.layout == "auto" and official):
            return "pets", *loaders.load_pets(args.root)
        return "pets", *loaders.load_coop(args.root, "pets", args.images)
    if d == "flowers":
        return "flowers", *_coop_or(args, loaders.load_flowers_mat)
    if d == "cars":
        return "cars", *_coop_or(args, loaders.load_cars_mat)
    if d in ("food", "coop"):
        name = args.name or d
        return name, *loaders.load_coop(args.root, name, args.images)
    if d == "divek":
        name = args.name or loaders.DIVEK_NAMES.get(os.path.basename(os.path.normpath(args.root)).lower())
        if not name:
            raise SystemExit(f"divek: cannot tell the dataset from {args.root!r}; give --name (cub, cars, ...)")
        return name, *loaders.load_divek(args.root, args.setting, name, args.images)
    if d == "folder":
        return args.name, *loaders.load_folder(args.root)
    if d == "jsonl":
        return args.name, *loaders.load_manifest(args.root)
    raise ValueError(f"unknown dataset {d!r}")


# ----------------------------------------------------------------------------------------------
# reporting and checking

def print_table(files, out):
    """Per file: classes, distinct images, records (few-shot with replacement repeats images)."""
    print(f"{'file':<16}{'classes':>8}{'images':>8}{'records':>9}")
    for stem, records in files.items():
        n_classes = len({r["label"] for r in records})
        n_images = len({r["image"] for r in records})
        print(f"{stem + '.jsonl':<16}{n_classes:>8}{n_images:>8}{len(records):>9}")
    print(f"written to {out}")


def check_files(paths, classes, skip_bad):
    """Check every record of each file as a run would before it starts (fields, MCQ answers, labels and
    aliases against the class table `classes` when given) and open every image. Bad records are printed
    with file and line; with skip_bad they are dropped from the file (rewritten atomically). Returns the
    number of bad records."""
    total = 0
    for path in paths:
        good, bad = [], []
        for record, problem in scan_records(path, check_images=True, classes=classes):
            if problem is None:
                good.append(record)
            else:
                bad.append(problem)
        for problem in bad[:20]:
            print(f"bad record: {problem}", file=sys.stderr)
        if len(bad) > 20:
            print(f"... and {len(bad) - 20} more in {path}", file=sys.stderr)
        if bad and skip_bad:
            write_records(path, good)
            print(f"{path}: dropped {len(bad)} bad record(s), {len(good)} left", file=sys.stderr)
        total += len(bad)
    return total


def _finish_check(args, paths, classes):
    if not args.check:
        return
    bad = check_files(paths, classes, args.skip_bad)
    if bad and not args.skip_bad:
        raise SystemExit(f"--check: {bad} bad record(s); fix them or rerun with --skip_bad to drop them")
    print(f"--check: every image opened ({bad} bad record(s) dropped)" if bad else "--check: every image opened")


# ----------------------------------------------------------------------------------------------
# subcommands

def prepare_dataset(args):
    if args.setting == "all" and args.shots:
        raise SystemExit("--shots applies to the base2novel and fewshot settings, not to 'all'")
    name, classes, official = load(args)
    if args.taxonomy:
        loaders.apply_taxonomy(classes, args.taxonomy)
    for alias, owners in drop_shared_aliases(classes):
        print(f"alias {alias!r} names {' and '.join(repr(o) for o in owners)}: dropped (an answer naming it "
              "would be credited to either)")
    splits.mark_base(classes)
    official = dict(official)
    if "test" not in official:  # a user's own data: carve a test split first, then validation
        official["train"], official["test"] = splits.carve(official["train"], args.test_fraction)
    if "val" not in official:
        official["train"], official["val"] = splits.carve(official["train"], args.val_fraction)
    setting, shots = args.setting, args.shots
    if setting == "fewshot" and not shots:
        if args.dataset == "divek":
            setting = "all"  # DiVE-k's few-shot files are already the 4-shot split: keep them as they are
        else:
            shots = 4  # the papers' K
    chosen = splits.make_setting(classes, official, setting, shots, args.seed)

    table = {"dataset": name, "domain": args.domain or domain(name)[0], "classes": classes}
    write_classes(os.path.join(args.out, "classes.json"), table)
    files = {}
    for stem, items in chosen.items():
        files[stem] = [make_record(image, classes[label], name, stem) for image, label in items]
        write_records(os.path.join(args.out, f"{stem}.jsonl"), files[stem])
    b = sum(c["base"] for c in classes)
    print(f"{name}: {len(classes)} classes ({b} base, {len(classes) - b} novel), setting {args.setting}"
          + (f", {shots} shots, seed {args.seed}" if shots else ""))
    print_table(files, args.out)
    _finish_check(args, [os.path.join(args.out, f"{stem}.jsonl") for stem in files], table)


def prepare_toy(args):
    start = time.time()
    files = toy.generate(args.out, seed=args.seed, n_shapes=args.shapes, n_colours=args.colours,
                         n_patterns=args.patterns, size=args.size, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, test_per_class=args.test_per_class,
                         pretrain_per_class=args.pretrain_per_class, rotation=args.rotation,
                         jitter=args.jitter, names=args.names,
                         pretrain_naming=args.pretrain_naming, confused_pairs=args.confused_pairs,
                         confusion=args.confusion, pretrain_attributes=args.pretrain_attributes,
                         pretrain_meaning=args.pretrain_meaning, hedge=args.hedge,
                         cot_per_class=args.cot_per_class)
    table = load_classes(args.out)
    b = len(class_names(table, "base"))
    print(f"toy: {len(table['classes'])} classes ({b} base, {len(table['classes']) - b} novel), "
          f"{args.size} px, seed {args.seed}, generated in {time.time() - start:.1f}s")
    print_table(files, args.out)
    _finish_check(args, [os.path.join(args.out, f"{stem}.jsonl") for stem in files], table)


def prepare_mix(args):
    """train.jsonl and val.jsonl mixed from several prepared folders (proportional to their sizes), and
    a classes.json whose "parts" hold each dataset's own table (and folder, for its test files)."""
    parts, files = {}, {}
    for folder in args.sources:
        table = load_classes(folder)
        if table["dataset"] in parts:
            raise SystemExit(f"mix: dataset {table['dataset']!r} given twice")
        parts[table["dataset"]] = dict(table, folder=os.path.abspath(folder))
    for stem in ("train", "val"):
        lists = [read_records(os.path.join(folder, f"{stem}.jsonl")) for folder in args.sources]
        size = args.size if stem == "train" else None
        files[stem] = splits.mix(lists, size, args.seed)
        write_records(os.path.join(args.out, f"{stem}.jsonl"), files[stem])
    table = {"dataset": "mix", "domain": "object", "parts": parts, "classes": []}
    write_classes(os.path.join(args.out, "classes.json"), table)
    print(f"mix of {', '.join(parts)}; evaluate on each dataset's own test files")
    print_table(files, args.out)


def run_check(args):
    """Check prepared folders or files; labels are checked against the classes.json beside each file."""
    paths = []
    for target in args.paths:
        if os.path.isdir(target):
            paths += sorted(os.path.join(target, f) for f in os.listdir(target) if f.endswith(".jsonl"))
        else:
            paths.append(target)
    bad = 0
    for path in paths:
        classes = os.path.join(os.path.dirname(os.path.abspath(path)), "classes.json")
        bad += check_files([path], load_classes(classes) if os.path.exists(classes) else None, args.skip_bad)
    print(f"checked {len(paths)} file(s): {bad} bad record(s)" + (" dropped" if bad and args.skip_bad else ""))
    if bad and not args.skip_bad:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------
# command line

def build_parser():
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m data.prepare", formatter_class=fmt,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="`python -m data.prepare <dataset> --help` gives a dataset's layout and "
                                            "flags.\n\n" + SETTINGS_HELP)
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="dataset", title="datasets")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder (classes.json and the JSONL files)")
    common.add_argument("--setting", choices=splits.SETTINGS, default="base2novel",
                        help="which splits to write (see `python -m data.prepare --help`); default base2novel")
    common.add_argument("--shots", type=int, default=None,
                        help="K images per class in train (Dassl rule); base2novel: all if not given; fewshot: default 4")
    common.add_argument("--seed", type=int, default=1, help="seed of the few-shot sampling (papers: 1, 2, 3)")
    common.add_argument("--val_fraction", type=float, default=0.2,
                        help="share of each class's train images carved as val where the dataset has none")
    common.add_argument("--taxonomy", default=None,
                        help="taxonomy file giving parents (and aliases) per class; format in `cub --help`")
    common.add_argument("--domain", default=None, help="noun for the classes.json domain (default from the dataset name)")
    common.add_argument("--check", action="store_true", help="open every image after writing; list bad records")
    common.add_argument("--skip_bad", action="store_true", help="with --check: drop bad records and print how many")

    def dataset(name, help_text, layout, root_help, extra=()):
        p = sub.add_parser(name, parents=[common], help=help_text, formatter_class=fmt,
                           description=f"{help_text}\n\n{layout}\n\n{SETTINGS_HELP}")
        p.add_argument("--root", required=True, help=root_help)
        for flags, kwargs in extra:
            p.add_argument(*flags, **kwargs)
        # every loader reads the same attributes; set_defaults would override add_argument's defaults,
        # so it fills in only the flags this dataset does not have
        given = {flags[0].lstrip("-").replace("-", "_") for flags, _ in extra}
        defaults = {"images": None, "layout": "auto", "name": None, "test_fraction": 0.3}
        p.set_defaults(func=prepare_dataset, **{k: v for k, v in defaults.items() if k not in given})

    images = (("--images",), {"default": None, "help": "folder the split file's image paths are relative to "
                                                        "(default: found next to the split file)"})
    layout = lambda choices: (("--layout",), {"choices": choices, "default": "auto",
                                              "help": "which files to read (auto: CoOp json if present)"})
    name = lambda default, required=False: (("--name",), {"default": default, "required": required,
                                                           "help": "dataset name written in every record"})
    dataset("cub", "CUB-200-2011, official index files (200 birds; --taxonomy for parents)",
            "Download: CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158\n"
            "Layout: CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,\n"
            "images/<NNN.Class_Name>/*.jpg}. Splits: train 5,994 / test 5,794 (val carved from train).\n"
            "Names: 'Black footed Albatross'; aliases: folder name, hyphens and possessives restored\n"
            "('Black-footed Albatross', \"Brewer's Blackbird\"), 'Arctic Tern' for the official 'Artic Tern'.\n\n"
            + loaders.TAXONOMY_FORMAT,
            "the CUB_200_2011 folder (or the folder holding it)")
    dataset("aircraft", "FGVC-Aircraft, official files (100 variants; parents manufacturer > family)",
            "Download: fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/\n"
            "Layout: fgvc-aircraft-2013b/data/{variants.txt, images_variant_{train,val,test}.txt,\n"
            "images_{family,manufacturer}_{train,val,test}.txt, images/<id>.jpg}; 3,334 / 3,333 / 3,333.\n"
            "Parents: manufacturer > family ('737-800' -> Boeing > Boeing 737); alias 'Boeing 737-800'.",
            "fgvc-aircraft-2013b (or its data/ folder)")
    dataset("pets", "Oxford-IIIT Pets, official or CoOp json (37 breeds; parent cat / dog)",
            "Download: images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/\n"
            "(unpack both into one folder).\n"
            "Official layout: annotations/{list.txt, trainval.txt, test.txt}, images/<stem>.jpg; or CoOp's\n"
            "split_zhou_OxfordPets.json with images/. Parent: cat or dog.",
            "oxford-iiit-pet folder (official) or CoOp's oxford_pets folder", [layout(["auto", "official", "coop"]), images])
    dataset("flowers", "Oxford Flowers-102, CoOp json or official .mat (102 species)",
            "Download: the images from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ and CoOp's split file\n"
            "(linked from https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md).\n"
            "CoOp layout: oxford_flowers/{split_zhou_OxfordFlowers.json, jpg/}. Official: imagelabels.mat,\n"
            "setid.mat, jpg/ and cat_to_name.json for the names (needs scipy).",
            "oxford_flowers folder", [layout(["auto", "coop", "mat"]), images])
    dataset("cars", "Stanford Cars, CoOp json or devkit .mat (196 models; parent make)",
            "Download: the original page at ai.stanford.edu is often offline; CoOp's DATASETS.md\n"
            "(https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) lists mirrors and the split file.\n"
            "CoOp layout: stanford_cars/{split_zhou_StanfordCars.json, cars_train/, cars_test/}. Official:\n"
            "devkit/{cars_meta.mat, cars_train_annos.mat}, cars_test_annos_withlabels.mat (needs scipy).\n"
            "Names year first ('2012 Tesla Model S Sedan'), alias with the year last; parent: the make.",
            "stanford_cars folder", [layout(["auto", "coop", "mat"]), images])
    dataset("food", "Food-101, CoOp json (101 dishes)", "Download: https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ and CoOp's split file.\n"
            "CoOp layout: food-101/{split_zhou_Food101.json, images/}.",
            "food-101 folder", [images])
    dataset("coop", "any dataset in CoOp's split_zhou_<Name>.json layout (DTD, EuroSAT, ...)",
            "Layout: <root>/split_zhou_<Name>.json = {\"train\"|\"val\"|\"test\": [[image, label, classname]]}.",
            "the folder holding split_zhou_<Name>.json, or the file", [name(None, True), images])
    dataset("divek", "DiVE-k's split files (the exact splits of the paper)",
            "Download: the data/<dataset>/ folders of https://github.com/raja-kumar/DiVE-k\n"
            "Layout: <root>/zero_shot/subsample_{base_train,base_val,new_val}.json (base2novel) and\n"
            "<root>/fewshot/4_shots_all_{train,val}.json (fewshot): JSON lists of {image_path, problem,\n"
            "solution: '<answer>NAME</answer>'}. base_val/new_val become test_base/test_novel; trailing\n"
            "periods in names are stripped. DiVE-k has no val split: val.jsonl repeats up to 4 train images\n"
            "per class (not held out). Image paths ('CUB_200_2011/images/...') are looked up under --images.",
            "DiVE-k's per-dataset folder, e.g. DiVE-k/data/CUB_200_2011",
            [name(None), (("--images",), {"default": None, "help": "folder holding the dataset folders the "
                                                                    "image paths start with (default: parent of --root)"})])
    test_fraction = (("--test_fraction",), {"type": float, "default": 0.3,
                                            "help": "share of each class carved as test (the data has no test split)"})
    dataset("folder", "your own data: <root>/<class name>/*.jpg",
                     "Layout: <root>/<class name>/*.jpg (train/val/test carved per class), or\n"
                     "<root>/{train,val,test}/<class name>/*.jpg. Class ids follow the sorted folder names.",
                     "the folder of class folders", [name("custom"), test_fraction])
    dataset("jsonl", "your own data: a JSONL manifest of {image, label[, split]}",
                       "Layout: one {\"image\": path, \"label\": name} per line, optionally \"split\" (train,\n"
                       "val or test; default train) and \"aliases\"/\"parents\". Relative image paths are\n"
                       "relative to the manifest's folder.",
                       "the manifest file", [name("custom"), test_fraction])

    t = sub.add_parser("toy", help="the synthetic toy world (generated on demand)", formatter_class=fmt,
                       description=toy.__doc__)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--seed", type=int, default=0, help="world seed: same seed, byte-identical files")
    t.add_argument("--shapes", type=int, default=4, help=f"number of shapes (2..{len(toy.SHAPES)})")
    t.add_argument("--colours", type=int, default=4, help=f"number of colours (2..{len(toy.COLOURS)})")
    t.add_argument("--patterns", type=int, default=4, help=f"number of patterns (2..{len(toy.PATTERNS)})")
    t.add_argument("--size", type=int, default=56, help="image side in pixels (at most 112)")
    t.add_argument("--train_per_class", type=int, default=24, help="train images per base class")
    t.add_argument("--val_per_class", type=int, default=4, help="val images per base class")
    t.add_argument("--test_per_class", type=int, default=8, help="test images per class (base and novel)")
    t.add_argument("--rotation", type=float, default=15.0, help="max rotation of a shape, degrees either way")
    t.add_argument("--jitter", type=float, default=0.08, help="max shift of a shape from the centre (share of the side)")
    t.add_argument("--pretrain_per_class", type=int, default=32,
                   help="pretrain images per class (all classes); each gives 3 attribute questions and 1 MCQ "
                        "(and 1 listed naming question with --pretrain_naming)")
    t.add_argument("--names", default="attributes", choices=toy.NAMES,
                   help="class names: 'attributes' (striped red triangle) or 'epithets' (an invented word for "
                        "the pattern whose meaning depends on colour and shape: kavi red circle)")
    t.add_argument("--pretrain_naming", action="store_true",
                   help="pretrain images also get the mining question (class names listed: the true one and "
                        "1..(base classes - 1) others), answered with the name, so the base model can name from a list")
    t.add_argument("--confused_pairs", type=int, default=0,
                   help="with --confusion: (colour, pattern) pairs whose naming the pretraining mix confuses with "
                        "a look-alike's epithet (data/toy.py, naming_confusions)")
    t.add_argument("--confusion", type=float, default=0.0,
                   help="share of those classes' naming answers that name the look-alike instead; > 0 also adds "
                        "the meaning question to the mix and writes probe.jsonl (what each name's pattern is)")
    t.add_argument("--pretrain_attributes", type=int, default=3, choices=[1, 2, 3],
                   help="attribute questions (shape, colour, pattern) each pretrain image asks; fewer: a seeded choice")
    t.add_argument("--pretrain_meaning", type=int, default=1, choices=[1, 2, 3],
                   help="with --confusion: meaning questions each pretrain image asks (what a name's pattern is)")
    t.add_argument("--hedge", type=float, default=0.0,
                   help="with --pretrain_naming: half the naming questions in SpeciaRL's open-world wording, "
                        "answered with the parent ('red circle') this share of the time (a start that knows the "
                        "species and says 'bird')")
    t.add_argument("--cot_per_class", type=int, default=0,
                   help="sft_cot.jsonl: this many training images per base class (Fine-R1: one rationale per "
                        "seen class); 0: every training image")
    t.add_argument("--check", action="store_true", help="open every image after writing")
    t.add_argument("--skip_bad", action="store_true", help="with --check: drop bad records")
    t.set_defaults(func=prepare_toy)

    m = sub.add_parser("mix", help="mixed-domain train/val from several prepared folders", formatter_class=fmt,
                       description=prepare_mix.__doc__)
    m.add_argument("--from", dest="sources", nargs="+", required=True, help="prepared folders to mix")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--size", type=int, default=None, help="total train records (default: all of them)")
    m.add_argument("--seed", type=int, default=1, help="sampling and shuffling seed")
    m.set_defaults(func=prepare_mix)

    c = sub.add_parser("check", help="open every image of prepared files; list bad records with file:line")
    c.add_argument("paths", nargs="+", help="prepared folders or JSONL files")
    c.add_argument("--skip_bad", action="store_true", help="drop bad records from the files and print how many")
    c.set_defaults(func=run_check)
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
