"""The one record format every stage reads and writes, and the class table beside it.

A record is one JSON object per line of a JSONL file:

    {"image": "images/train/00_solid_red_circle_000.png", "label": "solid red circle", "label_id": 0,
     "dataset": "toy", "split": "train", "aliases": ["red solid circle"], "parents": ["circle", "red circle"]}

`image` and `label` are required; `parents` runs from the broadest to the closest parent. Stages add
fields (SFT `question`/`target`; MCQ `options`/`answer`; TAPO `positive`/`negative`/`negative_label`)
and every field this module does not know is kept as it is. Keys that start with "_" live in memory
only (`_src` = "file:line" where a record came from) and are never written.

Image paths (`image`, `positive`, `negative`) are written relative to the JSONL file's folder when the
image lies under it, so a prepared folder can be moved; reading resolves them back to absolute paths.

Nothing here imports torch: data does not depend on the model.
"""

import json
import math
import os
import sys
import tempfile
import unicodedata

import numpy as np
from PIL import Image, ImageOps


IMAGE_KEYS = ("image", "positive", "negative")  # fields holding image paths
STR_KEYS = ("label", "dataset", "split", "question", "target", "answer", "negative_label")
STR_LIST_KEYS = ("aliases", "parents", "options")


class RecordError(ValueError):
    """A bad line in a records file; the message always starts with "{file}:{line}: "."""

    def __init__(self, path, line, reason):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's image processor refuses longer sides (smart_resize)


def to_rgb(image):
    """The RGB image a camera or an editor meant, as transformers' own processor composes it: EXIF
    orientation applied, 16-bit values scaled to 8 bits (not clipped to white), and transparency composited
    onto white (PIL's convert("RGB") would keep whatever colour a transparent pixel stores)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit greyscale PNG/TIFF
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _decode_smaller(image, max_pixels):
    """Ask PIL to decode a JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling: the full-size pixels never exist
    in memory), as small as it goes with at least `max_pixels` pixels left, so the processor still only
    shrinks the image, to the same patch grid. A 100-megapixel photo no longer takes gigabytes before it
    is resized; an image the bound does not halve on both sides is decoded exactly as before."""
    w, h = image.size
    f = math.sqrt(max_pixels / (w * h))
    size = (math.ceil(w * f), math.ceil(h * f))  # the bound's area in the image's shape
    if w >= 2 * size[0] and h >= 2 * size[1]:  # else PIL would decode it at full size anyway
        image.draft(None, size)  # a no-op for formats other than JPEG


def load_image(path, max_pixels=None):
    """Open an image, decode it fully and convert it to RGB (`to_rgb`).

    `.load()` forces the decode now: PIL opens lazily, and a truncated JPEG would otherwise only fail
    later, deep inside a training step. Missing, corrupt and truncated files, and images too elongated
    for Qwen2.5-VL (over 200:1), raise ImageError naming the file. With `max_pixels` (the processor's
    bound) a JPEG many times larger is decoded smaller (`_decode_smaller`).
    """
    try:
        with Image.open(path) as image:
            if max_pixels:
                _decode_smaller(image, max_pixels)
            image.load()
            image = to_rgb(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from None
    w, h = image.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageError(f"{path}: {w}x{h} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1, which Qwen2.5-VL's "
                         "image processor refuses")
    return image


# ----------------------------------------------------------------------------------------------
# reading

def _check_fields(record, known_labels):
    """The reason a parsed record is bad, or None. Types are checked only for the fields we know; whether
    its names clash with another class's is NameTable's business."""
    for key in ("image", "label"):
        if key not in record:
            return f"missing field '{key}'"
    for key in IMAGE_KEYS + STR_KEYS:
        if key in record and not isinstance(record[key], str):
            return f"field '{key}' must be a string, got {type(record[key]).__name__}"
    for key in ("image", "label"):
        if not record[key].strip():
            return f"field '{key}' is empty"
    if not name_key(record["label"]):
        return f"label {record['label']!r} is nothing once normalised: no answer could name it"
    if "label_id" in record and (type(record["label_id"]) is not int or record["label_id"] < 0):
        return f"field 'label_id' must be a non-negative integer, got {record['label_id']!r}"
    for key in STR_LIST_KEYS:
        value = record.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return f"field '{key}' must be a list of strings"
    from reward import mcq_target, names_of, normalize  # plain Python: the one definition of an MCQ's target
    if "options" in record:
        if len(record["options"]) < 2:
            return "field 'options' needs at least 2 options"
        if "answer" in record:
            try:
                option = record["options"][mcq_target(record)]
            except ValueError as e:
                return str(e)
            if normalize(option) not in names_of(record):  # the reward scores the letter, so it must be the label
                return f"answer {record['answer']!r} is option {option!r}, not the label {record['label']!r}"
    if known_labels is not None and record["label"] not in known_labels:
        return f"unknown label {record['label']!r}"
    return None


def name_key(name):
    """What two classes' names and aliases must not share: reward.normalize's form with the format
    characters (Unicode Cf: zero-width space, soft hyphen, word joiner, byte-order mark) deleted first.
    They show nowhere, so 'Tern' and 'Te\u200brn' are one name to a reader and to a model. Empty for a
    name that normalises to nothing ('???'), which no answer can name."""
    from reward import normalize  # the one normalisation of names and answers
    return normalize("".join(ch for ch in str(name) if unicodedata.category(ch) != "Cf"))


class NameTable:
    """Which class each name and alias (by name_key) belongs to, over everything one run reads: its
    classes.json and every records file, whatever their number and order. An answer naming a class's name
    or alias is credited to that class, so each may belong to one class only; a check per file would let
    two files' records (or a label after another record's alias) share one. Give the same table to every
    read_records call of a run (`names=`)."""

    def __init__(self):
        self.owners = {}  # name key -> {class label: (what it is there, the name as written, where)}

    def add_classes(self, table):
        """The class table's names and aliases (all parts of a mixed-domain table); adding it again is
        harmless. Two of its classes that clash are load_classes' to refuse: here a record is refused
        when it names either."""
        for cls in classes_of(table):
            where = f"classes.json #{cls.get('id')}"
            self._add(cls["name"], [("name", cls["name"])] + [("alias", a) for a in cls.get("aliases") or []],
                      where)

    def add_record(self, record, aliases=True):
        """A good record's label (and, unless `aliases` is False, its aliases) from now on."""
        self._add(record["label"], self._names(record, aliases), record.get("_src", "?"))

    def clash(self, record, aliases=True):
        """Why the record's label or an alias (unless `aliases` is False) names another class, or None."""
        label = record["label"]
        for kind, name in self._names(record, aliases):
            others = sorted((other, seen) for other, seen in self.owners.get(name_key(name), {}).items()
                            if other != label)
            if others:
                other, (other_kind, other_name, where) = others[0]
                what = f"label {name!r}" if kind == "label" else f"alias {name!r} of {label!r}"
                return (f"{what} also names class {other!r} ({other_kind} {other_name!r} at {where}): "
                        f"an answer {name!r} would be credited to both")
        return None

    @staticmethod
    def _names(record, aliases):
        return [("label", record["label"])] + [("alias", a) for a in (record.get("aliases") or []) if aliases]

    def _add(self, label, names, where):
        for kind, name in names:
            if name_key(name):  # an alias of punctuation alone names nothing
                self.owners.setdefault(name_key(name), {}).setdefault(label, (kind, name, where))


def _utf8(data, path, first_line=1):
    """Bytes read from `path` as text; bytes that are not UTF-8 (a file saved as cp1252 or Latin-1) raise
    RecordError naming the line and byte, where a bare UnicodeDecodeError names neither file nor line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise RecordError(path, first_line + data.count(b"\n", 0, e.start),
                          f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1}); "
                          "save the file as UTF-8") from None


def scan_records(path, *, check_images=False, known_labels=None, classes=None, shared_aliases=False,
                 names=None):
    """Yield (record, None) for each good line and (None, RecordError) for each bad one.

    The slow, thorough pass behind read_records and `prepare check`: it goes on after a bad line so a
    user sees every problem at once. `classes` (a class table) gives the known labels. A label or alias
    must not name another class (NameTable): one of the table's, or one named by an earlier good record's
    label or aliases, in this file or, with `names` (a NameTable), in the files read with it before.
    `shared_aliases` (a raw manifest, which prepare cleans) leaves aliases unchecked; labels still are.
    """
    path = str(path)
    names = NameTable() if names is None else names
    if classes is not None:
        known_labels = set(class_names(classes)) if known_labels is None else known_labels
        names.add_classes(classes)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: records file not found")
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named, and the lines after it still read
        for number, raw in enumerate(f, start=1):
            try:
                line = _utf8(raw, path, number)
            except RecordError as e:
                yield None, e
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield None, RecordError(path, number, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                yield None, RecordError(path, number, f"expected a JSON object, got {type(record).__name__}")
                continue
            reason = _check_fields(record, known_labels) or names.clash(record, aliases=not shared_aliases)
            if reason is None:
                for key in IMAGE_KEYS:  # relative paths are relative to the JSONL file's folder
                    if key in record:
                        record[key] = os.path.normpath(os.path.join(folder, record[key]))
                if check_images:
                    for key in IMAGE_KEYS:
                        if key in record:
                            try:
                                load_image(record[key])
                            except ImageError as e:
                                reason = f"field '{key}': {e}"
                                break
            if reason is not None:
                yield None, RecordError(path, number, reason)
                continue
            record["_src"] = f"{path}:{number}"
            names.add_record(record, aliases=not shared_aliases)  # a later record must not name this class
            yield record, None


def read_records(path, *, check_images=False, skip_bad=False, known_labels=None, classes=None,
                 shared_aliases=False, names=None):
    """Read a JSONL records file into a list of dicts.

    Blank lines are ignored. A bad line (not UTF-8, invalid JSON, a missing or mistyped field, a label that
    normalises to nothing, an MCQ answer that is not one option's letter or not the label's, a label
    outside `known_labels` or the class table `classes`, a label or alias that also names another class
    (see scan_records; `names`: the NameTable of the run's files read so far), with `check_images` an
    image that does not decode or that Qwen2.5-VL refuses) raises RecordError "file:line: reason"; with
    `skip_bad` it is dropped and one summary line goes to stderr.
    """
    records, bad, first = [], 0, None
    for record, problem in scan_records(path, check_images=check_images, known_labels=known_labels,
                                        classes=classes, shared_aliases=shared_aliases, names=names):
        if record is not None:
            records.append(record)
            continue
        if not skip_bad:
            raise problem
        bad += 1
        first = first or problem
    if bad:
        print(f"{path}: skipped {bad} bad record(s); first: {first}", file=sys.stderr)
    return records


def require_fields(records, fields, needed_by):
    """Stop before any work when records lack one of `fields`, which `needed_by` (a flag) reads: one line
    naming the first such record's file:line and how many there are (a KeyError mid-run names neither)."""
    lacking = [r for r in records if any(field not in r for field in fields)]
    if lacking:
        raise SystemExit(f"{lacking[0].get('_src', '?')}: no {' and '.join(map(repr, fields))}, which {needed_by} "
                         f"needs ({len(lacking)} of {len(records)} records)")


def check_triplets(records):
    """TAPO (grpo.py --tapo) takes each anchor's look-alike negative from its `negative` field, else from the
    images of another class: stop before any work when an anchor has neither, i.e. the data has one class.
    (A positive always exists: another image of the class, or the anchor itself when it is the only one.)"""
    labels = {r["label"] for r in records}
    lacking = [r for r in records if not r.get("negative") and labels == {r["label"]}]
    if lacking:
        raise SystemExit(f"{lacking[0].get('_src', '?')}: no 'negative' image and no other class in the data to "
                         f"draw one from, which --tapo needs ({len(lacking)} of {len(records)} records)")


# ----------------------------------------------------------------------------------------------
# writing

def atomic_write(path, text):
    """Write text to path so that a reader never sees half a file: temp file, fsync, rename."""
    path = os.path.abspath(str(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".partial-tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _portable_path(image, folder):
    """Image path as written: relative to `folder` when it lies under it, else absolute."""
    image = os.path.abspath(image)
    if image.startswith(folder + os.sep):
        return os.path.relpath(image, folder).replace(os.sep, "/")
    return image


def write_records(path, records):
    """Write records as JSONL, atomically. Drops "_" keys; image paths as in `_portable_path`."""
    folder = os.path.dirname(os.path.abspath(str(path)))
    lines = []
    for record in records:
        out = {k: v for k, v in record.items() if not k.startswith("_")}
        for key in IMAGE_KEYS:
            if key in out:
                out[key] = _portable_path(out[key], folder)
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    atomic_write(path, "".join(lines))


def make_record(image, cls, dataset, split, **extra):
    """A record for one image of class table entry `cls` (a dict with id, name, aliases, parents)."""
    record = {"image": str(image), "label": cls["name"], "label_id": cls["id"], "dataset": dataset,
              "split": split, "aliases": list(cls.get("aliases", [])), "parents": list(cls.get("parents", []))}
    record.update(extra)
    return record


# ----------------------------------------------------------------------------------------------
# the class table: classes.json

def write_classes(path, table):
    """Write a class table, one class per line so that it reads (and diffs) well."""
    lines = ["{"]
    keys = [k for k in table if k != "classes"]
    for key in keys:
        lines.append(f" {json.dumps(key)}: {json.dumps(table[key], ensure_ascii=False)},")
    lines.append(' "classes": [')
    classes = table.get("classes", [])
    for i, cls in enumerate(classes):
        lines.append("  " + json.dumps(cls, ensure_ascii=False) + ("," if i < len(classes) - 1 else ""))
    lines.append(" ]")
    lines.append("}")
    atomic_write(path, "\n".join(lines) + "\n")


def load_classes(path):
    """Read classes.json (or the classes.json inside a prepared folder) and check it.

    {"dataset": str, "domain": str, "classes": [{"id", "name", "aliases", "parents", "base"}, ...]};
    ids run 0..n-1 in order. A mixed-domain table has no classes of its own but "parts":
    {dataset: table} (see prepare's `mix`).
    """
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, "classes.json")
    table = read_json(path)
    if not isinstance(table, dict) or not isinstance(table.get("classes"), list):
        raise ValueError(f"{path}: expected an object with a 'classes' list")
    for i, cls in enumerate(table["classes"]):
        if not isinstance(cls, dict) or not isinstance(cls.get("name"), str):
            raise ValueError(f"{path}: class #{i} has no name")
        if cls.get("id") != i:
            raise ValueError(f"{path}: class #{i} ({cls['name']!r}) has id {cls.get('id')!r}, expected {i}")
        cls.setdefault("aliases", [])
        cls.setdefault("parents", [])
        cls.setdefault("base", True)
    for part in [table] + list((table.get("parts") or {}).values()):
        _check_names_differ(path, part["classes"])
    return table


def read_json(path):
    """A JSON file a user gives; bad JSON or text that is not UTF-8 raises RecordError naming the line."""
    with open(path, "rb") as f:
        text = _utf8(f.read(), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(path, e.lineno, f"invalid JSON ({e.msg})") from None


def load_confusions(path, classes=None):
    """Read mine_topk.py's confusions.json (grpo.py --confusions: TAPO's look-alike negatives) and check
    it before any work: {class: [[another class, times answered], ...]}, most confused first. A file of
    another shape would fail mid-run in the rollouts, naming neither the file nor the fault. With a class
    table `classes`, every name must be one of its classes."""
    path = str(path)
    confusions = read_json(path)
    if not isinstance(confusions, dict):
        raise ValueError(f"{path}: expected a JSON object mapping each class to a list of [class, count] "
                         f"pairs (mine_topk.py's confusions.json), got a {type(confusions).__name__}")
    known = set(class_names(classes)) if classes is not None else None
    for label, pairs in confusions.items():
        if known is not None and label not in known:
            raise ValueError(f"{path}: class {label!r} is not a class of the class table")
        if not isinstance(pairs, list):
            raise ValueError(f"{path}: class {label!r}: expected a list of [class, count] pairs, "
                             f"got a {type(pairs).__name__}")
        for i, pair in enumerate(pairs, start=1):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                    and type(pair[1]) is int and pair[1] >= 0):
                raise ValueError(f"{path}: class {label!r}, pair #{i}: expected [class, count], got {pair!r}")
            if known is not None and pair[0] not in known:
                raise ValueError(f"{path}: class {label!r}, pair #{i}: {pair[0]!r} is not a class of the "
                                 "class table")
    return confusions


def _check_names_differ(path, classes):
    """Each name and alias must name one class once normalised (name_key): an answer naming two classes
    would be credited to both. A name that normalises to nothing ('???') no answer could name."""
    owner = {}  # name key -> index of the first class it names
    for i, cls in enumerate(classes):
        if not name_key(cls["name"]):
            raise ValueError(f"{path}: class #{i} {cls['name']!r} is nothing once normalised: no answer "
                             "could name it")
        aliases = cls.get("aliases", [])
        if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
            raise ValueError(f"{path}: class #{i} ({cls['name']!r}): 'aliases' must be a list of strings")
        for name in [cls["name"]] + aliases:
            key = name_key(name)
            j = owner.setdefault(key, i) if key else i
            if j != i:
                raise ValueError(f"{path}: classes #{j} {classes[j]['name']!r} and #{i} {cls['name']!r} "
                                 f"both name {key!r} once normalised: an answer naming it would be credited "
                                 "to both")


def classes_of(table, dataset=None):
    """The class entries for records of `dataset`: its part of a mixed-domain table, else the table's
    own classes (all parts' classes for a mixed table and an unknown dataset)."""
    parts = table.get("parts") or {}
    if dataset in parts:
        return parts[dataset]["classes"]
    if parts and not table.get("classes"):
        return [c for part in parts.values() for c in part["classes"]]
    return table["classes"]


def listed_classes(table, dataset, which):
    """Class entries of `dataset` in id order: which = base | novel | all | none (none -> [])."""
    if which == "none":
        return []
    return [c for c in classes_of(table, dataset)
            if which == "all" or (which == "base") == bool(c.get("base", True))]


def name_index(table):
    """{name key (name_key) of a name or alias: the classes it names} over every class of a table (all its
    parts)."""
    index = {}
    for cls in classes_of(table):
        for name in [cls["name"]] + list(cls.get("aliases", [])):
            if name_key(name):
                index.setdefault(name_key(name), set()).add(cls["name"])
    return index


def drop_shared_aliases(classes):
    """Remove every alias that normalises to another class's name or alias: an answer naming it would be
    credited to two classes (the mining matcher already calls it ambiguous). Returns [(alias, classes)]."""
    index = name_index({"classes": classes})
    dropped = []
    for cls in classes:
        shared = [a for a in cls.get("aliases", []) if len(index.get(name_key(a), ())) > 1]
        for alias in shared:
            dropped.append((alias, sorted(index[name_key(alias)])))
        cls["aliases"] = [a for a in cls.get("aliases", []) if a not in shared]
    return dropped


def class_names(table, which="all", dataset=None):
    """Names of the classes in id order: which = "base", "novel" or "all"; for a mixed-domain table,
    those of `dataset`'s part (all parts when not given)."""
    if which not in ("base", "novel", "all"):
        raise ValueError(f"which must be 'base', 'novel' or 'all', got {which!r}")
    return [c["name"] for c in classes_of(table, dataset)
            if which == "all" or (which == "base") == bool(c.get("base", True))]
