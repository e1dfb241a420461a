"""common.py: the one seeding rule, JSONL I/O, resumable shards."""
import os
import subprocess
import sys

import common

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
