"""runs/toy_base.py — a tiny Qwen-VL whose eyes work: the toy world's stand-in for a pretrained encoder.

A real Qwen2.5-VL arrives with a vision tower trained on billions of images. The tiny model starts from
random weights, and a random vision tower barely separates the toy world's shapes; trained only through
the language model's loss, it learns to see them far too slowly for a CPU budget, because the language
model first learns to ignore the image. So, as real VLMs are built, the vision tower is trained first,
here on the three attribute labels (shape, colour, pattern) with a linear head each, on images of all
classes drawn afresh at every step (from their own seeds: never an image of any split on disk; a fixed
set of images is memorised instead). The heads are then dropped; runs/toy.sh goes on with sft.py on the
attribute questions and MCQs (pretrain.jsonl) to make the "Instruct" model that the papers' pipeline
starts from. What it reaches: docs/LOG.md.

Drawing the images (PIL) and preparing them for the tower take a third of a step; a second process
does it for the next steps while this one trains (`--draw_workers 1`), so the two cores of a small
machine both work. Every step's classes and images come from seeds of their own, so the model is the
same with or without the worker.

    OMP_NUM_THREADS=1 python runs/toy_base.py --data out/toy/data --out out/toy/vision   # ~2 min, 2 CPU cores
"""

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vlm  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from common import rng_of  # noqa: E402
from tiny import build_tiny_model, read_corpus  # noqa: E402
from data import toy  # noqa: E402
from data.records import load_classes, load_image, read_records  # noqa: E402

ATTRIBUTES = toy.ATTRIBUTES


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a toy world prepared by `python -m data.prepare toy`")
    ap.add_argument("--out", required=True, help="output model folder (Hugging Face layout)")
    ap.add_argument("--max_steps", type=int, default=2400, help="optimizer steps of the vision pretraining")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision_hidden", type=int, default=128, help="width of the tiny vision tower")
    ap.add_argument("--text_layers", type=int, default=4, help="decoder layers of the tiny language model")
    ap.add_argument("--vision_depth", type=int, default=2, help="blocks of the tiny vision tower")
    ap.add_argument("--family", default="qwen2_5_vl", choices=list(vlm.FAMILIES),
                    help="the tiny model's architecture: qwen2_5_vl (patch 14) or qwen3_vl (patch 16, DeepStack)")
    ap.add_argument("--tower", default=None,
                    help="a folder this script wrote: take its trained vision tower (and merger) instead of training "
                         "one (the attributes it learns are the same in every seed's world: one tower serves them all)")
    ap.add_argument("--draw_workers", type=int, default=1, choices=[0, 1],
                    help="1: draw the next steps' images in a second process; 0: in this one (same model)")
    return ap.parse_args(argv)


_DRAW = {}  # what the drawing process needs, set once by draw_init


def draw_init(model_dir, world, classes, batch_size, seed):
    torch.set_num_threads(1)
    _DRAW.update(processor=vlm.Processor.from_pretrained(model_dir), world=world,
                 classes=classes, batch_size=batch_size, seed=seed)


def draw_batch(step):
    """Step `step`'s classes (their ids) and images as the vision tower's input, each drawn from its own seed
    (never an image of any split on disk: a fixed set of images is memorised). The seed is --seed, not the
    world's: the tower is then one function of the code and --seed, whichever world it was built beside."""
    d, world = _DRAW, _DRAW["world"]
    rng = rng_of("vision", d["seed"], step)
    batch = [rng.choice(d["classes"]) for _ in range(d["batch_size"])]
    images = [toy.render(c["attributes"], np.random.default_rng([d["seed"], toy.SPLIT_CODES["vision"], step, i]),
                         world["size"], world["rotation"], world["jitter"]) for i, c in enumerate(batch)]
    vis = d["processor"].image_processor(images=images, return_tensors="pt")
    return [c["id"] for c in batch], vis["pixel_values"], vis["image_grid_thw"]


def patch_embed_as_matmul(visual):
    """Run the vision tower's patch embedding, a Conv3d whose kernel is its stride (one patch in, one vector
    out), as the matmul it is: the same weights, the same outputs to float rounding (tests/test_runs.py), and
    on a CPU a fifth of the time with its backward (PyTorch's conv3d weight gradient is slow there: 11 of a
    training step's ~47 ms). Only this script trains the tower; the saved model is unchanged in form."""
    embed = visual.patch_embed
    w, b = embed.proj.weight, embed.proj.bias

    def forward(hidden_states):
        x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)  # (patches, C·T·P·P), the kernel's own order
        return torch.nn.functional.linear(x, w.view(w.shape[0], -1), b)

    embed.forward = forward


def tokenizer_corpus(data, table):
    """The texts the tiny tokenizer learns: the world's words (questions, targets, names) and Fine-R1's
    rationale template (its words are then tokens, not bytes, and a rationale fits the recipes' completion
    limit), not the CoT pool itself: a change to what sft_cot.jsonl asks must not change the start model."""
    files = [os.path.join(data, f"{name}.jsonl") for name in ("pretrain", "sft", "test_mcq")]
    return read_corpus([f for f in files if os.path.exists(f)]) + toy.rationale_corpus(table["classes"])


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    table = load_classes(os.path.join(args.data, "classes.json"))
    corpus = tokenizer_corpus(args.data, table)
    size = table["config"]["size"]
    # a visual token covers 28 px a side in Qwen2.5-VL, 32 in Qwen3-VL: Qwen3-VL's images are resized by 32/28
    # (56 -> 64 px), so that both families see an image as the same number of tokens (4 at 56 px)
    side = size * 2 * vlm.FAMILIES[args.family].patch_size // 28
    tiny = args.out + ".init"
    build_tiny_model(tiny, seed=args.seed, corpus=corpus, image_size=side, vision_hidden=args.vision_hidden,
                     text_layers=args.text_layers, vision_depth=args.vision_depth, family=args.family)
    model, processor = vlm.load_model(tiny), vlm.Processor.from_pretrained(tiny)  # at most side² pixels

    if args.tower:  # this world's tiny model (its tokenizer, its text weights) with the shared tower put in
        trained = vlm.load_model(args.tower).model.visual
        if trained.config.to_dict() != model.model.visual.config.to_dict():
            raise SystemExit(f"--tower {args.tower}: its vision tower is not this model's (other widths or family)")
        model.model.visual.load_state_dict(trained.state_dict())
        save_checkpoint(model, processor, args.out)
        print(f"wrote {args.out} (vision tower from {args.tower})")
        return

    world = table["config"]
    classes = table["classes"]
    values = {a: sorted({c["attributes"][a] for c in classes}) for a in ATTRIBUTES}
    held_out = read_records(os.path.join(args.data, "val.jsonl"))
    by_name = {c["name"]: c for c in classes}

    visual = model.model.visual
    patch_embed_as_matmul(visual)
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(model.config.text_config.hidden_size, len(values[a]))
                                 for a in ATTRIBUTES})
    optimizer = torch.optim.AdamW(list(visual.parameters()) + list(heads.parameters()), lr=args.lr)

    def features(pixel_values, grids):  # the mean of an image's merged visual tokens, as the language model gets them
        out = model.model.get_image_features(pixel_values, grids)
        # Qwen3-VL also adds DeepStack features (inner blocks' tokens, merged) after the first decoder layers:
        # summed in here, so that they are trained too and nothing the language model gets stays random
        tokens = [sum(parts) for parts in zip(out.pooler_output, *(getattr(out, "deepstack_features", None) or []))]
        return torch.stack([t.mean(0) for t in tokens])

    def targets(batch_classes, a):
        return torch.tensor([values[a].index(c["attributes"][a]) for c in batch_classes])

    init = (tiny, world, classes, args.batch_size, args.seed)
    if args.draw_workers:  # spawn, not fork: a forked copy of this process's torch state is not safe
        pool = multiprocessing.get_context("spawn").Pool(1, initializer=draw_init, initargs=init)
        batches = pool.imap(draw_batch, range(args.max_steps), chunksize=8)
    else:
        draw_init(*init)
        batches = map(draw_batch, range(args.max_steps))
    by_id, t0 = {c["id"]: c for c in classes}, time.time()
    visual.train()
    for step, (ids, pixel_values, grids) in enumerate(batches):
        batch_classes = [by_id[i] for i in ids]
        f = features(pixel_values, grids)
        loss = sum(torch.nn.functional.cross_entropy(heads[a](f), targets(batch_classes, a)) for a in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            print(f"vision pretraining step {step + 1}/{args.max_steps}: loss {loss.item():.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    if args.draw_workers:
        pool.close()
    visual.eval()
    with torch.no_grad():
        batch = processor.encode([load_image(r["image"]) for r in held_out], [""] * len(held_out))
        f = features(batch.pixel_values, batch.image_grid_thw)
        truth = [by_name[r["label"]] for r in held_out]
        acc = {a: (heads[a](f).argmax(1) == targets(truth, a)).float().mean().item() for a in ATTRIBUTES}
    print("held-out attribute accuracy (val images): " + ", ".join(f"{a} {100 * v:.1f}%" for a, v in acc.items()))
    save_checkpoint(model, processor, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
