"""common.py: the one seeding rule, JSONL I/O, resumable shards."""
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import full_disk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seeds_depend_on_what_they_are_about_and_nothing_else():
    assert common.seed_of("rollout", 0, 5) == common.seed_of("rollout", 0, 5)
    assert len({common.seed_of("rollout", 0, i) for i in range(100)}) == 100
    assert common.seed_of("rollout", 0, 5) != common.seed_of("mine", 0, 5) != common.seed_of("rollout", 1, 5)
    # the same in another process with another string-hash salt (unlike hash())
    code = "import common; print(common.seed_of('rollout', 0, 5))"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED="123")).stdout.strip()
    assert int(other) == common.seed_of("rollout", 0, 5)


def test_epoch_permutations():
    a = common.epoch_permutation(50, seed=0, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == common.epoch_permutation(50, seed=0, epoch=0)
    assert a != common.epoch_permutation(50, seed=0, epoch=1) and a != common.epoch_permutation(50, seed=1, epoch=0)


def test_class_balanced_permutations_spread_each_class_over_the_epoch():
    labels = [c for c in "abcd" for _ in range(6)]  # 4 classes of 6: 6 rounds that each hold every class once
    a = common.class_balanced_permutation(labels, seed=0, epoch=0)
    assert sorted(a) == list(range(24)) and a == common.class_balanced_permutation(labels, seed=0, epoch=0)
    assert all(sorted(labels[i] for i in a[r:r + 4]) == list("abcd") for r in range(0, 24, 4))
    assert a != common.class_balanced_permutation(labels, seed=0, epoch=1)
    assert a != common.class_balanced_permutation(labels, seed=1, epoch=0)
    assert len({tuple(labels[i] for i in a[r:r + 4]) for r in range(0, 24, 4)}) > 1  # each round in its own order
    uneven = ["rare"] * 2 + ["common"] * 8  # a class of 2 lands once in each half of the epoch
    for epoch in range(5):
        order = [uneven[i] for i in common.class_balanced_permutation(uneven, seed=0, epoch=epoch)]
        assert order[:5].count("rare") == 1 and order[5:].count("rare") == 1


def test_resumable_shards_skip_finished_keys_and_merge_in_key_order(tmp_path):
    path = str(tmp_path / "out" / "rows.jsonl")
    two = [common.Dist(rank=r, world_size=2) for r in (0, 1)]
    first = common.ResumableShards(path, two[1])
    first.append([{"key": 3, "v": "c"}, {"key": 1, "v": "a"}])
    with open(first.mine, "a") as f:
        f.write('{"key": 5, "v"')  # the line a crash cut short
    again = common.ResumableShards(path, common.Dist())  # resumed on one process
    assert again.done == {1, 3}
    again.append([{"key": 0, "v": "z"}, {"key": 5, "v": "e"}])
    rows = again.merge()
    assert [r["key"] for r in rows] == [0, 1, 3, 5]
    assert common.read_jsonl(path) == rows
    assert os.listdir(tmp_path / "out") == ["rows.jsonl"]  # shards removed once merged


def batches_of(keys, size):
    return [[{"key": k, "v": "é" * k} for k in keys[s:s + size]] for s in range(0, len(keys), size)]


def test_a_shard_cut_at_any_byte_of_its_last_line_resumes_to_the_same_bytes(tmp_path):
    """A full disk or a kill mid-write leaves the last line cut short. Resuming cuts it away (it never glues
    the next line onto it) and redoes its batch whole: the shard and the merged file come out byte for byte
    as an uninterrupted pass writes them, wherever the cut fell."""
    batches = batches_of(list(range(8)), 3)  # three batches: 3, 3 and 2 rows
    straight = str(tmp_path / "straight" / "rows.jsonl")
    shards = common.ResumableShards(straight, common.Dist())
    for rows in batches:
        shards.append(rows)
    whole = open(shards.mine, "rb").read()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[0] + b"\n"  # everything before the last line
    expected_merge = shards.merge()
    expected = open(straight, "rb").read()
    for cut in range(len(last), len(whole)):  # every byte offset of the last line (its newline included)
        path = str(tmp_path / f"cut{cut}" / "rows.jsonl")
        os.makedirs(os.path.dirname(path))
        with open(f"{path}.shard0of1.jsonl", "wb") as f:
            f.write(whole[:cut])
        resumed = common.ResumableShards(path, common.Dist())
        assert resumed.done == {0, 1, 2, 3, 4, 5}, cut
        resumed.append(batches[-1])
        assert open(resumed.mine, "rb").read() == whole, cut
        assert resumed.merge() == expected_merge and open(path, "rb").read() == expected, cut


def test_a_full_disk_mid_batch_loses_no_row(tmp_path, monkeypatch):
    """ENOSPC in the middle of a batch's line: the rows already saved stay, the cut batch is redone whole on
    the rerun (the same batching as an uninterrupted pass), and no row is lost or doubled."""
    path = str(tmp_path / "rows.jsonl")
    batches = batches_of(list(range(8)), 2)
    shards = common.ResumableShards(path, common.Dist())
    shards.append(batches[0])
    saved = os.path.getsize(shards.mine)
    monkeypatch.setattr(common, "open", full_disk(whole_writes=0, then_chars=20), raising=False)
    with pytest.raises(OSError, match="No space left"):
        shards.append(batches[1])
    monkeypatch.undo()
    assert os.path.getsize(shards.mine) > saved and not open(shards.mine, "rb").read().endswith(b"\n")  # cut mid-line
    rerun = common.ResumableShards(path, common.Dist())
    assert rerun.done == {0, 1}
    for rows in batches[1:]:
        rerun.append(rows)
    assert [r["key"] for r in rerun.merge()] == list(range(8))


def test_a_log_cut_mid_line_keeps_every_row(tmp_path):
    """Training logs append the same way: a row cut short by a crash is dropped, the next one is kept."""
    path = str(tmp_path / "log.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    log = common.JsonlLog(path, common.Dist(), start_step=1)
    log.write({"step": 2, "loss": 0.25})
    assert common.read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]



def test_a_device_that_is_not_here_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit, match=f"--device {device}: CUDA is not available"):
            common.resolve_device(device)
    with pytest.raises(SystemExit, match="--device gpu: "):
        common.resolve_device("gpu")
    assert common.resolve_device("auto") == torch.device("cpu") == common.resolve_device("cpu")


def test_resumable_shards_refuse_other_flags_by_name_and_forget_them_once_merged(tmp_path):
    """The flags that shape the rows are saved beside the shards before the first one; a rerun with others
    would mix two runs in one output, so it is refused naming each flag, and the advice keeps the rows."""
    path = str(tmp_path / "rows.jsonl")
    first = common.ResumableShards(path, common.Dist(), flags={"k": 3, "seed": 0, "model": "/m"})
    first.append([{"key": 0, "v": "a"}])
    with pytest.raises(SystemExit) as e:
        common.ResumableShards(path, common.Dist(), flags={"k": 2, "seed": 1, "model": "/m"})
    message = str(e.value)
    assert "--k: 3 then, 2 now" in message and "--seed: 0 then, 1 now" in message and "--model" not in message
    assert "same flags" in message and os.path.exists(first.mine)  # nothing deleted
    again = common.ResumableShards(path, common.Dist(), flags={"seed": 0, "model": "/m", "k": 3})
    assert again.done == {0}
    again.append([{"key": 1, "v": "b"}])
    assert [r["key"] for r in again.merge()] == [0, 1]
    assert os.listdir(tmp_path) == ["rows.jsonl"]  # the flags went with the shards
    fresh = common.ResumableShards(path, common.Dist(), flags={"k": 2})  # nothing unfinished: any flags
    assert fresh.done == set()


def test_run_flags_name_paths_as_the_files_they_name(tmp_path, monkeypatch):
    """A checkpoint folder with a trailing slash, or reached by a relative path from another directory, is the
    same --model; a Hub id is kept as typed; neutral flags are left out."""
    import argparse
    (tmp_path / "out" / "final").mkdir(parents=True)
    flags = lambda **kw: common.run_flags(argparse.Namespace(device="cpu", k=3, **kw), neutral={"device"})
    absolute = flags(model=str(tmp_path / "out" / "final"), data=[str(tmp_path / "out")])
    monkeypatch.chdir(tmp_path / "out")
    assert flags(model="final/", data=["../out/"]) == absolute == {
        "model": str(tmp_path.resolve() / "out" / "final"), "data": [str(tmp_path.resolve() / "out")], "k": 3}
    assert flags(model="Qwen/Qwen2.5-VL-7B-Instruct", data=None)["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_a_kill_before_the_merged_file_is_renamed_leaves_no_temporary_file(tmp_path, monkeypatch):
    """atomic_write renames its temporary file over the merged file; a kill between the two leaves
    `rows.jsonl.<random>.partial-tmp`, which the next start removes (only its own: another file's stays)."""
    path = str(tmp_path / "rows.jsonl")
    shards = common.ResumableShards(path, common.Dist())
    shards.append([{"key": 0}])

    class Killed(BaseException):
        pass

    def die(*args):
        raise Killed
    monkeypatch.setattr(os, "replace", die)
    monkeypatch.setattr(os, "remove", lambda p: None)  # a killed process cleans nothing up
    with pytest.raises(Killed):
        shards.merge()
    monkeypatch.undo()
    (tmp_path / "other.jsonl.x1.partial-tmp").write_text("not ours")
    assert [n for n in os.listdir(tmp_path) if n.startswith("rows.jsonl.") and n.endswith(".partial-tmp")]
    again = common.ResumableShards(path, common.Dist())
    assert again.done == {0} and [r["key"] for r in again.merge()] == [0]
    assert sorted(os.listdir(tmp_path)) == ["other.jsonl.x1.partial-tmp", "rows.jsonl"]
