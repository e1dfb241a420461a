"""evaluate.py: metrics on hand-made predictions (exact numbers), every mode on the tiny model, resume,
2 ranks equal to 1, --compare and --plot."""
import json
import os

import pytest

import evaluate as E
import metrics as M
import vlm
from data.records import load_classes, read_records
from reward import TaxonomyVerifier, extract_answer
from test_mine_topk import Interrupted, bomb_png, counting_sampler, fake_decode, make_world, run_script

# a mixed-domain table: "toy" is base-to-novel (c, d novel), "fs" is few-shot (every class base)
TABLE = {"dataset": "mix", "domain": "shape", "classes": [], "parts": {
    "toy": {"dataset": "toy", "domain": "shape", "classes": [
        {"id": 0, "name": "a", "base": True}, {"id": 1, "name": "b", "base": True},
        {"id": 2, "name": "c", "base": False}, {"id": 3, "name": "d", "base": False}]},
    "fs": {"dataset": "fs", "domain": "shape", "classes": [
        {"id": 0, "name": "p", "base": True}, {"id": 1, "name": "q", "base": True}]}}}




def P(dataset, label, correct, inclusion=None, **extra):
    return {"mode": "open", "dataset": dataset, "label": label, "correct": bool(correct),
            "inclusion": bool(correct if inclusion is None else inclusion), "format": True, **extra}


HAND = [P("toy", "a", 1), P("toy", "a", 1), P("toy", "b", 1), P("toy", "b", 0, inclusion=1),
        P("toy", "c", 1), P("toy", "d", 0), {"mode": "open", "dataset": "toy", "label": "d", "skipped": "image: gone"},
        P("fs", "p", 1), P("fs", "p", 0), P("fs", "q", 0), P("fs", "q", 0)]


def test_harmonic_mean():
    assert M.harmonic_mean(0.75, 0.5) == pytest.approx(0.6)
    assert M.harmonic_mean(0.0, 0.0) == 0.0 and M.harmonic_mean(1.0, 0.0) == 0.0
    assert M.harmonic_mean(None, 0.5) is None


def test_base_novel_hm_per_dataset_and_mean():
    m = M.compute_metrics(HAND, TABLE)
    toy, fs = m["per_dataset"]["toy"], m["per_dataset"]["fs"]
    assert m["mode"] == "open"
    assert (toy["n"], toy["skipped"], toy["base_n"], toy["novel_n"]) == (6, 1, 4, 2)
    assert toy["base_acc"] == 0.75 and toy["novel_acc"] == 0.5 and toy["hm"] == pytest.approx(0.6)
    assert toy["acc"] == pytest.approx(4 / 6) and toy["inclusion"] == pytest.approx(5 / 6)
    assert toy["base_inclusion"] == 1.0 and toy["hm_inclusion"] == pytest.approx(2 / 3)
    # few-shot: every class is base, so plain accuracy only
    assert fs["acc"] == 0.25 and fs["n"] == 4 and "hm" not in fs and "base_acc" not in fs
    mean = m["mean"]
    assert mean["datasets"] == 2 and mean["n"] == 10 and mean["skipped"] == 1
    assert mean["acc"] == pytest.approx((4 / 6 + 0.25) / 2)
    assert mean["base_acc"] == 0.75 and mean["novel_acc"] == 0.5 and mean["hm"] == pytest.approx(0.6)
    # membership comes from the table, not from the rows' own flags
    lying = [dict(r, base=not r.get("base", True)) for r in HAND]
    assert M.compute_metrics(lying, TABLE) == m
    # without a table, the rows' flags decide
    flagged = [dict(r, base=r["label"] in "abpq") for r in HAND]
    assert M.compute_metrics(flagged)["per_dataset"]["toy"]["hm"] == pytest.approx(0.6)
    assert "hm" not in M.compute_metrics(flagged)["per_dataset"]["fs"]


def test_open_world_correctness_specificity_hm():
    cats = ["specific", "more_specific", "less_specific", "generic", "abstain", "wrong", None, "specific",
            "unjudged"]
    rows = [dict(P("toy", "a", c in ("specific", "more_specific")), mode="open_world", category=c) for c in cats]
    rows += [dict(P("fs", "p", 1), mode="open_world", category="specific"),
             dict(P("fs", "q", 0), mode="open_world", category="wrong")]
    m = M.compute_metrics(rows, TABLE)
    toy, fs = m["per_dataset"]["toy"], m["per_dataset"]["fs"]
    # 8 judged (1 unjudged left out); correct = 2 specific + more + less + generic = 5; specific-or-more = 3
    assert toy["correctness"] == 5 / 8 and toy["specificity"] == 3 / 5 and toy["unjudged"] == 1
    assert toy["spec_hm"] == pytest.approx(2 * 0.625 * 0.6 / 1.225)
    assert toy["cat_no_answer"] == pytest.approx(1 / 9) and toy["cat_specific"] == pytest.approx(2 / 9)
    assert fs["correctness"] == 0.5 and fs["specificity"] == 1.0 and fs["spec_hm"] == pytest.approx(2 / 3)
    mean = m["mean"]
    assert mean["correctness"] == pytest.approx(0.5625) and mean["specificity"] == pytest.approx(0.8)
    assert mean["spec_hm"] == pytest.approx(2 * 0.5625 * 0.8 / 1.3625)


def test_format_table():
    a, b = M.compute_metrics(HAND, TABLE), M.compute_metrics(HAND[:6], TABLE)
    text = M.format_table([a, b], ["before", "after"])
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["run", "mode", "dataset", "n", "skip"] and "HM" in lines[0].split()
    rows = [line.split() for line in lines[2:]]
    assert [r[:3] for r in rows] == [["before", "open", "fs"], ["before", "open", "toy"], ["before", "open", "mean"],
                                     ["after", "open", "toy"]]
    head = lines[0].split()
    toy = dict(zip(head, rows[1]))
    assert toy["base"] == "75.00" and toy["novel"] == "50.00" and toy["HM"] == "60.00" and toy["skip"] == "1"
    assert dict(zip(head, rows[0]))["HM"] == "-"  # few-shot dataset: no HM


# ----------------------------------------------------------------------------------------------------
# the tiny model, end to end

@pytest.fixture
def world(tmp_path, tiny_dir):
    folder = make_world(tmp_path / "world", n_train=3, corrupt=False)
    bad = read_records(os.path.join(folder, "test_novel.jsonl"))[1]["image"]
    with open(bad, "wb") as f:  # one unreadable test image
        f.write(b"\x89PNG truncated")
    return {"dir": folder, "model": tiny_dir}


def eval_args(world, out, *modes, extra=()):
    d = world["dir"]
    return ["--model", world["model"],
            "--data", os.path.join(d, "test_base.jsonl"), os.path.join(d, "test_novel.jsonl"),
            "--classes", os.path.join(d, "classes.json"), "--out", out, "--mode", *modes, "--max_new_tokens", "6",
            "--num_samples", "8", "--prompts_per_call", "2", *extra]


def test_all_modes_end_to_end(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    out = str(tmp_path / "eval")
    E.main(eval_args(world, out, "open", "open_world", "mcq", "two_step"))
    table = load_classes(os.path.join(world["dir"], "classes.json"))
    records = (read_records(os.path.join(world["dir"], "test_base.jsonl"))
               + read_records(os.path.join(world["dir"], "test_novel.jsonl")))
    taxonomy = TaxonomyVerifier(table)
    for mode in E.MODES:
        rows = [json.loads(line) for line in open(os.path.join(out, f"predictions_{mode}.jsonl"))]
        metrics = json.load(open(os.path.join(out, f"metrics_{mode}.json")))
        assert metrics == json.loads(json.dumps(M.compute_metrics(rows, table)))
        assert [(r["file"], r["key"]) for r in rows] == [(f, i) for f in ("test_base", "test_novel") for i in range(3)]
        assert [r["image"] for r in rows] == [r["image"] for r in records]
        assert [r["base"] for r in rows] == [True] * 3 + [False] * 3
        assert sum("skipped" in r for r in rows) == 1 and "skipped" in rows[4]
        toy = metrics["per_dataset"]["toy"]
        assert toy["n"] == 5 and toy["skipped"] == 1 and (toy["base_n"], toy["novel_n"]) == (3, 2)
        for row, rec in zip(rows, records):
            if "skipped" in row:
                continue
            if mode in ("open", "open_world"):
                assert row["answer"] == extract_answer(row["completion"]) and row["prediction"] == row["answer"]
            if mode == "open_world":
                assert row["category"] == taxonomy.categorize(rec, row["answer"])
            if mode == "mcq":
                assert row["target"] == "A" and row["options"] == rec["options"]
                assert row["correct"] == (row["choice"] == "A")
            if mode == "two_step":
                assert all(name in [c["name"] for c in table["classes"] if c["base"] == row["base"]]
                           for name in row["candidates"])  # the split's class list
                if row["fallback"] is None:
                    assert sorted(row["options"]) == sorted(row["candidates"])  # <= 3 names per split here
                    assert row["prediction"] is None or row["prediction"] in row["options"]
                else:
                    assert len(row["candidates"]) == {"single": 1, "none": 0}[row["fallback"]]
                assert row["correct"] == (row["prediction"] == rec["label"])
                assert row["sampled"] == row["candidates"].get(rec["label"], 0) / 8  # of --num_samples 8
        if mode == "two_step":
            done = [r for r in rows if "skipped" not in r]
            assert toy["sampled"] == pytest.approx(sum(r["sampled"] for r in done) / len(done))
            assert any(r["sampled"] > 0 for r in done)  # some samples name the label: the count is exercised
            older = [r for r in rows if "skipped" not in r][:2]  # rows of a shard written before `sampled`
            mixed = older[:1] + [{k: v for k, v in older[1].items() if k != "sampled"}]
            assert M.compute_metrics(mixed, table)["mean"]["sampled"] == older[0]["sampled"]
    assert any(r["fallback"] is None for r in map(json.loads, open(os.path.join(out, "predictions_two_step.jsonl")))
               if "skipped" not in r)
    printed = capsys.readouterr().out
    assert "spec-HM" in printed and "HM" in printed
    assert not os.path.exists(os.path.join(out, "parts"))

    # the LLM judge path: the tiny "judge" never answers a label, so every verdict falls back to the taxonomy
    E.main(eval_args(world, str(tmp_path / "llm"), "open_world", extra=["--verifier_model", world["model"]]))
    assert os.path.exists(tmp_path / "llm" / "verifier_cache.sqlite")
    llm = [json.loads(line) for line in open(tmp_path / "llm" / "predictions_open_world.jsonl")]
    assert [r.get("category") for r in llm] == [
        json.loads(line).get("category") for line in open(os.path.join(out, "predictions_open_world.jsonl"))]


def test_mcq_data_runs_the_mcq_on_its_own_files_in_the_same_process(world, tmp_path, monkeypatch):
    """--mcq_data: the mcq mode reads its files, the other modes --data's; the predictions equal one run per mode."""
    monkeypatch.setattr(vlm.Processor, "decode", fake_decode)
    d = world["dir"]
    base = os.path.join(d, "test_base.jsonl")
    together, alone = str(tmp_path / "together"), str(tmp_path / "alone")
    E.main(eval_args(world, together, "open", "mcq", extra=["--mcq_data", base]))
    E.main(eval_args(world, alone, "open"))
    mcq_alone = eval_args(world, alone, "mcq")
    E.main(mcq_alone[:mcq_alone.index("--data") + 1] + [base] + mcq_alone[mcq_alone.index("--classes"):])  # test_base only
    read = lambda out, mode: [json.loads(line) for line in open(os.path.join(out, f"predictions_{mode}.jsonl"))]
    assert [r["file"] for r in read(together, "mcq")] == ["test_base"] * 3
    assert [r["file"] for r in read(together, "open")] == ["test_base"] * 3 + ["test_novel"] * 3
    for mode in ("open", "mcq"):
        assert read(together, mode) == read(alone, mode)
    # the mcq's own files must carry options, whatever --data holds
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("options", "answer")}) + "\n"
                             for r in read_records(base)))
    with pytest.raises(SystemExit, match="--mode mcq"):
        E.main(eval_args(world, str(tmp_path / "bad"), "open", "mcq", extra=["--mcq_data", str(plain)]))


def test_resume_does_not_redo_finished_images(world, tmp_path, monkeypatch):
    real, calls, limit = E.sample_completions, [], [2]

    class Interrupted(Exception):
        pass

    def flaky(*args, **kwargs):
        calls.append(1)
        if limit[0] is not None and len(calls) > limit[0]:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "sample_completions", flaky)
    out = str(tmp_path / "a")
    args = eval_args(world, out, "open", extra=["--prompts_per_call", "1"])
    with pytest.raises(Interrupted):
        E.main(args)
    assert not os.path.exists(os.path.join(out, "predictions_open.jsonl"))
    limit[0], calls[:] = None, []
    E.main(args)
    assert len(calls) == 5 - 2  # 5 readable images, 2 finished before the interruption
    E.main(eval_args(world, str(tmp_path / "b"), "open", extra=["--prompts_per_call", "1"]))
    for name in ("predictions_open.jsonl", "metrics_open.json"):
        assert open(os.path.join(out, name)).read() == open(tmp_path / "b" / name).read()


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # resuming: nothing family-specific
def test_a_rerun_with_other_flags_is_refused_by_name_keeping_the_finished_rows(world, tmp_path, monkeypatch):
    """A rerun at --max_new_tokens 8 kept the rows sampled at 6: every flag that shapes a row must be as it
    was, refused by name before the model loads, with advice that deletes nothing; the same flags finish."""
    import re
    out = str(tmp_path / "a")
    args = lambda *extra: eval_args(world, out, "open", "two_step", extra=["--prompts_per_call", "1", *extra])
    counting_sampler(monkeypatch, E, crash_after=2)
    with pytest.raises(Interrupted):
        E.main(args())
    for extra, said in ((["--max_new_tokens", "8"], "--max_new_tokens: 6 then, 8 now"),
                        (["--prompts_per_call", "2"], "--prompts_per_call: 1 then, 2 now"),
                        (["--model", "another/model"], f"--model: {os.path.realpath(world['model'])} then, "
                                                       "another/model now")):
        with pytest.raises(SystemExit, match=re.escape(said)) as e:
            E.main(args(*extra))
        assert "same flags" in str(e.value) and os.path.isdir(os.path.join(out, "parts"))
    calls = counting_sampler(monkeypatch, E)
    E.main(args("--device", "cpu"))  # where it runs does not shape a row
    assert len(calls) == 5 - 2  # open: 5 readable images, 2 done before the crash (then two_step's)


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # resuming: nothing family-specific
def test_the_same_model_named_another_way_resumes_to_the_same_bytes(world, tmp_path, monkeypatch):
    """--model out/x/final/ (a trailing slash), or a relative path from another working directory, names the
    same checkpoint as before the crash: the rerun resumes (it was refused as another model) and the files are
    those of an uninterrupted run."""
    model = os.path.realpath(world["model"])
    run = lambda out, name: E.main(eval_args(dict(world, model=name), out, "open",
                                             extra=["--prompts_per_call", "1"]))
    counting_sampler(monkeypatch, E, crash_after=2)
    with pytest.raises(Interrupted):
        run(str(tmp_path / "a"), model)
    counting_sampler(monkeypatch, E, crash_after=1)
    with pytest.raises(Interrupted):
        run(str(tmp_path / "a"), model + "/")
    calls = counting_sampler(monkeypatch, E)
    monkeypatch.chdir(os.path.dirname(model))
    parent, name = os.path.split(model)
    run(str(tmp_path / "a"), os.path.join("..", os.path.basename(parent), name))
    assert len(calls) == 5 - 2 - 1
    run(str(tmp_path / "b"), model)
    for name in ("predictions_open.jsonl", "metrics_open.json"):
        assert open(tmp_path / "a" / name).read() == open(tmp_path / "b" / name).read()


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # reading images: nothing family-specific
def test_an_image_over_pils_decompression_limit_is_a_skipped_row_named_up_front(world, tmp_path, capsys):
    """PIL refuses to open an image of 20000x20000 pixels; the up-front size check named nothing and stopped
    the evaluation. It is now named (file:line and path) and a skipped row, as any image that does not
    load."""
    data = os.path.join(world["dir"], "test_base.jsonl")
    bomb = read_records(data)[0]["image"]
    bomb_png(bomb)
    for extra in ([], ["--skip_bad"]):
        out = tmp_path / f"eval{len(extra)}"
        E.main(eval_args(world, str(out), "open", extra=extra))
        printed = capsys.readouterr().out.splitlines()
        warning = [line for line in printed if line.startswith("warning:") and "decompression" in line]
        assert len(warning) == 1 and f"{data}:1" in warning[0] and bomb in warning[0]
        rows = [json.loads(line) for line in open(out / "predictions_open.jsonl")]
        assert [i for i, r in enumerate(rows) if "skipped" in r] == [0, 4] and bomb in rows[0]["skipped"]


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # files: nothing family-specific
def test_a_kill_before_the_merged_part_is_renamed_leaves_nothing_behind(world, tmp_path, monkeypatch):
    """atomic_write renames its temporary file over the merged part; a kill between the two left
    parts/<part>.<random>.partial-tmp (and so parts/) for good. The next start removes it."""
    import common

    class Killed(BaseException):
        pass

    def die(*args):
        raise Killed
    real = common.write_jsonl

    def killed_at_rename(path, rows):
        monkeypatch.setattr(os, "replace", die)
        monkeypatch.setattr(os, "remove", lambda p: None)  # a killed process cleans nothing up
        real(path, rows)
    monkeypatch.setattr(common, "write_jsonl", killed_at_rename)
    out = str(tmp_path / "eval")
    with pytest.raises(Killed):
        E.main(eval_args(world, out, "open"))
    monkeypatch.undo()
    assert [name for name in os.listdir(os.path.join(out, "parts")) if name.endswith(".partial-tmp")]
    E.main(eval_args(world, out, "open"))
    assert sorted(os.listdir(out)) == ["metrics_open.json", "predictions_open.jsonl"]


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)  # sharding the data: nothing family-specific
def test_two_ranks_equal_one_rank(world, tmp_path):
    files = {}
    for nproc in (1, 2):
        out = str(tmp_path / f"ranks{nproc}")
        args = eval_args(world, out, "open", "mcq", "two_step", extra=["--prompts_per_call", "1"])
        run_script(["evaluate.py"] + args, nproc)
        files[nproc] = {name: open(os.path.join(out, name)).read() for name in sorted(os.listdir(out))}
    assert files[1] == files[2] and len(files[1]) == 6
    rows = [json.loads(line) for line in files[1]["predictions_open.jsonl"].splitlines()]
    assert len(rows) == 6 and len({r.get("completion") for r in rows}) > 2  # real, differing completions


def test_compare_and_plot(tmp_path, capsys):
    for name, rows in (("before", HAND), ("after", [dict(r, correct=True) for r in HAND])):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "predictions_open.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    table_path = tmp_path / "classes.json"
    table_path.write_text(json.dumps(TABLE))
    E.main(["--compare", str(tmp_path / "before"), str(tmp_path / "after" / "predictions_open.jsonl"),
            "--classes", str(table_path)])
    lines = capsys.readouterr().out.splitlines()
    rows = [dict(zip(lines[0].split(), line.split())) for line in lines[2:]]
    assert [(r["run"].split(os.sep)[-1], r["dataset"]) for r in rows] == [
        ("before", "fs"), ("before", "toy"), ("before", "mean"),
        ("predictions_open.jsonl", "fs"), ("predictions_open.jsonl", "toy"), ("predictions_open.jsonl", "mean")]
    assert (rows[1]["acc"], rows[1]["HM"], rows[2]["acc"]) == ("66.67", "60.00", "45.83")
    assert (rows[4]["acc"], rows[4]["HM"], rows[5]["acc"]) == ("100.00", "100.00", "100.00")

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "reward_mean": s / 10, "loss": 1 / (s + 1)}) + "\n" for s in range(5))
                   + '{"step": 5, "rew')  # a crash-cut last line is ignored
    png = str(tmp_path / "curves.png")
    E.main(["--plot", str(log), "--plot_out", png])
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(png) > 0
    except ImportError:
        assert not os.path.exists(png) and "matplotlib is not installed" in capsys.readouterr().out


def test_a_full_disk_mid_write_then_a_rerun_gives_every_prediction(world, tmp_path, monkeypatch):
    """The disk fills up while a batch of predictions is being saved, leaving its line cut short; rerunning
    the same command (as the README says) redoes that batch whole: every prediction is there, and the files
    are byte for byte those of an uninterrupted run."""
    import common
    from conftest import full_disk
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    E.main(eval_args(world, straight, "open", "open_world"))
    monkeypatch.setattr(common, "open", full_disk(whole_writes=2, then_chars=30), raising=False)
    with pytest.raises(OSError, match="No space left"):  # in the first batch of test_novel.jsonl
        E.main(eval_args(world, cut, "open", "open_world"))
    monkeypatch.undo()
    E.main(eval_args(world, cut, "open", "open_world"))
    for name in sorted(os.listdir(straight)):
        assert open(os.path.join(cut, name), "rb").read() == open(os.path.join(straight, name), "rb").read(), name
    assert len(open(os.path.join(cut, "predictions_open.jsonl")).readlines()) == 6
