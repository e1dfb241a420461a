"""The toy world: a procedurally generated fine-grained dataset that plays the role of CUB on a CPU.

Classes are every combination of a shape, a colour and a pattern, named compositionally
("striped red triangle"), in a three-level hierarchy: shape ⊃ colour+shape ⊃ pattern+colour+shape, so
"triangle" is generic and "red triangle" less specific. With `names="epithets"` the pattern word of a
name is an invented epithet whose meaning differs from one colour to the next ("kavi red circle";
`make_world`), so that naming takes knowledge as well as sight (the world of runs/toy.sh).
Look-alike classes differ in one attribute.
Images are small (56 px by default) with random position, scale, rotation, colour jitter, background
tint and pixel noise, so no two images of a class are the same.

Base/novel split. Ids are ordered so that CoCoOp's rule (base = first ceil(n/2) ids) gives a split in
which every attribute value, and every pair of attribute values, appears in some base class: novel
classes are new *combinations* of seen attributes. The rule behind the order: a class (s, c, p) of
attribute indices is base when (s + c + p) mod 4 is 0 or 1 (base classes get the lowest ids, each
group in lexicographic order). On the default 4×4×4 world that is exactly 32 base classes; each base
class has 3 base look-alikes (one per attribute) and 6 novel ones. Other sizes take the first ceil(n/2)
of that order, and generation fails if some attribute value would be missing from base.

Files written (all in the record format of data/records.py, images as PNG under DIR/images/):
- classes.json, train.jsonl (base), val.jsonl (base), test_base.jsonl, test_novel.jsonl;
- sft.jsonl: train images with an open-ended question (every other one in SpeciaRL's open-world
  wording) and a short target "<think>shape: ... colour: ... pattern: ...</think>
  <answer>name</answer>" (the plain SFT target of the toy run);
- sft_cot.jsonl: Fine-R1-format chain of thought (numbered visual features -> candidates incl. base
  look-alikes -> comparison -> prediction) on the train images (or the first `cot_per_class` of each
  class: Fine-R1's few-shot pool), asked in turn with Fine-R1's open
  question, with DiVE-k's list of the base classes, in SpeciaRL's open-world wording, as the held-out
  MCQ (8 options, a cube: the candidates are the class and the 3 options one attribute away) and as the
  two-step's MCQ (2-5 options: the class and base look-alikes, all compared), answered with the option's
  text (the questions the toy comparison asks: a 1M-parameter model does not carry a format over to a
  wording it was never shown);
- pretrain.jsonl: what the tiny base model must know before SFT/RL, on separate images of ALL classes
  (never test images): single-attribute questions (shape, colour, pattern) and MCQs over the true class
  and 2-4 random others, answered with the option's text. It never asks for a class's name openly: the
  base model knows every name (as a real VLM knows bird names) but has not learned to name from sight.
  With `pretrain_naming` (the world of runs/toy.sh) it also asks DiVE-k's mining
  question, the true class listed among 1..(base classes - 1) others, so the base model names from a
  list before mining (with `hedge`, half the time SpeciaRL's open-world question instead);
- triplets.jsonl: TAPO triplets on train images (positive: same class; negative: a base look-alike);
- test_mcq.jsonl: closed-world MCQs on test_base images, options = the 8 corners of a cube around the
  true class (one other value per attribute and every combination: `mcq_cube`), so that the options'
  text does not give the answer away.

Deterministic: every image is drawn from its own RNG seeded by (seed, split, class, index), and the
same seed gives byte-identical files.
"""

import math
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from .prompts import FORMAT, LETTERS, mcq_question, open_question, open_world_question
from .records import make_record, write_classes, write_records

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
COLOURS = {"red": (215, 40, 40), "green": (40, 155, 55), "blue": (45, 80, 215), "yellow": (235, 205, 40),
           "purple": (135, 55, 175), "orange": (240, 135, 30)}
PATTERNS = ["solid", "striped", "dotted", "checked", "ringed"]
EPITHETS = ["kavi", "mulo", "tesa", "rino", "danu"]  # names="epithets": invented words, one per pattern value
NAMES = ("attributes", "epithets")

ATTRIBUTE_QUESTIONS = {
    "shape": "What shape is in this image? " + FORMAT,
    "colour": "What colour is the shape in this image? " + FORMAT,
    "pattern": "What pattern is on the shape in this image? " + FORMAT,
}
ATTRIBUTES = ("shape", "colour", "pattern")
# the knowledge probe: what a name means, asked over a blank image (the image cannot answer it)
MEANING_QUESTION = "Which pattern does a {name} have? " + FORMAT
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "pretrain": 3, "vision": 4, "blank": 5}  # vision: runs/toy_base.py


# ----------------------------------------------------------------------------------------------
# the class table

def make_world(n_shapes=4, n_colours=4, n_patterns=4, names="attributes"):
    """The class table: every (shape, colour, pattern), ids ordered so that base = first ceil(n/2).

    names="attributes": "striped red triangle", the name spells out all three attributes.
    names="epithets": "kavi red triangle", the pattern is replaced by an invented epithet (`EPITHETS`)
    whose meaning depends on the colour: "kavi" is striped among red shapes and checked among green ones
    (a seeded permutation per colour, 16 facts to know). As with "Laysan" or "Black-footed"
    Albatross, the name says the genus (red triangle) but not what the species looks like: a model must
    know which epithet goes with which look, and that knowledge is what learning to tell look-alikes
    apart can add (runs/toy.sh). Aliases swap the first two words; parents are the same."""
    if names not in NAMES:
        raise ValueError(f"toy names must be one of {NAMES}, got {names!r}")
    for what, n, pool in (("shapes", n_shapes, SHAPES), ("colours", n_colours, COLOURS), ("patterns", n_patterns, PATTERNS)):
        if not 2 <= n <= len(pool):
            raise ValueError(f"the toy world needs 2..{len(pool)} {what}, got {n}")
    colours = list(COLOURS)
    combos = [(s, c, p) for s in range(n_shapes) for c in range(n_colours) for p in range(n_patterns)]
    combos.sort(key=lambda t: (sum(t) % 4 >= 2, t))
    n_base = math.ceil(len(combos) / 2)
    classes = []
    for i, (s, c, p) in enumerate(combos):
        shape, colour, pattern = SHAPES[s], colours[c], PATTERNS[p]
        if names == "epithets":
            words = EPITHETS[:n_patterns]
            random.Random(f"epithets:{colour}").shuffle(words)
            pattern_word = words[p]
        else:
            pattern_word = pattern
        classes.append({"id": i, "name": f"{pattern_word} {colour} {shape}", "aliases": [f"{colour} {pattern_word} {shape}"],
                        "parents": [shape, f"{colour} {shape}"], "base": i < n_base,
                        "attributes": {"shape": shape, "colour": colour, "pattern": pattern}})
    for attribute in ("shape", "colour", "pattern"):
        seen = {c["attributes"][attribute] for c in classes if c["base"]}
        every = {c["attributes"][attribute] for c in classes}
        if seen != every:
            raise ValueError(f"toy split leaves {attribute} {sorted(every - seen)} out of the base classes")
    return classes


def naming_confusions(classes, pairs, seed):
    """{class id: the class a confused naming says instead}: `pairs` of the (colour, pattern) pairs (a
    seeded choice) have their epithet mixed up with that of another pattern of the same colour (seeded
    too), for every shape alike, base and novel. The confusion lives in the (colour, pattern) -> epithet
    facts that base and novel classes share, as a real model's mix-up of two look-alike species does."""
    by_key = {tuple(c["attributes"][k] for k in ATTRIBUTES): c for c in classes}
    patterns = sorted({c["attributes"]["pattern"] for c in classes}, key=PATTERNS.index)
    colours = sorted({c["attributes"]["colour"] for c in classes}, key=list(COLOURS).index)
    rng = random.Random(f"{seed}:confusion")
    chosen = rng.sample([(c, p) for c in colours for p in patterns], min(pairs, len(colours) * len(patterns)))
    swap = {(c, p): rng.choice([q for q in patterns if q != p]) for c, p in chosen}
    return {c["id"]: by_key[c["attributes"]["shape"], c["attributes"]["colour"], swap[key]]
            for c in classes if (key := (c["attributes"]["colour"], c["attributes"]["pattern"])) in swap}


def lookalikes(cls, classes):
    """Classes that differ from `cls` in exactly one attribute."""
    a = cls["attributes"]
    return [c for c in classes if sum(c["attributes"][k] != a[k] for k in a) == 1]


# ----------------------------------------------------------------------------------------------
# drawing

def _outline(shape, r, centre):
    """Polygon points (or None for the circle) of a shape with circumradius r around centre."""
    cx, cy = centre
    if shape == "circle":
        return None
    if shape == "cross":
        w = 0.38 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    else:
        n = {"triangle": 3, "square": 4, "hexagon": 6}[shape]
        radii = [r] * n
        angles = [-math.pi / 2 + (math.pi / n if shape == "square" else 0) + 2 * math.pi * k / n for k in range(n)]
    return [(cx + q * math.cos(t), cy + q * math.sin(t)) for q, t in zip(radii, angles)]


def _pattern(draw, pattern, side, ink, rng, scale):
    """Draw a pattern over a side×side tile, with a random phase (scale = pixels per 56-px pixel)."""
    period = 5 * scale
    ox, oy = rng.uniform(0, period, size=2)
    if pattern == "striped":
        for x in np.arange(-period + ox, side + period, period):
            draw.rectangle([x, 0, x + period / 2, side], fill=ink)
    elif pattern == "dotted":
        step, radius = 5.5 * scale, 1.3 * scale
        for y in np.arange(-step + oy, side + step, step):
            for x in np.arange(-step + ox, side + step, step):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=ink)
    elif pattern == "checked":
        cell = 4 * scale
        for j, y in enumerate(np.arange(-cell + oy, side + cell, cell)):
            for i, x in enumerate(np.arange(-cell + ox, side + cell, cell)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + cell, y + cell], fill=ink)
    elif pattern == "ringed":
        c = side / 2
        for q in np.arange(side, 0, -period):
            draw.ellipse([c - q, c - q, c + q, c + q], fill=ink if int(round(q / period)) % 2 == 0 else None)


def render(attributes, rng, size=56, rotation=15.0, jitter=0.08):
    """One image of a class: a patterned shape at a random place, scale and rotation on a tinted,
    noisy background. Drawn at twice the size and downsampled, so thin patterns stay smooth."""
    scale = 2 * size / 56  # drawing pixels per pixel of a 56-px image
    big = 2 * size
    image = _background(rng, big)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[attributes["colour"]]) + rng.uniform(-18, 18, 3), 0, 255))
    ink = (250, 250, 250) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] < 150 else (25, 25, 25)
    r = rng.uniform(0.26, 0.40) * big  # circumradius
    side = int(2 * r) + 4
    tile = Image.new("RGB", (side, side), fill)
    _pattern(ImageDraw.Draw(tile), attributes["pattern"], side, ink, rng, scale)
    mask = Image.new("L", (side, side), 0)
    points = _outline(attributes["shape"], r, (side / 2, side / 2))
    if points is None:
        q = 0.88 * r
        ImageDraw.Draw(mask).ellipse([side / 2 - q, side / 2 - q, side / 2 + q, side / 2 + q], fill=255)
    else:
        ImageDraw.Draw(mask).polygon(points, fill=255)
    angle = rng.uniform(-rotation, rotation)
    tile = tile.rotate(angle, resample=Image.BILINEAR)
    mask = mask.rotate(angle, resample=Image.BILINEAR)
    cx, cy = np.clip(big / 2 + rng.uniform(-jitter, jitter, size=2) * big, r + 2, big - r - 2)
    image.paste(tile, (int(cx - side / 2), int(cy - side / 2)), mask)
    return _noisy(image, rng, size)


def blank(rng, size=56):
    """The background of an image with no shape: what a question that the image cannot answer is asked over."""
    return _noisy(_background(rng, 2 * size), rng, size)


def _background(rng, big):
    background = tuple(int(v) for v in np.clip(rng.uniform(150, 225) + rng.uniform(-20, 20, 3), 0, 255))
    return Image.new("RGB", (big, big), background)


def _noisy(image, rng, size):
    image = image.resize((size, size), Image.BOX)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _draw_blanks(out, split, n, seed, size):
    """`n` blank images for `split`; returns their paths."""
    folder = os.path.join(out, "images", f"blank_{split}")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"blank_{k:03d}.png") for k in range(n)]
    for k, path in enumerate(paths):
        blank(np.random.default_rng([seed, SPLIT_CODES["blank"], SPLIT_CODES[split], k]), size).save(path, optimize=False)
    return paths


def _draw_split(out, split, classes, per_class, seed, size, rotation, jitter):
    """Render and save `per_class` images of each class; returns [(relative path, class)]."""
    folder = os.path.join(out, "images", split)
    os.makedirs(folder, exist_ok=True)
    items = []
    for cls in classes:
        slug = cls["name"].replace(" ", "_")
        for k in range(per_class):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], cls["id"], k])
            path = os.path.join(folder, f"{cls['id']:02d}_{slug}_{k:03d}.png")
            render(cls["attributes"], rng, size, rotation, jitter).save(path, optimize=False)
            items.append((path, cls))
    return items


# ----------------------------------------------------------------------------------------------
# targets written from the known attributes

def _attributes_think(a):
    return f"<think>shape: {a['shape']}. colour: {a['colour']}. pattern: {a['pattern']}.</think>"


def short_target(cls):
    """The plain SFT target of the toy run."""
    return _attributes_think(cls["attributes"]) + f"<answer>{cls['name']}</answer>"


def meaning_target(cls):
    """The answer to MEANING_QUESTION: the named class's pattern."""
    return f"<think>{cls['name']}: {cls['attributes']['pattern']}.</think><answer>{cls['attributes']['pattern']}</answer>"


def cot_target(cls, candidates):
    """A Fine-R1-format rationale, terse (about 45 tokens: a 1M-parameter model keeps a short template
    together, and it fits a CPU budget): visual analysis -> the candidates, each compared with what is
    seen (the attribute that rules it out, which for a look-alike's epithet is what the name means:
    "kavi red circle: striped", the knowledge a teacher given the label writes down) -> prediction."""
    a = cls["attributes"]
    compared = []
    for c in candidates:
        wrong = [k for k in ATTRIBUTES if c["attributes"][k] != a[k]]
        compared.append(f"{c['name']}: " + (c["attributes"][wrong[0]] if wrong else "matches"))
    return (f"<think>Visual analysis: {a['shape']}, {a['colour']}, {a['pattern']}.\nCandidates compared: "
            + "; ".join(compared) + f".\nPrediction: {cls['name']}.</think><answer>{cls['name']}</answer>")


def rationale_corpus(classes):
    """One rationale a class, every look-alike compared: the CoT template's words as a tokenizer learns
    them (runs/toy_base.py), whatever sft_cot.jsonl samples and asks, so that changing Fine-R1's pool does
    not change the start model."""
    return [cot_target(c, [c] + lookalikes(c, classes)) for c in classes]


def mcq_cube(cls, classes, rng):
    """The 7 other corners of a cube around `cls`: one other value per attribute, drawn at random, and
    every combination of the two values of each. Every corner is like every other (each differs from 3
    options in one attribute, from 3 in two, from 1 in all three), so the options' text says nothing
    about which one is right: with the true class and 4 of its look-alikes, the true class is the one
    option one attribute away from all the others, and a text-only rule would score 100%."""
    a = cls["attributes"]
    pairs = {k: (a[k], rng.choice(sorted({c["attributes"][k] for c in classes} - {a[k]}))) for k in ATTRIBUTES}
    corners = [c for c in classes if all(c["attributes"][k] in pairs[k] for k in ATTRIBUTES)]
    return [c for c in corners if c is not cls]


def _mcq(cls, others, rng):
    """Options = cls + others in a seeded random order; returns (options, answer letter)."""
    options = [cls] + list(others)
    rng.shuffle(options)
    return [c["name"] for c in options], LETTERS[options.index(cls)]


# ----------------------------------------------------------------------------------------------
# the whole world on disk

def generate(out, seed=0, n_shapes=4, n_colours=4, n_patterns=4, size=56, train_per_class=24,
             val_per_class=4, test_per_class=8, pretrain_per_class=32, rotation=15.0, jitter=0.08,
             names="attributes", pretrain_naming=False, confused_pairs=0, confusion=0.0,
             pretrain_attributes=3, pretrain_meaning=1, hedge=0.0, cot_per_class=0):
    """Write the toy world to `out`; returns {file stem: records} for the summary table.

    `pretrain_naming`: the pretraining mix also asks DiVE-k's mining question (the open-ended question
    that lists class names, in id order) with the true class among 1 to len(base) - 1 random others, answered with
    its name, so the base model can name from a list, as an Instruct model can, before it is mined.
    `confused_pairs`, `confusion`: a start that knows more than it answers. In that naming question, the
    classes of `confused_pairs` (colour, pattern) pairs (`naming_confusions`) are answered with their
    look-alike's name a `confusion` share of the time, after a rationale that states the true attributes;
    the attribute questions, the MCQs and the meaning question (what a name's pattern is) stay right.
    `pretrain_attributes`: how many of the three attribute questions each pretraining image asks (a
    seeded choice when fewer; the naming rationale states all three anyway). `pretrain_meaning`: how many
    meaning questions each pretraining image adds (with `confusion`), each over a blank image.
    `hedge`: SpeciaRL's premise, a model that knows the species and says "bird". Each pretraining image's
    naming question is then asked in SpeciaRL's open-world wording half the time (the listed wording the
    other half), and an open-world answer names only the parent ("red circle") a `hedge` share of the
    time, the class's name otherwise (confused as above).
    `cot_per_class`: Fine-R1's stage 1 is one rationale per seen class (a few-shot pool), not one per
    training image; with N > 0, sft_cot.jsonl holds the first N training images of each base class."""
    if size > 112:
        raise ValueError(f"toy images are at most 112 px, got {size}")
    if not 1 <= pretrain_attributes <= len(ATTRIBUTES):
        raise ValueError(f"pretrain_attributes {pretrain_attributes}: 1 to {len(ATTRIBUTES)} questions an image")
    if not 0 <= hedge <= 1 or (hedge > 0 and not pretrain_naming):
        raise ValueError(f"hedge {hedge}: a share in [0, 1] of the open-world naming answers (pretrain_naming)")
    if not 0 <= confusion <= 1 or (confusion > 0 and not (pretrain_naming and confused_pairs > 0)):
        raise ValueError(f"confusion {confusion}: a share in [0, 1] of the naming answers (pretrain_naming) of "
                         f"confused_pairs > 0 (colour, pattern) pairs")
    classes = make_world(n_shapes, n_colours, n_patterns, names)
    base = [c for c in classes if c["base"]]
    config = {"seed": seed, "shapes": n_shapes, "colours": n_colours, "patterns": n_patterns, "size": size,
              "train_per_class": train_per_class, "val_per_class": val_per_class,
              "test_per_class": test_per_class, "pretrain_per_class": pretrain_per_class,
              "rotation": rotation, "jitter": jitter, "names": names,
              "pretrain_naming": pretrain_naming, "confused_pairs": confused_pairs,
              "confusion": confusion, "pretrain_attributes": pretrain_attributes,
              "pretrain_meaning": pretrain_meaning, "hedge": hedge, "cot_per_class": cot_per_class}
    write_classes(os.path.join(out, "classes.json"),
                  {"dataset": "toy", "domain": "shape", "config": config, "classes": classes})

    def records(items, split, **extra):
        return [make_record(path, cls, "toy", split, **extra) for path, cls in items]

    train_items = _draw_split(out, "train", base, train_per_class, seed, size, rotation, jitter)
    files = {
        "train": records(train_items, "train"),
        "val": records(_draw_split(out, "val", base, val_per_class, seed, size, rotation, jitter), "val"),
    }
    test_items = _draw_split(out, "test", classes, test_per_class, seed, size, rotation, jitter)
    files["test_base"] = records([(p, c) for p, c in test_items if c["base"]], "test_base")
    files["test_novel"] = records([(p, c) for p, c in test_items if not c["base"]], "test_novel")

    # SFT on the base classes: open-ended questions, every other one in SpeciaRL's open-world wording
    question = open_question("toy")
    files["sft"] = [make_record(p, c, "toy", "train", question=question if i % 2 == 0 else open_world_question("toy"),
                                target=short_target(c)) for i, (p, c) in enumerate(train_items)]

    rng = random.Random(f"{seed}:sft_cot")
    # the table's questions in turn: open, listed, open-world, the held-out MCQ, and DiVE-k's two-step MCQ
    cot_questions = [question, open_question("toy", [c["name"] for c in base]), open_world_question("toy"), "mcq",
                     "choice"]
    files["sft_cot"] = []
    cot_items, taken = [], {}  # the first cot_per_class images of each class, in training order (0: all)
    for path, cls in train_items:
        taken[cls["id"]] = taken.get(cls["id"], 0) + 1
        if not cot_per_class or taken[cls["id"]] <= cot_per_class:
            cot_items.append((path, cls))
    for i, (path, cls) in enumerate(cot_items):
        near = [c for c in lookalikes(cls, classes) if c["base"]]
        candidates = [cls] + rng.sample(near, min(3, len(near)))
        rng.shuffle(candidates)
        asked = cot_questions[i % len(cot_questions)]
        if asked == "mcq":  # the held-out MCQ's 8 options (a cube around the class); the candidates compared,
            # in the options' order, are the class and the 3 options one attribute away; answered with the text
            options = [cls] + mcq_cube(cls, classes, rng)
            rng.shuffle(options)
            near = lookalikes(cls, options)
            candidates = [c for c in options if c is cls or c in near]
        elif asked == "choice":  # the two-step's MCQ: 2-5 names the model might give (the class and base
            # look-alikes), every one compared; without it the CoT model wrote nested <think>s on 2 options
            near = near or lookalikes(cls, classes)  # a small world's class may have no base look-alike
            options = [cls] + rng.sample(near, min(rng.randint(1, 4), len(near)))
            rng.shuffle(options)
            candidates = options
        if asked in ("mcq", "choice"):
            names = [c["name"] for c in options]
            mcq = {"question": mcq_question("toy", names), "options": names, "answer": LETTERS[options.index(cls)]}
        else:
            mcq = {"question": asked}
        files["sft_cot"].append(make_record(path, cls, "toy", "train", target=cot_target(cls, candidates), **mcq))

    confused = naming_confusions(classes, confused_pairs, seed) if confusion > 0 else {}
    blanks = _draw_blanks(out, "pretrain", 32, seed, size) if confusion > 0 else []
    rng = random.Random(f"{seed}:pretrain")
    files["pretrain"] = []
    for path, cls in _draw_split(out, "pretrain", classes, pretrain_per_class, seed, size, rotation, jitter):
        a = cls["attributes"]
        asked = ATTRIBUTE_QUESTIONS if pretrain_attributes == len(ATTRIBUTES) else \
            dict(rng.sample(sorted(ATTRIBUTE_QUESTIONS.items()), pretrain_attributes))
        for attribute, text in asked.items():
            target = f"<think>{attribute}: {a[attribute]}.</think><answer>{a[attribute]}</answer>"
            files["pretrain"].append(make_record(path, cls, "toy", "pretrain", task=attribute,
                                                 question=text, target=target))
        others = rng.sample([c for c in classes if c is not cls], rng.randint(2, 4))
        options, letter = _mcq(cls, others, rng)
        # answered with the option's text, which the MCQ reward accepts: pointing at the right letter is an
        # in-context lookup a 1M-parameter model does not learn in a CPU budget
        files["pretrain"].append(make_record(path, cls, "toy", "pretrain", task="mcq",
                                             question=mcq_question("toy", options), options=options, answer=letter,
                                             target=_attributes_think(a) + f"<answer>{cls['name']}</answer>"))
        if pretrain_naming:
            # 2 .. len(base) names, as many as the mining prompt lists (the base classes)
            listed = rng.sample([c for c in classes if c is not cls], rng.randint(1, len(base) - 1))
            said = confused[cls["id"]] if cls["id"] in confused and rng.random() < confusion else cls
            listed = sorted({c["id"]: c for c in listed + [cls, said]}.values(), key=lambda c: c["id"])
            if hedge > 0 and rng.random() < 0.5:  # SpeciaRL's wording: no list, the parent a hedge share
                answer = cls["parents"][-1] if rng.random() < hedge else said["name"]
                files["pretrain"].append(make_record(path, cls, "toy", "pretrain", task="open_world",
                                                     question=open_world_question("toy"),
                                                     target=_attributes_think(a) + f"<answer>{answer}</answer>"))
            else:
                files["pretrain"].append(make_record(path, cls, "toy", "pretrain", task="open_list",
                                                     question=open_question("toy", [c["name"] for c in listed]),
                                                     target=_attributes_think(a) + f"<answer>{said['name']}</answer>"))
        for _ in range(pretrain_meaning if confusion > 0 else 0):  # a class's meaning, over a blank image
            named = rng.choice(classes)
            files["pretrain"].append(make_record(rng.choice(blanks), named, "toy", "pretrain", task="meaning",
                                                 question=MEANING_QUESTION.format(name=named["name"]),
                                                 target=meaning_target(named)))
    rng.shuffle(files["pretrain"])  # a mixture of tasks: interleave them

    by_class = {}
    for path, cls in train_items:
        by_class.setdefault(cls["id"], []).append(path)
    rng = random.Random(f"{seed}:triplets")
    files["triplets"] = []
    for path, cls in train_items:
        positives = [p for p in by_class[cls["id"]] if p != path] or [path]
        negative_cls = rng.choice([c for c in lookalikes(cls, classes) if c["base"]] or [c for c in base if c is not cls])
        files["triplets"].append(make_record(path, cls, "toy", "train", positive=rng.choice(positives),
                                             negative=rng.choice(by_class[negative_cls["id"]]),
                                             negative_label=negative_cls["name"]))

    if confusion > 0:  # the knowledge probe: each class's meaning, over blank images never trained on
        test_blanks = _draw_blanks(out, "test", 16, seed, size)
        rng = random.Random(f"{seed}:probe")
        files["probe"] = [make_record(rng.choice(test_blanks), cls, "toy", "probe",
                                      question=MEANING_QUESTION.format(name=cls["name"]),
                                      expected=cls["attributes"]["pattern"]) for cls in classes for _ in range(4)]

    rng = random.Random(f"{seed}:test_mcq")
    files["test_mcq"] = []
    for path, cls in test_items:
        if cls["base"]:
            options, letter = _mcq(cls, mcq_cube(cls, classes, rng), rng)
            files["test_mcq"].append(make_record(path, cls, "toy", "test_base", question=mcq_question("toy", options),
                                                 options=options, answer=letter))

    for stem, recs in files.items():
        write_records(os.path.join(out, f"{stem}.jsonl"), recs)
    return files
