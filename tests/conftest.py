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
