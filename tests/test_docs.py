"""The repository's own documents: every reference into docs/methods.md points at a section that exists."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = re.compile(r"docs/methods\.md (?:§|section )(\d+(?:\.\d+)?)")


def sections():
    text = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
    found = set(re.findall(r"^## (\d+)\. ", text, re.M))
    found |= set(re.findall(r"^\*\*(\d+\.\d+) ", text, re.M))
    return found


def references():
    files = [p for pattern in ("*.py", "data/*.py", "runs/*", "tests/*.py", "*.md", "docs/*.md")
             for p in glob.glob(os.path.join(ROOT, pattern))]
    for path in files:
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            for section in REFERENCE.findall(line):
                yield os.path.relpath(path, ROOT), number, section


def test_every_reference_into_methods_points_at_a_section():
    have = sections()
    assert {"2", "3", "4", "5", "6", "2.1", "3.2", "3.4"} <= have  # the parser reads the headings
    refs = list(references())
    assert len(refs) >= 10  # the code does cite it
    missing = [(path, line, s) for path, line, s in refs if s not in have]
    assert not missing, missing
