"""runs/compare.py and the table / plot functions of metrics.py it uses, on fake evaluation folders and logs."""
import json
import os
import sys
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "runs"))
import compare  # noqa: E402
import metrics  # noqa: E402


def write_eval(folder, open_=None, mcq=None, two_step=None, open_world=None):
    """A fake evaluate.py output folder: metrics_<mode>.json with the given fractions."""
    os.makedirs(folder, exist_ok=True)
    for mode, m in (("open", open_), ("mcq", mcq), ("two_step", two_step), ("open_world", open_world)):
        if m is not None:
            m = {"acc": m} if not isinstance(m, dict) else m
            with open(os.path.join(folder, f"metrics_{mode}.json"), "w") as f:
                json.dump({"mode": mode, "per_dataset": {"toy": m}, "mean": dict(m, datasets=1)}, f)


def fake_world(root, seed, hm_shift=0.0):
    """A seed folder with start / exact / divek / speciarl / tapo / dapo evaluated (no 'format', no 'cot')."""
    folder = os.path.join(root, f"seed_{seed}")
    for run, base, novel in (("start", 0.3, 0.4), ("exact", 0.5, 0.3), ("divek", 0.5 + hm_shift, 0.3 + hm_shift),
                             ("speciarl", 0.45, 0.3), ("tapo", 0.6, 0.4), ("dapo", 0.6, 0.4 - hm_shift)):
        hm = 2 * base * novel / (base + novel)
        ow = {"correctness": 0.4 + (0.1 if run == "speciarl" else 0), "specificity": 0.8 - (0.1 if run == "speciarl" else 0)}
        ow["spec_hm"] = 2 * ow["correctness"] * ow["specificity"] / (ow["correctness"] + ow["specificity"])
        write_eval(os.path.join(folder, "eval", run), open_={"base_acc": base, "novel_acc": novel, "hm": hm, "acc": 0.1},
                   mcq=0.25 + seed / 100, two_step={"acc": 0.4, "sampled": 0.3}, open_world=ow)
        if run != "start":
            os.makedirs(os.path.join(folder, run), exist_ok=True)
            with open(os.path.join(folder, run, "log.jsonl"), "w") as f:
                for step in range(1, 6):
                    f.write(json.dumps({"step": step, "reward_mean": step / 5 + seed, "accuracy": 0.1 * step,
                                        "reward_drawn": step / 4 + seed, "accuracy_drawn": 0.1 * step,
                                        "kl": 0.01 * step, "entropy": 1 - step / 10, "completion_length": 20}) + "\n")
    return folder


def test_summary_rows_with_one_name_are_seeds_mean_and_std(tmp_path):
    for name, acc in (("a", 0.5), ("b", 0.7), ("c", 0.25)):
        write_eval(str(tmp_path / name), mcq=acc)
    write_eval(str(tmp_path / "d"), open_={"base_acc": 0.5, "novel_acc": 0.25, "hm": 1 / 3, "acc": 0.4})
    table = metrics.summary([str(tmp_path / n) for n in "abcd"], ["X", "X", "Y", "Z"]).splitlines()
    assert table[0].split() == ["model", "base", "novel", "HM", "open", "acc", "MCQ"]
    assert table[2].split() == ["X", "-", "-", "-", "-", "60.0", "±", "14.1"]  # mean 60, std (ddof 1) 14.1
    assert table[3].split() == ["Y", "-", "-", "-", "-", "25.0"]  # one seed: no ±
    assert table[4].split() == ["Z", "50.0", "25.0", "33.3", "40.0", "-"]
    with pytest.raises(SystemExit, match="names"):
        metrics.summary([str(tmp_path / "a")], ["X", "Y"])


def test_mean_std():
    assert metrics.mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)
    assert metrics.mean_std([4.0]) == (4.0, None, 1)
    assert metrics.mean_std([None]) == (None, None, 0)


def test_verdict_arithmetic():
    assert compare.verdict([2.0, 3.0, 4.0]) == "reproduced"          # m 3 > s 1
    assert compare.verdict([-2.0, -3.0, -4.0]) == "opposite"
    assert compare.verdict([-2.0, -3.0, -4.0], direction=-1) == "reproduced"
    assert compare.verdict([1.0, -1.0, 3.0]) == "within noise"       # m 1 <= s 2
    assert compare.verdict([1.0, 1.0]) == "reproduced"               # s 0: any non-zero mean is beyond noise
    assert compare.verdict([0.0, 0.0]) == "within noise"
    assert compare.verdict([5.0]) is None                            # one seed: no noise estimate
    # SpeciaRL: specificity up and correctness not down
    up, down, flat = [2.0, 3.0, 4.0], [-2.0, -3.0, -4.0], [1.0, -1.0, 0.5]
    assert compare.speciarl_verdict(up, flat) == "reproduced"
    assert compare.speciarl_verdict(up, up) == "reproduced"
    assert compare.speciarl_verdict(up, down) == "opposite"           # specificity bought with correctness
    assert compare.speciarl_verdict(down, up) == "opposite"
    assert compare.speciarl_verdict(flat, up) == "within noise"
    assert compare.speciarl_verdict([3.0], [1.0]) is None


def test_compare_table_claims_and_plots(tmp_path, capsys):
    folders = [fake_world(str(tmp_path), s, hm_shift=0.05 + 0.01 * s) for s in range(3)]
    compare.main(folders + ["--out", str(tmp_path / "plots")])  # a folder not there yet
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["model", "base", "novel", "HM", "two-step", "sampled", "MCQ", "correct", "specific",
                                "spec", "HM"]
    rows = {line.split("  ")[0].strip(): line for line in lines[2:8]}
    assert list(rows) == ["start", "Visual-RFT", "DiVE-k", "SpeciaRL", "Fine-R1", "CoT SFT+DAPO"]  # table order
    assert "26.0 ± 1.0" in rows["start"]  # MCQ 25, 26, 27 over the seeds
    claims = {c: (d, v) for c, _, d, v in compare.claims(compare.collect(folders))}
    hm = lambda b, n: 200 * b * n / (b + n)
    expected = [hm(0.5 + x, 0.3 + x) - hm(0.5, 0.3) for x in (0.05, 0.06, 0.07)]
    assert claims["DiVE-k - Visual-RFT, HM"][0] == pytest.approx(expected)
    assert claims["DiVE-k - Visual-RFT, HM"][1] == "reproduced"
    # SpeciaRL: correctness +10, specificity -10 on every seed: the claim's opposite
    assert claims["SpeciaRL - start, specific"] == (pytest.approx([-10.0] * 3), "opposite")
    assert claims["Fine-R1: TAPO - DAPO, HM"][1] == "reproduced"
    assert "opposite" in out and "reproduced" in out
    if metrics._pyplot() is not None:  # matplotlib is an optional extra: the tables never need it
        for png in ("curves.png", "accuracy.png"):
            assert os.path.getsize(tmp_path / "plots" / png) > 10_000


def test_one_seed_prints_differences_without_verdicts(tmp_path, capsys):
    folder = fake_world(str(tmp_path), 0, hm_shift=0.05)
    compare.main([folder, "--no_plots"])
    out = capsys.readouterr().out
    assert "one seed: no verdict" in out and "±" not in out


def test_plot_writers_on_a_fake_log(tmp_path):
    pytest.importorskip("matplotlib")
    logs = []
    for seed in range(2):
        log = tmp_path / f"log{seed}.jsonl"
        log.write_text("".join(json.dumps({"step": s, "reward_mean": s + seed, "kl": 0.1}) + "\n" for s in range(1, 4))
                       + '{"step": 4, "rew')  # a crash-cut last line is ignored
        logs.append(str(log))
    png = metrics.plot_curves(logs, str(tmp_path / "c.png"), ["reward_mean", "kl", "absent"], ["run", "run"])
    assert png and os.path.getsize(png) > 5_000
    png = metrics.plot_bars({"a": {"base": [50.0, 60.0], "novel": [30.0], "HM": []}, "b": {"base": [10.0]}},
                             str(tmp_path / "b.png"))
    assert png and os.path.getsize(png) > 5_000


def test_toy_errors_kinds_knowledge_and_the_class_gap(tmp_path):
    import toy_errors
    from data import toy
    from reward import ClassMatcher
    classes = toy.make_world(names="epithets")
    table = {"classes": classes}
    by_cs = {}
    for c in classes:
        by_cs.setdefault((c["parents"][1], c["base"]), []).append(c)
    rows = []
    for c in classes:
        same_split = [x for x in by_cs[(c["parents"][1], c["base"])] if x is not c][0]
        other_split = by_cs[(c["parents"][1], not c["base"])][0]
        for answer in (c["name"], same_split["name"], other_split["name"], "red", None):
            rows.append({"label": c["name"], "base": c["base"], "answer": answer, "correct": answer == c["name"]})
    match = ClassMatcher(classes)
    kinds = Counter(toy_errors.kind(r, {x["name"]: x for x in classes}, match) for r in rows)
    assert kinds == {k: 64 for k in ("right", "epithet (listed)", "epithet (unlisted)", "no class")} | {"no class": 128}
    bits, n = toy_errors.pattern_information([r for r in rows if r["correct"]], {x["name"]: x for x in classes},
                                             match)
    assert n == 64 and bits == pytest.approx(2.0)  # always right: the pattern is known exactly
    gap, se = toy_errors.class_gap(rows)
    assert gap == pytest.approx(0.0) and se == pytest.approx(0.0)
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "predictions_open.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "classes.json").write_text(json.dumps(table))
    text = toy_errors.report(str(folder), table)
    assert "base  (160): right 20%, epithet (listed) 20%, epithet (unlisted) 20%" in text
    assert "of 2 bits" in text and "base - novel +0.0 ± 0.0" in text


def test_reward_rise_and_its_error():
    rise, se = compare.reward_rise([0.1, 0.3, 0.5, 0.5, 0.5, 0.5, 0.6, 0.8])  # quarters [0.1, 0.3], [0.6, 0.8]
    assert rise == pytest.approx(0.5)
    assert se == pytest.approx((0.02 / 2 + 0.02 / 2) ** 0.5)  # sample variances 0.02 over 2 steps each
    assert compare.reward_rise([0.1, 0.2, 0.3]) == (None, None)  # under two steps a quarter: no error


def test_training_rewards_say_which_runs_rise(tmp_path):
    folders = []
    for seed in range(2):
        folder = tmp_path / f"seed_{seed}"
        for run, curve in (("exact", [0.1, 0.12, 0.1, 0.2, 0.3, 0.3, 0.4, 0.42]),   # rises
                           ("divek", [0.3, 0.5, 0.3, 0.5, 0.3, 0.5, 0.33, 0.51]),   # +0.02: flat
                           ("tapo", [0.1, 0.9, 0.5, 0.5, 0.5, 0.5, 0.2, 1.0])):     # +0.1, but SE 0.4: flat
            os.makedirs(folder / run)
            with open(folder / run / "log.jsonl", "w") as f:
                for step, r in enumerate(curve, 1):
                    f.write(json.dumps({"step": step, "reward_mean": r + seed / 10}) + "\n")
        folders.append(str(folder))
    rows = {name: rest for name, *rest in compare.training_rewards(folders)}
    assert rows["Visual-RFT"][0] == pytest.approx(0.11 + 0.05) and rows["Visual-RFT"][1] == pytest.approx(0.41 + 0.05)
    assert rows["Visual-RFT"][2] == pytest.approx(0.3) and rows["Visual-RFT"][4] == "rises"
    assert rows["DiVE-k"][4] == "flat" and rows["Fine-R1"][4] == "flat"
    assert list(rows) == ["Visual-RFT", "DiVE-k", "Fine-R1"]  # the table's order
    text = compare.format_training_rewards(compare.training_rewards(folders), 2)
    assert "training reward (2 seeds)" in text and "+0.300" in text


def test_objectives_measure_each_recipe_against_the_model_it_starts_from():
    seeds = lambda *xs: list(xs)
    cols = lambda base, mcq, hm, specific, correct: {"base": base, "MCQ": mcq, "HM": hm, "specific": specific,
                                                     "correct": correct}
    values = {
        "start": cols(seeds(40, 42, 38), seeds(40, 40, 40), seeds(36, 36, 36), seeds(100, 100, 100), seeds(36, 36, 36)),
        "format": cols(seeds(40, 40, 40), seeds(40, 40, 40), seeds(33.5, 34, 33), seeds(100, 100, 100), seeds(36, 36, 36)),
        "exact": cols(seeds(45, 46, 41), seeds(40, 40, 40), seeds(36, 36, 36), seeds(100, 100, 100), seeds(36, 36, 36)),
        "divek": cols(seeds(40, 40, 40), seeds(41, 39, 40.5), seeds(36, 36, 36), seeds(100, 100, 100), seeds(36, 36, 36)),
        "speciarl": cols(seeds(0, 0, 0), seeds(0, 0, 0), seeds(0, 0, 0), seeds(0, 0, 0), seeds(80, 77, 81)),
        "cot": cols(seeds(47, 45, 50), seeds(40, 40, 40), seeds(25, 25, 25), seeds(100, 100, 100), seeds(35, 35, 35)),
        "tapo": cols(seeds(40, 39, 43), seeds(40, 40, 40), seeds(25, 25, 25), seeds(100, 100, 100), seeds(35, 35, 35)),
    }  # no "dapo": its row is left out
    rows = {(name, objective.split()[0]): (a, b, d, v) for name, objective, a, b, d, v in compare.objectives(values)}
    assert list(rows) == [("format only", "HM"), ("Visual-RFT", "base"), ("DiVE-k", "MCQ"), ("DiVE-k", "base"),
                          ("SpeciaRL", "specific"), ("SpeciaRL", "correct"), ("Fine-R1", "base")]
    assert rows[("Visual-RFT", "base")][2] == pytest.approx([5, 4, 3]) and rows[("Visual-RFT", "base")][3] == "improves"
    assert rows[("Visual-RFT", "base")][:2] == (pytest.approx(40), pytest.approx(44))
    assert rows[("DiVE-k", "MCQ")][3] == "within noise"  # +1, -1, +0.5: the mean is inside one std
    assert rows[("DiVE-k", "base")][2] == pytest.approx([0, -2, 2]) and rows[("DiVE-k", "base")][3] == "within noise"
    assert rows[("SpeciaRL", "specific")][3] == "worse" and rows[("SpeciaRL", "correct")][3] == "kept"
    assert rows[("Fine-R1", "base")][2] == pytest.approx([-7, -6, -7]) and rows[("Fine-R1", "base")][3] == "worse"
    assert rows[("format only", "HM")][3] == "unmoved"  # -2.5, -2, -3: within 3 points
    values["format"]["HM"] = [32, 33, 32]
    assert compare.objectives(values)[0][-1] == "moved"
    # a fall in correctness beyond noise is what SpeciaRL must not do
    values["speciarl"]["correct"] = [30, 31, 29]
    assert {v for n, o, *_, v in compare.objectives(values) if o.startswith("correct")} == {"falls"}
    # one seed: no std, the sign alone, said so
    one = {run: {k: v[:1] for k, v in cols_.items()} for run, cols_ in values.items()}
    assert {v for n, o, *_, v in compare.objectives(one) if n == "Visual-RFT"} == {"improves (one seed)"}
    table = compare.format_objectives(compare.objectives(values), 3)
    assert "+4.0 ± 1.0 (SE 0.6)" in table and "unmoved" not in table and "moved" in table
    # a rise counts when it exceeds twice its standard error (m 2.2, s 2.0: more than s, less than 2 s / sqrt 3)
    values["exact"]["base"] = [40.2, 44.2, 42.2]
    assert compare.objectives(values)[1][-1] == "within noise"
    values["exact"]["base"] = [45, 46, 41]
    assert compare.objectives(values)[1][-1] == "improves"
    # ... and the control's change of the same number: GRPO with no task signal moving base by +10 would hide it
    values["format"]["base"] = [50, 50, 50]
    assert compare.objectives(values)[1][-1] == "within noise"


def test_the_start_block_reads_greedy_top5_and_probe_against_the_bands(tmp_path):
    inside, outside = fake_world(tmp_path, 0), fake_world(tmp_path, 1)
    write_eval(os.path.join(inside, "eval", "start"), open_={"base_acc": 0.55, "novel_acc": 0.6, "hm": 0.57, "acc": 0.57})
    for folder, top5, probe in ((inside, 0.9, 95.0), (outside, 0.8, 95.0)):
        os.makedirs(os.path.join(folder, "mine"))
        with open(os.path.join(folder, "mine", "mcq.summary.json"), "w") as f:
            json.dump({"gt_in_topk": top5}, f)
        with open(os.path.join(folder, "eval", "start", "probe.json"), "w") as f:
            json.dump({"acc": probe, "n": 256}, f)
    folders = [inside, outside, str(tmp_path / "seed_9")]
    rows = compare.start_knowledge(folders, compare.collect(folders))
    assert rows[0] == pytest.approx({"greedy base": 55.0, "greedy novel": 60.0, "top-5": 90.0, "probe": 95.0})
    assert rows[1]["greedy base"] == 30.0 and rows[1]["top-5"] == 80.0  # fake_world's start: base 0.3
    assert rows[2] == dict.fromkeys(compare.START_BANDS)                 # nothing there: every cell None
    lines = compare.format_start(rows, folders).splitlines()
    assert lines[2].split() == ["seed_0", "55.0", "60.0", "90.0", "95.0", "yes"]
    assert lines[3].split()[-1] == "no" and lines[4].split() == ["seed_9", "-", "-", "-", "-", "no"]


@pytest.mark.parametrize("family", ["qwen2_5_vl"], indirect=True)
def test_the_knowledge_probe_scores_the_pattern_word(tiny_dir, tmp_path, monkeypatch):
    import toy_probe
    from data import toy
    toy.generate(str(tmp_path / "w"), seed=0, names="epithets", pretrain_naming=True, confused_pairs=2,
                 confusion=0.5, train_per_class=1, val_per_class=1, test_per_class=1, pretrain_per_class=1)
    data, out = str(tmp_path / "w" / "probe.jsonl"), str(tmp_path / "probe.json")
    toy_probe.main(["--model", tiny_dir, "--data", data, "--out", out])  # a random tiny model: it runs, it writes
    assert json.load(open(out))["n"] == 64 * 4
    records = [json.loads(x) for x in open(data)]
    replies = iter(f"<think>x</think><answer> {r['expected'].upper()} </answer>" if i % 4 == 0 else  # right
                   f"<answer>{r['expected']}</answer>" if i % 4 == 1 else                          # right, no format
                   f"<think>x</think><answer>{r['label']}</answer>" for i, r in enumerate(records))  # names instead

    class Texts:  # the processor's decode answers in turn
        def __init__(self, processor):
            self.processor = processor

        def __getattr__(self, name):
            return getattr(self.processor, name)

        def decode(self, ids, mask):
            return [next(replies) for _ in range(len(ids))]
    real = toy_probe.vlm.Processor.from_pretrained
    monkeypatch.setattr(toy_probe.vlm.Processor, "from_pretrained", lambda *a, **k: Texts(real(*a, **k)))
    toy_probe.main(["--model", tiny_dir, "--data", data, "--out", out])
    assert json.load(open(out)) == {"n": 256, "right": 128, "acc": 50.0, "format": 75.0}


def _predictions(folder, run, mode, right):
    """predictions_<mode>.jsonl of `run`: 16 base and 16 novel classes, 4 images each; `right(cls)` says
    whether every image of a class is answered right."""
    path = folder / "eval" / run
    path.mkdir(parents=True, exist_ok=True)
    with open(path / f"predictions_{mode}.jsonl", "w") as f:
        for c in range(32):
            for i in range(4):
                f.write(json.dumps({"label": f"class {c}", "base": c < 16, "dataset": "toy", "mode": mode,
                                    "correct": right(c), "inclusion": right(c)}) + "\n")


def test_the_test_sets_part_of_a_claims_noise_is_a_paired_bootstrap_over_classes(tmp_path):
    # a right on half the base classes, b on none: base accuracy differs by 50 points, and over resamples of
    # 16 classes by the binomial spread of a class share, 100 * sqrt(0.25 / 16) = 12.5 points
    _predictions(tmp_path, "a", "open", lambda c: c % 2 == 0)
    _predictions(tmp_path, "b", "open", lambda c: False)
    _predictions(tmp_path, "c", "open", lambda c: c % 2 == 0)
    se = compare.class_bootstrap_se(tmp_path, "a", "b", "open", "base_acc", draws=2000)
    assert se == pytest.approx(12.5, rel=0.1)
    assert compare.class_bootstrap_se(tmp_path, "a", "c", "open", "base_acc") == 0.0  # paired: the same answers
    assert compare.class_bootstrap_se(tmp_path, "a", "missing", "open", "base_acc") is None
    # over worlds the floor is sqrt(sum of squares) / n
    for w in ("w0", "w1"):
        _predictions(tmp_path / w, "divek", "open", lambda c: c % 2 == 0)
        _predictions(tmp_path / w, "exact", "open", lambda c: c % 4 == 0)
    floors = compare.test_set_floor([tmp_path / "w0", tmp_path / "w1"], draws=200)
    one = compare.class_bootstrap_se(tmp_path / "w0", "divek", "exact", "open", "hm", draws=200)
    assert list(floors) == ["DiVE-k - Visual-RFT, HM"] and floors["DiVE-k - Visual-RFT, HM"] == pytest.approx(
        (2 * one ** 2) ** 0.5 / 2) and one > 0
    table = compare.format_claims([("DiVE-k - Visual-RFT, HM", "+6.16", [1.0, 2.0], "within noise")], 2, floors)
    assert "SE of the test set" in table and f"{floors['DiVE-k - Visual-RFT, HM']:.1f}" in table


def test_held_out_format_reports_the_worst_world_per_question(tmp_path, capsys):
    folders = [fake_world(str(tmp_path), s) for s in range(2)]
    for seed, share in ((0, 1.0), (1, 0.9)):  # Fine-R1 answers 90% of world 1's MCQs in format
        write_eval(os.path.join(folders[seed], "eval", "tapo"), mcq={"acc": 0.5, "format": share},
                   open_={"base_acc": 0.6, "novel_acc": 0.4, "hm": 0.48, "format": 1.0})
    write_eval(os.path.join(folders[0], "eval", "exact"), open_={"base_acc": 0.5, "novel_acc": 0.3, "hm": 0.375,
                                                                 "format": 0.96})
    rows = dict(compare.held_out_format(folders))
    assert rows["Fine-R1"]["MCQ"] == pytest.approx([100.0, 90.0]) and rows["Fine-R1"]["open"] == [100.0, 100.0]
    assert rows["Visual-RFT"]["open"] == pytest.approx([96.0, None]) and rows["Visual-RFT"]["MCQ"] == [None, None]
    assert "start" not in rows  # fake_world's metrics carry no format share
    compare.main(folders + ["--no_plots"])
    out = capsys.readouterr().out
    block = out[out.index("format (%, worst world)"):].split("\n\n")[0].splitlines()
    lines = {line.split("  ")[0]: line.split() for line in block[2:]}
    assert lines["Fine-R1"][-5:] == ["100.0", "-", "-", "90.0", "no"]
    assert lines["Visual-RFT"][-5:] == ["96.0", "-", "-", "-", "yes"]


def test_a_perturbed_world_is_compared_cell_by_cell_with_the_unperturbed_worlds_se(tmp_path, capsys):
    reference = [fake_world(str(tmp_path / "ref"), s, hm_shift=0.01 * s) for s in range(3)]
    perturbed = fake_world(str(tmp_path / "perturbed"), 0, hm_shift=0.05)  # DiVE-k +5 on base and novel
    rows, outside, total = compare.perturbation(perturbed, reference)
    cells = dict(rows)
    base_se = compare.standard_error([50.0, 51.0, 52.0])  # DiVE-k's base over the three reference worlds
    assert cells["DiVE-k"][0] == (pytest.approx(5.0), pytest.approx(base_se))
    assert cells["Visual-RFT"][0] == (0.0, 0.0)  # the same on every world: SE 0, and not moved
    assert cells["start"][5] == (0.0, pytest.approx(compare.standard_error([25.0, 26.0, 27.0])))  # MCQ
    # DiVE-k's base, novel and HM, and CoT SFT+DAPO's novel and HM (novel 40 - 100 * hm_shift) move
    assert outside == 5 and total == 6 * 9
    assert cells["CoT SFT+DAPO"][1][0] == pytest.approx(-5.0) and cells["CoT SFT+DAPO"][0][0] == 0.0
    compare.main([perturbed, "--reference"] + reference)
    out = capsys.readouterr().out
    assert f"+5.0*({base_se:4.1f})" in out and "5 of 54 cells outside" in out
    with pytest.raises(SystemExit, match="no single unperturbed folder"):
        compare.perturbation(str(tmp_path / "seed_7"), reference)
