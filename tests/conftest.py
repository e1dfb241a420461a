"""Shared test fixtures: a tiny model of each family (Qwen2.5-VL, Qwen3-VL) built once per session, and a few
PIL images. A test that takes `family`, or a fixture built on it (tiny_dir, tiny, squares, small_world), runs
once per family; `@pytest.mark.parametrize("family", [...], indirect=True)` narrows that where the family
cannot matter."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = ["Hi", "What is the name of the shape in this image?", "Name the shape, then explain why in detail."]
torch.set_num_threads(1)  # the tiny models run fastest on one thread (and leave a core to torchrun's children)


FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # vlm.FAMILIES' keys (config.model_type)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, family):
    """A random tiny model with peaked weights (init std 0.1), so greedy outputs differ between rows."""
    import tiny
    path = str(tmp_path_factory.mktemp(f"tiny_{family}") / "model")
    return tiny.build_tiny_model(path, seed=0, init_std=0.1, family=family)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import vlm
    return vlm.load_model(tiny_dir), vlm.Processor.from_pretrained(tiny_dir)


def random_image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def full_disk(whole_writes, then_chars):
    """A stand-in for `open`, to monkeypatch into a module: the files it opens take `whole_writes` writes, then,
    like a full disk, the first `then_chars` characters of the next one, which raises ENOSPC."""
    import builtins
    import errno
    writes = [0]

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            writes[0] += 1
            if writes[0] <= whole_writes:
                return self.f.write(text)
            self.f.write(text[:then_chars])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    return lambda path, *a, **k: FullDisk(builtins.open(path, *a, **k))


@pytest.fixture
def images():
    """Three images of different sizes (4, 6 and 8 merged patches)."""
    return [random_image(56, 56, 0), random_image(84, 56, 1), random_image(56, 112, 2)]


COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30),
           "cyan": (30, 220, 220), "magenta": (220, 30, 220), "grey": (128, 128, 128), "orange": (250, 140, 0)}


@pytest.fixture(scope="session")
def squares(tmp_path_factory, family):
    """8 one-colour images with short SFT targets, and a tiny model whose BPE knows their words.
    Returns (folder, records path, model folder)."""
    from tiny import build_tiny_model
    from data.records import write_records
    root = tmp_path_factory.mktemp("squares")
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (56, 56), rgb).save(root / f"{name}.png")
        records.append({"image": str(root / f"{name}.png"), "label": f"{name} square", "label_id": i,
                        "dataset": "toy", "split": "train", "aliases": [], "parents": ["square"],
                        "question": "What colour is the square?",
                        "target": f"<think>{name}</think><answer>{name} square</answer>"})
    write_records(str(root / "train.jsonl"), records)
    model_dir = str(root / "tiny")
    build_tiny_model(model_dir, seed=0, corpus=[r["target"] for r in records] + [records[0]["question"]],
                     family=family)
    return root, str(root / "train.jsonl"), model_dir


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A 2x2x2 toy world (8 classes, 4 base) with MCQ records on its train images (mcq.jsonl) and SFT rows
    on them (mcq_sft.jsonl). Returns (folder, the texts a tiny model's BPE is trained on)."""
    import json
    import random
    from data import toy
    from data.records import read_records, write_records
    from data.prompts import mcq_question, open_question, open_world_question
    root = tmp_path_factory.mktemp("world")
    toy.generate(str(root), seed=0, n_shapes=2, n_colours=2, n_patterns=2, train_per_class=3, val_per_class=1,
                 test_per_class=2, pretrain_per_class=1)
    names = [c["name"] for c in json.load(open(root / "classes.json"))["classes"]]
    rng = random.Random(0)
    mcq = []
    for r in read_records(str(root / "train.jsonl")):
        options = rng.sample([n for n in names if n != r["label"]], 2) + [r["label"]]
        rng.shuffle(options)
        mcq.append(dict(r, options=options, answer="ABC"[options.index(r["label"])]))
    write_records(str(root / "mcq.jsonl"), mcq)
    # rows for a short SFT (small_world's) on the MCQs and the open-ended questions, so that sampled answers
    # are sometimes right and rewards vary within groups for every recipe (MCQ letters, exact names, specificity)
    sft_rows = [dict(m, question=mcq_question("toy", m["options"]),
                     target=f"<think>{m['label']}</think><answer>{m['answer']}</answer>") for m in mcq]
    sft_rows += [dict(r, question=ask(r["dataset"]), target=f"<think>{r['label']}</think><answer>{r['label']}</answer>")
                 for r in read_records(str(root / "train.jsonl")) for ask in (open_question, open_world_question)]
    write_records(str(root / "mcq_sft.jsonl"), sft_rows)
    corpus = [json.loads(line).get("target", "") for line in open(root / "sft.jsonl")]
    return root, corpus + [r["question"] + " " + r["target"] for r in sft_rows] + names


_SMALL_WORLDS = {}


@pytest.fixture
def small_world(toy_world, family):
    """The toy world and a tiny model of `family` (peaked weights, BPE trained on the world's texts) after a
    short SFT on it. Returns (folder, model folder). Built once per family and session, by hand: a session
    fixture would be rebuilt (10 s) each time consecutive tests switch families, as the tests narrowed to
    one family make them do."""
    if family not in _SMALL_WORLDS:
        _SMALL_WORLDS[family] = _small_world(toy_world, family)
    return _SMALL_WORLDS[family]


def _small_world(toy_world, family):
    import sft
    from tiny import build_tiny_model
    root, corpus = toy_world
    build_tiny_model(str(root / family / "base"), seed=0, corpus=corpus, family=family)
    sft.main(["--model", str(root / family / "base"), "--data", str(root / "mcq_sft.jsonl"), "--out",
              str(root / family / "sft"), "--batch_size", "12", "--micro_batch_size", "12", "--lr", "3e-3",
              "--max_steps", "60", "--schedule", "constant", "--device", "cpu", "--no_check_images"])
    return root, str(root / family / "sft" / "final")
