"""runs/toy_probe.py — does a model know what the toy world's names mean, whatever it answers when naming?

    python runs/toy_probe.py --model out/toy/seed_0/start/final --data out/toy/seed_0/data/probe.jsonl \
        --out out/toy/seed_0/eval/start/probe.json

probe.jsonl (data.prepare toy --confusion > 0; field "expected": the pattern) asks, for every class, base and
novel, "Which pattern does a kavi red circle have?" over a blank image (no shape: the image cannot answer it,
and no blank image is ever named), so only the model's knowledge of the epithets can. A start made to know
more than it answers (the naming confusions of data/toy.py) should answer this right while its greedy names
are often wrong. Greedy answers; an answer is right when it is the pattern's word, normalised as the exact-
match reward normalises names (reward.normalize). Writes {"n", "right", "acc", "format"}.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vlm  # noqa: E402
from data.records import atomic_write, load_image, read_records  # noqa: E402
from engine import sample_completions  # noqa: E402
from reward import extract_answer, format_ok, normalize  # noqa: E402


def probe(model, processor, records, batch_size=64, max_new_tokens=32):
    """(right, format ok) per record: the greedy answer against the record's `expected` pattern."""
    right, formats = [], []
    for s in range(0, len(records), batch_size):
        recs = records[s:s + batch_size]
        images = [load_image(r["image"], processor.pixel_bounds[1]) for r in recs]
        batch = processor.encode(images, [r["question"] for r in recs]).to(model.device)
        roll = sample_completions(model, batch, max_new_tokens=max_new_tokens, greedy=True,
                                  **processor.sampling_tokens)
        for rec, text in zip(recs, processor.decode(roll.completion_ids, roll.completion_mask)):
            right.append(normalize(extract_answer(text) or "") == normalize(rec["expected"]))
            formats.append(format_ok(text))
    return right, formats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--data", required=True, help="probe.jsonl of a toy world")
    ap.add_argument("--out", required=True, help="where the result goes (JSON)")
    args = ap.parse_args(argv)
    records = read_records(args.data)
    for rec in records:
        if "question" not in rec or "expected" not in rec:
            raise SystemExit(f"{rec['_src']}: a probe record needs 'question' and 'expected'")
    processor = vlm.Processor.from_pretrained(args.model)
    model = vlm.load_model(args.model, "cpu", "fp32")
    with torch.no_grad():
        right, formats = probe(model, processor, records)
    result = {"n": len(right), "right": sum(right), "acc": 100 * sum(right) / len(right),
              "format": 100 * sum(formats) / len(formats)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, json.dumps(result) + "\n")
    print(f"knowledge probe (what a name's pattern is, over a blank image): {result['acc']:.1f}% "
          f"of {result['n']} right, format {result['format']:.1f}%")


if __name__ == "__main__":
    main()
