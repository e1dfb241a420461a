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

def _check_fields(record, known_labels, names):
    """The reason a parsed record is bad, or None. Types are checked only for the fields we know; an alias
    must not also name another class in `names` ({normalised name: classes}, see scan_records)."""
    for key in ("image", "label"):
        if key not in record:
            return f"missing field '{key}'"
    for key in IMAGE_KEYS + STR_KEYS:
        if key in record and not isinstance(record[key], str):
            return f"field '{key}' must be a string, got {type(record[key]).__name__}"
    for key in ("image", "label"):
        if not record[key].strip():
            return f"field '{key}' is empty"
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
    for alias in record.get("aliases") or []:
        others = sorted(names.get(normalize(alias), set()) - {record["label"]})
        if others:
            return (f"alias {alias!r} of {record['label']!r} also names class {others[0]!r}: an answer "
                    f"{alias!r} would be credited to both")
    return None


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


def scan_records(path, *, check_images=False, known_labels=None, classes=None, shared_aliases=False):
    """Yield (record, None) for each good line and (None, RecordError) for each bad one.

    The slow, thorough pass behind read_records and `prepare check`: it goes on after a bad line so a
    user sees every problem at once. `classes` (a class table) gives the known labels. An alias must not
    name another class: one of the table's, or (unless `shared_aliases`: a raw manifest, which prepare
    cleans) one named by an earlier good record's label or aliases.
    """
    from reward import names_of
    path = str(path)
    names = {}
    if classes is not None:
        known_labels = set(class_names(classes)) if known_labels is None else known_labels
        names = name_index(classes)
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
            reason = _check_fields(record, known_labels, names)
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
            if not shared_aliases:  # a later record's alias must not name this class
                for name in names_of(record):
                    names.setdefault(name, set()).add(record["label"])
            record["_src"] = f"{path}:{number}"
            yield record, None


def read_records(path, *, check_images=False, skip_bad=False, known_labels=None, classes=None, shared_aliases=False):
    """Read a JSONL records file into a list of dicts.

    Blank lines are ignored. A bad line (not UTF-8, invalid JSON, a missing or mistyped field, an MCQ answer
    that is not one option's letter or not the label's, a label outside `known_labels` or the class table
    `classes`, an alias that also names another class (see scan_records), with `check_images` an image that
    does not decode or that Qwen2.5-VL refuses) raises RecordError "file:line: reason"; with `skip_bad` it
    is dropped and one summary line goes to stderr.
    """
    records, bad, first = [], 0, None
    for record, problem in scan_records(path, check_images=check_images, known_labels=known_labels,
                                        classes=classes, shared_aliases=shared_aliases):
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


def _check_names_differ(path, classes):
    """Two classes whose names are one once normalised cannot be told apart by an answer: every answer
    naming one would be credited to both."""
    from reward import normalize
    first = {}
    for i, cls in enumerate(classes):
        j = first.setdefault(normalize(cls["name"]), i)
        if j != i:
            raise ValueError(f"{path}: classes #{j} {classes[j]['name']!r} and #{i} {cls['name']!r} have the same "
                             "name: an answer naming it would be credited to both")


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
    """{normalised name or alias: the classes it names} over every class of a table (all its parts)."""
    from reward import normalize  # the one normalisation of names and answers
    index = {}
    for cls in classes_of(table):
        for name in [cls["name"]] + list(cls.get("aliases", [])):
            if normalize(name):
                index.setdefault(normalize(name), set()).add(cls["name"])
    return index


def drop_shared_aliases(classes):
    """Remove every alias that normalises to another class's name or alias: an answer naming it would be
    credited to two classes (the mining matcher already calls it ambiguous). Returns [(alias, classes)]."""
    index = name_index({"classes": classes})
    from reward import normalize
    dropped = []
    for cls in classes:
        shared = [a for a in cls.get("aliases", []) if len(index.get(normalize(a), ())) > 1]
        for alias in shared:
            dropped.append((alias, sorted(index[normalize(alias)])))
        cls["aliases"] = [a for a in cls.get("aliases", []) if a not in shared]
    return dropped


def class_names(table, which="all", dataset=None):
    """Names of the classes in id order: which = "base", "novel" or "all"; for a mixed-domain table,
    those of `dataset`'s part (all parts when not given)."""
    if which not in ("base", "novel", "all"):
        raise ValueError(f"which must be 'base', 'novel' or 'all', got {which!r}")
    return [c["name"] for c in classes_of(table, dataset)
            if which == "all" or (which == "base") == bool(c.get("base", True))]
