"""Shared test fixtures: a tiny Qwen2.5-VL built once per session, and a few PIL images."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny model with peaked weights (init std 0.1), so greedy outputs differ between rows."""
    import vlm
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    vlm.build_tiny_model(path, seed=0, init_std=0.1)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import vlm
    return vlm.load_model(tiny_dir), vlm.Processor.from_pretrained(tiny_dir)


def random_image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def images():
    """Three images of different sizes (4, 6 and 8 merged patches)."""
    return [random_image(56, 56, 0), random_image(84, 56, 1), random_image(56, 112, 2)]


COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30),
           "cyan": (30, 220, 220), "magenta": (220, 30, 220), "grey": (128, 128, 128), "orange": (250, 140, 0)}


@pytest.fixture(scope="session")
def squares(tmp_path_factory):
    """8 one-colour images with short SFT targets, and a tiny model whose BPE knows their words.
    Returns (folder, records path, model folder)."""
    import vlm
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
    vlm.build_tiny_model(model_dir, seed=0, corpus=[r["target"] for r in records] + [records[0]["question"]])
    return root, str(root / "train.jsonl"), model_dir
