"""mine_topk.py: the counting and MCQ rules on hand-made answers, then the tiny model end to end, resume,
and a 2-rank torchrun run equal to a 1-process run."""
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch

import mine_topk as M
import vlm
from conftest import random_image
from data.records import read_records, write_classes, write_records
from reward import LETTERS, ClassMatcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["red circle", "blue circle", "red square", "blue square", "red star", "blue star"]  # first 3 base
PARENTS = {"circle": "circle", "square": "square", "star": "star"}
# what the patched decode answers: base names, an alias, a parent, abstain, a novel name, a hedge, junk
FAKE_ANSWERS = ["red circle", "blue circle", "red square", "Red-Circle", "circle", "None", "blue square",
                "red circle or blue circle", "shape", "nonsense"]




def make_world(folder, n_train=6, corrupt=True):
    """A 6-class toy dataset in `folder`: classes.json, train.jsonl (base classes only, one corrupt image),
    test_base.jsonl / test_novel.jsonl with MCQ options. Returns the folder as a str."""
    folder = str(folder)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    classes = [{"id": i, "name": n, "aliases": [n.replace(" ", "_")], "parents": [n.split()[-1]], "base": i < 3}
               for i, n in enumerate(NAMES)]
    write_classes(os.path.join(folder, "classes.json"), {"dataset": "toy", "domain": "shape", "classes": classes})

    def record(i, cls, split, size=(56, 56), **extra):
        path = os.path.join(folder, "images", f"{split}_{i}.png")
        random_image(*size, seed=1000 * len(split) + i).save(path)
        return {"image": path, "label": cls["name"], "label_id": cls["id"], "dataset": "toy", "split": split,
                "aliases": cls["aliases"], "parents": cls["parents"], **extra}

    train = [record(i, classes[i % 3], "train", size=(56, 56 + 28 * (i % 2))) for i in range(n_train)]
    if corrupt:
        with open(train[2]["image"], "wb") as f:
            f.write(b"not a png")
    write_records(os.path.join(folder, "train.jsonl"), train)
    tests = [record(i, classes[i], "test", options=[NAMES[(i + j) % 6] for j in range(3)], answer="A")
             for i in range(6)]
    write_records(os.path.join(folder, "test_base.jsonl"), tests[:3])
    write_records(os.path.join(folder, "test_novel.jsonl"), tests[3:])
    return folder


def fake_decode(self, ids, mask):
    """Stand-in for Processor.decode: a random tiny model never names a class, so map each sampled token
    sequence to a well-formed answer from FAKE_ANSWERS (a function of the tokens: sampling still matters)."""
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        h = sum((j + 1) * t for j, (t, keep) in enumerate(zip(row, m)) if keep)
        out.append(f"<think>looking</think> <answer>{FAKE_ANSWERS[h % len(FAKE_ANSWERS)]}</answer>")
    return out


# ----------------------------------------------------------------------------------------------------
# pure functions on hand-made answers

def A(x):
    return f"<think>t</think><answer>{x}</answer>"


def test_count_answers_normalises_and_counts_invalid():
    matcher = ClassMatcher([{"name": n, "aliases": [n.replace(" ", "_")]} for n in NAMES[:3]])
    texts = [A("blue circle"), A("Red-Circle"), A("red_circle"), A("THE red circle."), A("blue circle"),
             A("red circle or blue circle"), A("blue square"), "no answer tags", A(""), A("red square")]
    counts = M.count_answers(texts, matcher)
    assert dict(counts) == {"blue circle": 2, "red circle": 3, "red square": 1}
    assert list(counts) == ["blue circle", "red circle", "red square"]  # first-occurrence order
    assert counts.invalid == 4 and counts.total == len(texts)


def test_build_mcq_ground_truth_among_top_k():
    counts = Counter({"a": 5, "b": 4, "gt": 3, "c": 2, "d": 1, "e": 1})
    options, letter = M.build_mcq(counts, "gt", k=5, all_classes=list("abcdefg") + ["gt"], rng=random.Random(0))
    assert sorted(options) == sorted(["a", "b", "gt", "c", "d"])  # the 5 most frequent; 'e' ties 'd', comes later
    assert options[LETTERS.index(letter)] == "gt"


def test_build_mcq_inserts_missing_ground_truth():
    # fewer than k valid names: appended
    options, letter = M.build_mcq({"a": 3, "b": 2, "c": 1}, "gt", k=5, all_classes=["a", "b", "c", "gt"],
                                  rng=random.Random(0))
    assert sorted(options) == ["a", "b", "c", "gt"] and options[LETTERS.index(letter)] == "gt"
    # k or more: replaces the least frequent (ties: the later one)
    counts = {"a": 5, "b": 4, "c": 3, "d": 2, "e": 2, "f": 1}
    options, letter = M.build_mcq(counts, "gt", k=5, all_classes=list("abcdef"), rng=random.Random(0))
    assert sorted(options) == ["a", "b", "c", "d", "gt"] and options[LETTERS.index(letter)] == "gt"


def test_build_mcq_skip_and_padding():
    pool = ["a", "b", "c", "d", "e", "gt"]
    assert M.build_mcq({"gt": 7}, "gt", k=5, all_classes=pool, rng=random.Random(0)) == (None, "only_ground_truth")
    # not skipped: padded with 2 random other names + the ground truth
    options, letter = M.build_mcq({"gt": 7}, "gt", k=5, all_classes=pool, rng=random.Random(0), skip_trivial=False)
    assert len(options) == 3 and "gt" in options and options[LETTERS.index(letter)] == "gt"
    # one wrong valid answer: it, 2 random others, the ground truth
    options, letter = M.build_mcq({"a": 4}, "gt", k=5, all_classes=pool, rng=random.Random(1))
    assert len(options) == 4 and {"a", "gt"} <= set(options) and len(set(options)) == 4
    # no valid answer at all: 2 random + the ground truth
    options, letter = M.build_mcq({}, "gt", k=5, all_classes=pool, rng=random.Random(2))
    assert len(options) == 3 and "gt" in options and set(options) <= set(pool)
    # padding never goes beyond k options
    options, _ = M.build_mcq({"a": 4}, "gt", k=2, all_classes=pool, rng=random.Random(0))
    assert sorted(options) == ["a", "gt"]
    # two valid answers: no padding
    options, _ = M.build_mcq({"a": 4, "b": 1}, "gt", k=5, all_classes=pool, rng=random.Random(0))
    assert sorted(options) == ["a", "b", "gt"]
    # not enough classes to pad
    assert M.build_mcq({}, "gt", k=5, all_classes=["gt"], rng=random.Random(0)) == (None, "too_few_options")


def test_build_mcq_without_ground_truth_insertion():
    """Two-step inference: options are the model's own top-k, the answer letter only if the truth is there."""
    options, letter = M.build_mcq({"a": 3, "b": 2, "c": 1}, "gt", k=5, rng=random.Random(0), insert_gt=False,
                                  skip_trivial=False, n_random=0)
    assert sorted(options) == ["a", "b", "c"] and letter is None
    options, letter = M.build_mcq({"a": 3, "gt": 2}, None, k=5, rng=random.Random(0), insert_gt=False, n_random=0)
    assert sorted(options) == ["a", "gt"] and letter is None
    one = M.build_mcq({"a": 3}, None, k=5, rng=random.Random(0), insert_gt=False, n_random=0)
    assert one == (None, "too_few_options")


def test_build_mcq_seeded_shuffle_and_letters():
    counts = {"a": 3, "b": 3, "c": 2, "d": 1}
    runs = [M.build_mcq(counts, "gt", k=5, all_classes=[], rng=M.mcq_rng(0, i)) for i in range(20)]
    assert runs == [M.build_mcq(counts, "gt", k=5, all_classes=[], rng=M.mcq_rng(0, i)) for i in range(20)]
    assert len({tuple(o) for o, _ in runs}) > 5                    # the order really is shuffled
    assert {letter for _, letter in runs} == set("ABCDE")          # the target lands on every letter
    for options, letter in runs:
        assert options[LETTERS.index(letter)] == "gt" and sorted(options) == ["a", "b", "c", "d", "gt"]
    assert M.build_mcq(counts, "gt", k=5, rng=M.mcq_rng(1, 0)) != runs[0] or M.build_mcq(
        counts, "gt", k=5, rng=M.mcq_rng(1, 1)) != runs[1]         # the seed matters
    # property check on random counts: unique options, <= k, ground truth present and lettered right
    rng = random.Random(0)
    pool = [f"c{i}" for i in range(30)]
    for trial in range(300):
        k = rng.randint(2, 8)
        counts = {name: rng.randint(1, 5) for name in rng.sample(pool, rng.randint(0, 10))}
        gt = rng.choice(pool)
        options, letter = M.build_mcq(counts, gt, k=k, all_classes=pool, rng=random.Random(trial))
        if options is None:
            assert letter == "only_ground_truth" and list(counts) == [gt]
            continue
        assert len(set(options)) == len(options) <= k and options[LETTERS.index(letter)] == gt
        top = [n for n, _ in Counter(counts).most_common(k)]
        assert set(top[:k - 1]) <= set(options)  # at most the least frequent was replaced


def test_confusion_table():
    rows = [{"label": "x", "counts": {"x": 3, "y": 2, "z": 2}}, {"label": "x", "counts": {"z": 1, "w": 2}},
            {"label": "y", "counts": {"y": 4}}, {"label": "z", "skipped": "image: broken"}]
    assert M.confusion_table(rows) == {"x": [["z", 3], ["w", 2], ["y", 2]], "y": []}


# ----------------------------------------------------------------------------------------------------
# the tiny model, end to end

def mine_args(world, out, *extra):
    return ["--model", world["model"], "--data", os.path.join(world["dir"], "train.jsonl"),
            "--classes", os.path.join(world["dir"], "classes.json"), "--out", out, "--num_samples", "4",
            "--max_new_tokens", "6", "--seed", "3", *extra]


@pytest.fixture
def world(tmp_path, tiny_dir):
    return {"dir": make_world(tmp_path / "world"), "model": tiny_dir}


def test_mine_end_to_end(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    out = str(tmp_path / "mine" / "mcq.jsonl")
    M.main(mine_args(world, out, "--prompts_per_call", "2"))
    inputs = read_records(os.path.join(world["dir"], "train.jsonl"))
    mcqs = read_records(out)  # valid shared-format records
    summary = json.load(open(os.path.join(tmp_path, "mine", "mcq.summary.json")))
    assert summary["images"] == 6 and summary["mined"] == 5
    assert summary["mcqs"] + summary["skipped"] == 6 and len(mcqs) == summary["mcqs"] >= 1
    assert [s["reason"].split(":")[0] for s in summary["skipped_items"]].count("image") == 1
    base = NAMES[:3]
    for rec in mcqs:
        key = [r["image"] for r in inputs].index(rec["image"])
        assert rec["mined_total"] == 4 and sum(rec["counts"].values()) == rec["mined_valid"] <= 4
        assert set(rec["counts"]) <= set(base)  # only the listed (base) classes are valid answers
        assert rec["options"][LETTERS.index(rec["answer"])] == rec["label"]
        expected = M.build_mcq(rec["counts"], rec["label"], k=5, all_classes=base, rng=M.mcq_rng(3, key))
        assert (rec["options"], rec["answer"]) == expected
        assert {k: v for k, v in rec.items() if k in inputs[key]} == {**inputs[key], "_src": rec["_src"]}
    confusions = json.load(open(os.path.join(tmp_path, "mine", "confusions.json")))
    for label, confused in confusions.items():
        assert all(name != label and name in base for name, _ in confused)
    assert "ground truth among the top-5" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path / "mine") if ".shard" in f]

    # the two-step candidate step: the model's own options, no ground truth added, no padding
    out2 = str(tmp_path / "cand" / "mcq.jsonl")
    M.main(mine_args(world, out2, "--candidates", "--class_list", "all"))
    for rec in read_records(out2):
        assert sorted(rec["options"]) == sorted(rec["counts"])  # at most 4 distinct valid names here
        assert ("answer" in rec) == (rec["label"] in rec["options"])


def test_resume_does_not_redo_finished_images(world, tmp_path, monkeypatch):
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    real, calls = M.sample_completions, []

    class Interrupted(Exception):
        pass

    def flaky(*args, **kwargs):
        calls.append(len(args[1]))
        if limit[0] is not None and len(calls) > limit[0]:
            raise Interrupted
        return real(*args, **kwargs)

    limit = [2]
    monkeypatch.setattr(M, "sample_completions", flaky)
    out = str(tmp_path / "a" / "mcq.jsonl")
    with pytest.raises(Interrupted):
        M.main(mine_args(world, out, "--prompts_per_call", "1"))
    shards = [f for f in os.listdir(tmp_path / "a") if ".shard0of1" in f]
    assert len(shards) == 1 and not os.path.exists(out)
    finished = len(open(os.path.join(tmp_path, "a", shards[0])).readlines())
    assert finished >= 2  # two sampled images (+ the corrupt one if it came first)

    limit[0], calls[:] = None, []
    M.main(mine_args(world, out, "--prompts_per_call", "1"))
    assert len(calls) == 5 - 2  # 5 loadable images, 2 done before the interruption
    M.main(mine_args(world, str(tmp_path / "b" / "mcq.jsonl"), "--prompts_per_call", "1"))  # uninterrupted
    for name in ("mcq.jsonl", "confusions.json"):
        assert open(tmp_path / "a" / name).read() == open(tmp_path / "b" / name).read()


class Interrupted(Exception):
    pass


def counting_sampler(monkeypatch, module, crash_after=None):
    """Count the calls of `module`'s sampler; with `crash_after`, the call after so many raises
    Interrupted (a crash)."""
    real = getattr(module.sample_completions, "__wrapped__", module.sample_completions)
    calls = []

    def sampler(*args, **kwargs):
        calls.append(1)
        if crash_after is not None and len(calls) > crash_after:
            raise Interrupted
        return real(*args, **kwargs)
    sampler.__wrapped__ = real
    monkeypatch.setattr(module, "sample_completions", sampler)
    return calls


def bomb_png(path, side=20000):
    """Overwrite `path` with a PNG whose header claims side x side pixels and holds none: PIL refuses to open
    it as a decompression bomb (over twice Image.MAX_IMAGE_PIXELS), as it would a real one, at no cost."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                + chunk(b"IEND", b""))


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # resuming: nothing family-specific
def test_a_rerun_with_other_flags_is_refused_by_name_and_the_same_model_named_otherwise_resumes(
        world, tmp_path, monkeypatch):
    """Killed at --k 3 and rerun at --k 2, the output would mix MCQs of 3 and 2 options: a flag that shapes
    the rows must be as it was (refused by name, before the model loads, nothing deleted). The model folder
    named with a trailing slash, by a relative path from another directory, is the same model: it resumes."""
    import re
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    out = str(tmp_path / "a" / "mcq.jsonl")
    args = lambda *extra: mine_args(world, out, "--prompts_per_call", "1", "--k", "3", *extra)
    counting_sampler(monkeypatch, M, crash_after=2)
    with pytest.raises(Interrupted):
        M.main(args())
    model = os.path.realpath(world["model"])
    for extra, said in ((["--k", "2"], "--k: 3 then, 2 now"), (["--seed", "4"], "--seed: 3 then, 4 now"),
                        (["--num_samples", "2"], "--num_samples: 4 then, 2 now"),
                        (["--model", "another/model"], f"--model: {model} then, another/model now")):
        with pytest.raises(SystemExit, match=re.escape(said)) as e:
            M.main(args(*extra))
        assert "same flags" in str(e.value)
    calls = counting_sampler(monkeypatch, M)
    monkeypatch.chdir(os.path.dirname(model))
    M.main(args("--model", os.path.basename(model) + "/"))
    assert len(calls) == 5 - 2  # 5 loadable images, 2 done before the crash
    M.main(mine_args(world, str(tmp_path / "b" / "mcq.jsonl"), "--prompts_per_call", "1", "--k", "3"))
    for name in ("mcq.jsonl", "confusions.json"):
        assert open(tmp_path / "a" / name).read() == open(tmp_path / "b" / name).read()
    assert sorted(os.listdir(tmp_path / "a")) == ["confusions.json", "mcq.jsonl", "mcq.summary.json"]


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # reading images: nothing family-specific
def test_an_image_over_pils_decompression_limit_is_named_and_skipped_like_an_unreadable_one(
        world, tmp_path, monkeypatch, capsys):
    """PIL refuses to open an image of 20000x20000 pixels; the up-front size check named nothing and stopped
    the run. It is now named (file:line and path) and skipped as every image that does not load, --skip_bad
    or not."""
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    data = os.path.join(world["dir"], "train.jsonl")
    bomb = read_records(data)[0]["image"]
    bomb_png(bomb)
    for extra in ([], ["--skip_bad"]):
        out = tmp_path / f"mine{len(extra)}"
        M.main(mine_args(world, str(out / "mcq.jsonl"), *extra))
        printed = capsys.readouterr().out.splitlines()
        warning = [line for line in printed if line.startswith("warning:") and "decompression" in line]
        assert len(warning) == 1 and f"{data}:1" in warning[0] and bomb in warning[0]
        summary = json.load(open(out / "mcq.summary.json"))
        assert summary["images"] == 6 and summary["skip_reasons"]["image"] == 2  # the bomb, the corrupt file
        first = summary["skipped_items"][0]
        assert (first["image"], first["reason"].split(":")[0]) == (bomb, "image")


def run_script(args, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # sharding the data: nothing family-specific
def test_two_ranks_equal_one_rank(world, tmp_path):
    outs = {}
    for nproc in (1, 2):
        out = str(tmp_path / f"ranks{nproc}" / "mcq.jsonl")
        run_script(["mine_topk.py"] + mine_args(world, out, "--prompts_per_call", "1", "--keep_texts",
                                                "--class_list", "all"), nproc)
        folder = os.path.dirname(out)
        summary = json.load(open(os.path.join(folder, "mcq.summary.json")))
        summary.pop("args")
        outs[nproc] = (open(out).read(), open(os.path.join(folder, "confusions.json")).read(), summary)
    assert outs[1] == outs[2]
    rows = [json.loads(line) for line in outs[1][0].splitlines()]
    assert len(rows) == 5 and all(len(r["mined_texts"]) == 4 for r in rows)
    assert len({tuple(r["mined_texts"]) for r in rows}) == 5  # samples differ between images


def test_a_full_disk_mid_write_then_a_rerun_gives_the_same_files(world, tmp_path, monkeypatch):
    """The disk fills up while a batch of mined rows is being saved; the rerun redoes the cut batch with the
    same batching and seeds (--prompts_per_call 2: a batch shares one generator), so every output file is
    byte for byte that of an uninterrupted run."""
    import common
    from conftest import full_disk
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    straight, cut = str(tmp_path / "straight" / "mcq.jsonl"), str(tmp_path / "cut" / "mcq.jsonl")
    M.main(mine_args(world, straight, "--prompts_per_call", "2"))
    monkeypatch.setattr(common, "open", full_disk(whole_writes=1, then_chars=50), raising=False)
    with pytest.raises(OSError, match="No space left"):
        M.main(mine_args(world, cut, "--prompts_per_call", "2"))
    monkeypatch.setattr(common, "open", open, raising=False)
    M.main(mine_args(world, cut, "--prompts_per_call", "2"))
    for name in ("mcq.jsonl", "confusions.json"):
        assert open(tmp_path / "cut" / name, "rb").read() == open(tmp_path / "straight" / name, "rb").read(), name
    summary = lambda folder: {k: v for k, v in json.load(open(tmp_path / folder / "mcq.summary.json")).items()
                              if k != "args"}
    assert summary("cut") == summary("straight") and summary("cut")["images"] == 6


def test_out_that_is_the_data_or_the_class_table_is_refused_before_any_work(world, tmp_path, monkeypatch):
    """--out naming --data (here written another way) would replace the training records with MCQs."""
    data = os.path.join(world["dir"], "train.jsonl")
    before = open(data, "rb").read()
    monkeypatch.chdir(world["dir"])
    for flag, out in (("--data", "./images/../train.jsonl"), ("--classes", "classes.json")):
        with pytest.raises(SystemExit, match=f"--out {out} is {flag}"):
            M.main(mine_args(dict(world, model="no such model"), out))
    assert open(data, "rb").read() == before
