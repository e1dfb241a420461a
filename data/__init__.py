"""Data for every stage: one JSONL record format, loaders for the real datasets, the papers' splits and
a synthetic toy world. Pure Python + PIL + numpy: nothing here imports torch or transformers.

- records.py  the record format: load_image, read_records, write_records, classes.json
- loaders.py  a user's download (CUB, Aircraft, Pets, CoOp json, DiVE-k, folders, manifests) -> records
- splits.py   base-to-novel, K-shot, validation carving, mixed-domain mixtures
- toy.py      the toy world (shapes x colours x patterns) and its SFT / CoT / pretrain / TAPO / MCQ files
- prepare.py  the command line: python -m data.prepare --help
- prompts.py  the questions every stage asks
"""

from .records import (ImageError, RecordError, class_names, classes_of, load_classes, load_image, make_record,  # noqa: F401
                      read_records, write_classes, write_records)
