"""The recipes in runs/, the toy base model builder, evaluate.py --summary and bench.py, on CPU."""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"sft.py": "sft", "grpo.py": "grpo", "mine_topk.py": "mine_topk", "evaluate.py": "evaluate",
           "bench.py": "bench", "engine.py": "engine", "tiny.py": "tiny", "runs/toy_base.py": "runs.toy_base",
           "runs/sampler_gap.py": "runs.sampler_gap",
           "data.prepare": "data.prepare"}


class Captured(Exception):
    pass


def parser_of(module_name, subcommand=None):
    """The argparse parser a script builds (captured when it parses); a subcommand's own parser."""
    if subcommand is not None:
        return parser_of(module_name)._subparsers._group_actions[0].choices[subcommand]
    module = importlib.import_module(module_name)
    parse = module.parse_args
    real = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        raise Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        parse([])
    except Captured as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real


def commands(path):
    """(script, [flags]) of every python/launch command in a shell recipe, continuation lines joined;
    a $VAR on the command line contributes the flags of every value assigned to VAR in the file."""
    text = open(path).read().replace("\\\n", " ")
    assigned = {}
    for name, value in re.findall(r'(\w+)="([^"]*)"', text):
        assigned.setdefault(name, []).extend(re.findall(r"(?<!\w)(--\w+)", value))
    out = []
    for line in text.splitlines():
        m = re.search(r"\b(?:launch|python3?)\s+(?:-m\s+(data\.prepare)\s+(\w+)|((?:runs/)?\w+\.py))\b(.*)", line)
        if m and (m.group(1) or m.group(3)) in SCRIPTS:
            flags = re.findall(r"(?<!\w)(--\w+)", m.group(4))
            for var in re.findall(r"\$\{?(\w+)", m.group(4)):
                flags += assigned.get(var, [])
            out.append((f"data.prepare {m.group(2)}" if m.group(1) else m.group(3), flags))
    return out


def parser_of_command(script):
    name, _, sub = script.partition(" ")
    return parser_of(SCRIPTS[name], sub or None)


def unknown_flags(path):
    return [(script, f) for script, flags in commands(path)
            for f in flags if f not in parser_of_command(script)._option_string_actions]


@pytest.mark.parametrize("recipe", sorted(f for f in os.listdir(os.path.join(ROOT, "runs")) if f.endswith(".sh")))
def test_recipes_are_valid_shell_and_use_only_existing_flags(recipe):
    path = os.path.join(ROOT, "runs", recipe)
    subprocess.run(["bash", "-n", path], check=True)
    if recipe not in ("common.sh", "check_transformers4.sh"):  # a helper and a test runner
        assert commands(path), f"{recipe}: no stage command found"
    assert not unknown_flags(path), f"{recipe}: flags the scripts do not have: {unknown_flags(path)}"


def test_the_flag_check_catches_a_typo(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text('X="--lora_r 4 --lr_typo 3"\nlaunch grpo.py --model m \\\n  --beta 0 $X\n'
                   'python -m data.prepare toy --out o --pretrain-naming\npython runs/toy_base.py --steps 3\n')
    assert unknown_flags(str(bad)) == [("grpo.py", "--lr_typo"), ("data.prepare toy", "--pretrain"),
                                       ("runs/toy_base.py", "--steps")]


SHARED_FLAGS = ("--device", "--dtype", "--seed", "--min_pixels", "--max_pixels")
RETIRED = ("--group_size", "--group", "--rollout_prompts", "--batch_prompts", "--prompts", "--max_target_tokens",
           "--new_tokens", "--steps", "--micro_batch", "--skip-bad")


def test_one_cli_vocabulary():
    """One name per concept and one meaning per name: the flags every model-running script shares have the
    same defaults, choices and help; the names retired for another spelling of a concept are gone."""
    parsers = {name: parser_of_command(name) for name in SCRIPTS if name != "data.prepare"}
    choices = parser_of("data.prepare")._subparsers._group_actions[0].choices
    parsers.update({f"data.prepare {sub}": p for sub, p in choices.items()})
    for name, parser in parsers.items():
        assert not set(RETIRED) & set(parser._option_string_actions), name
        assert all("-" not in flag[2:] for flag in parser._option_string_actions), name  # underscores only
    for flag in SHARED_FLAGS:
        seen = {(a.default, tuple(a.choices or ()), a.help) for name, p in parsers.items()
                for a in p._actions if flag in a.option_strings and name in MODEL_SCRIPTS}
        assert len(seen) == 1, (flag, seen)
    for name in MODEL_SCRIPTS:
        if name not in ("bench.py", "engine.py"):
            assert set(SHARED_FLAGS) <= set(parsers[name]._option_string_actions), name
    for flag in SAMPLING_FLAGS:  # the same meaning (help) everywhere; the defaults are each stage's own
        helps = {a.help for name in ("grpo.py", "mine_topk.py", "evaluate.py", "bench.py")
                 for a in parsers[name]._actions if flag in a.option_strings}
        assert len(helps) == 1, (flag, helps)
    # one meaning per name: --batch_size is examples per optimizer step, never a sampler batch
    assert "--batch_size" not in parsers["evaluate.py"]._option_string_actions
    assert "--prompts_per_call" in parsers["evaluate.py"]._option_string_actions


SAMPLING_FLAGS = ("--num_samples", "--prompts_per_call", "--max_new_tokens", "--temperature", "--top_p")
MODEL_SCRIPTS = ("sft.py", "grpo.py", "mine_topk.py", "evaluate.py", "bench.py", "engine.py")


def test_patch_embed_as_matmul_equals_the_conv3d(tiny_dir):
    """runs/toy_base.py trains the tower with its Conv3d patch embedding run as a matmul: same outputs and
    gradients to float rounding, for either family (Qwen3-VL's has a bias)."""
    import torch
    from runs.toy_base import patch_embed_as_matmul
    visual = vlm.load_model(tiny_dir).model.visual
    embed = visual.patch_embed
    x = torch.randn(12, embed.proj.weight[0].numel())
    conv = embed(x)
    conv.pow(2).sum().backward()
    grads = [p.grad.clone() for p in embed.parameters()]
    embed.zero_grad()
    patch_embed_as_matmul(visual)
    fast = embed(x)
    fast.pow(2).sum().backward()
    torch.testing.assert_close(fast, conv, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, embed.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)
    assert not torch.equal(conv, torch.zeros_like(conv))


def test_toy_tokenizer_corpus_holds_the_rationale_words_not_the_cot_pool(tmp_path):
    """The start model's tokenizer learns the CoT template's words, yet a world whose Fine-R1 pool asks other
    rationales (here a smaller pool) gives the very same corpus, so the same start model."""
    from data import toy
    from data.records import load_classes
    from runs.toy_base import tokenizer_corpus
    small = dict(n_shapes=2, n_colours=2, n_patterns=2, train_per_class=3, val_per_class=1, test_per_class=1,
                 pretrain_per_class=1, names="epithets", pretrain_naming=True, confusion=0.5, confused_pairs=1)
    corpora = []
    for cot in (1, 3):
        toy.generate(str(tmp_path / f"cot{cot}"), seed=0, cot_per_class=cot, **small)
        corpora.append(tokenizer_corpus(str(tmp_path / f"cot{cot}"), load_classes(tmp_path / f"cot{cot}")))
    assert (tmp_path / "cot1" / "sft_cot.jsonl").read_text() != (tmp_path / "cot3" / "sft_cot.jsonl").read_text()
    assert corpora[0] == corpora[1]
    assert any("Candidates compared: " in text and "Prediction: " in text for text in corpora[0])


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")  # as runs/toy.sh runs it: a second thread's sums differ in the last bit


def test_toy_base_model_builder(toy_world, tmp_path, family):
    """Only the vision tower trains (Qwen3-VL: its DeepStack mergers too, which feed the language model), and
    the images drawn in a second process or in this one give the same model (one family is enough for that)."""
    root, _ = toy_world
    import torch
    from PIL import Image
    from transformers import AutoConfig
    trained = {}
    for workers in ("1", "0") if family == "qwen2_5_vl" else ("0",):
        out = tmp_path / f"vision{workers}"
        done = subprocess.run([sys.executable, os.path.join(ROOT, "runs", "toy_base.py"), "--data", str(root), "--out",
                               str(out), "--max_steps", "3", "--batch_size", "4", "--draw_workers", workers,
                               "--family", family], capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "held-out attribute accuracy" in done.stdout
        cls = vlm.model_class(AutoConfig.from_pretrained(str(out)))
        trained[workers] = dict(cls.from_pretrained(str(out)).named_parameters())
    size = json.load(open(root / "classes.json"))["config"]["size"]  # either family sees a world image as 4 tokens
    batch = vlm.Processor.from_pretrained(str(out)).encode([Image.new("RGB", (size, size))], ["q"])
    assert int(batch.mm_token_type_ids.sum()) == (size // 28) ** 2 == 4
    init = cls.from_pretrained(str(out) + ".init")
    changed = {n for n, a in init.named_parameters() if not torch.equal(a, trained["0"][n])}
    assert changed and all(".visual." in f".{n}" for n in changed)  # only the vision tower was trained
    if family == "qwen3_vl":
        assert any(".deepstack_merger_list." in n for n in changed)
    assert all(torch.equal(trained["0"][n], trained[w][n]) for w in trained for n in trained["0"])

    # --tower: another world seed's model (its own text weights) with this tower put in, nothing trained
    other = tmp_path / "other_seed"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "runs", "toy_base.py"), "--data", str(root), "--out",
                           str(other), "--seed", "7", "--tower", str(out), "--family", family],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    put = dict(cls.from_pretrained(str(other)).named_parameters())
    fresh = dict(cls.from_pretrained(str(other) + ".init").named_parameters())  # seed 7's untrained model
    for n, p in put.items():
        assert torch.equal(p, trained["0"][n] if ".visual." in f".{n}" else fresh[n]), n
    assert any(not torch.equal(fresh[n], init_p) for n, init_p in init.named_parameters() if ".visual." not in f".{n}")
    wrong = subprocess.run([sys.executable, os.path.join(ROOT, "runs", "toy_base.py"), "--data", str(root), "--out",
                            str(tmp_path / "wrong"), "--tower", str(out), "--vision_hidden", "64", "--family", family],
                           capture_output=True, text=True, cwd=ROOT)
    assert wrong.returncode != 0 and "not this model's" in wrong.stderr


def test_summary_table(tmp_path):
    import metrics
    for name, acc in [("sft", 0.5), ("grpo", 0.75)]:
        folder = tmp_path / name
        folder.mkdir()
        values = {"mode": "open", "per_dataset": {"toy": {"base_acc": acc, "novel_acc": 0.25, "hm": 0.4, "acc": 0.3}},
                   "mean": {}}
        (folder / "metrics_open.json").write_text(json.dumps(values))
    (tmp_path / "grpo" / "metrics_mcq.json").write_text(json.dumps(
        {"mode": "mcq", "per_dataset": {"toy": {"acc": 0.875}}, "mean": {}}))
    table = metrics.summary([str(tmp_path / "sft"), str(tmp_path / "grpo")], ["SFT", "GRPO"]).splitlines()
    assert table[0].split() == ["model", "base", "novel", "HM", "open", "acc", "MCQ"]
    assert table[2].split() == ["SFT", "50.0", "25.0", "40.0", "30.0", "-"]
    assert table[3].split() == ["GRPO", "75.0", "25.0", "40.0", "30.0", "87.5"]


@pytest.mark.parametrize("extra,how", [([], ""),
                                       (["--lora_r", "4", "--gradient_checkpointing"], ", LoRA r4, checkpointed")])
def test_bench_runs_and_reports_every_row(extra, how):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--prompts_per_call", "2", "--num_samples", "2",
                           "--max_new_tokens", "4", "--repeats", "1", "--device", "cpu"] + extra,
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("rollout: ours", "rollout: model.generate", "ours / generate", "decode step",
                f"update: fwd+bwd, shared prefix{how} ", f"update: fwd+bwd, per row{how} ",
                "update: per row / shared prefix"):
        assert row in done.stdout, row
    assert "MFU" in done.stdout



def test_sampler_gap_is_rounding_in_fp32_and_measurable_in_bf16():
    """runs/sampler_gap.py on the tiny model, CPU: fp32 (what grpo.py computes here) agrees to rounding; bf16
    weights (LoRA keeps the base in bf16) part by more, and the script says by how much."""
    from runs import sampler_gap
    small = ["--device", "cpu", "--prompts_per_call", "2", "--num_samples", "2", "--max_new_tokens", "8"]
    fp32 = sampler_gap.main(small + ["--dtype", "fp32"])
    bf16 = sampler_gap.main(small + ["--dtype", "bf16", "--lora_r", "4"])
    assert fp32["max"] <= 1e-5 and 0 <= fp32["kl"] <= 1e-10
    assert bf16["abs"] > 100 * fp32["abs"] and bf16["kl"] > 0


REQUIRED = {"sft": ["--model", "m", "--data", "d", "--out", "o"], "grpo": ["--model", "m", "--data", "d", "--out", "o"],
            "mine_topk": ["--model", "m", "--data", "d", "--out", "o", "--classes", "c"],
            "evaluate": ["--model", "m", "--data", "d", "--out", "o", "--classes", "c"]}


@pytest.mark.parametrize("script,flag,value", [
    ("sft", "--max_steps", "-5"), ("sft", "--batch_size", "0"), ("sft", "--micro_batch_size", "0"),
    ("sft", "--epochs", "0"), ("sft", "--max_new_tokens", "0"), ("sft", "--lr", "-1e-5"),
    ("grpo", "--max_steps", "-5"), ("grpo", "--prompts_per_step", "0"), ("grpo", "--num_samples", "0"),
    ("grpo", "--micro_batch_size", "0"), ("grpo", "--max_new_tokens", "0"), ("grpo", "--top_p", "1.5"),
    ("grpo", "--temperature", "0"), ("grpo", "--lora_r", "-4"), ("grpo", "--max_pixels", "0"),
    ("mine_topk", "--k", "0"), ("mine_topk", "--num_samples", "0"), ("mine_topk", "--max_new_tokens", "0"),
    ("mine_topk", "--prompts_per_call", "0"), ("evaluate", "--prompts_per_call", "0"), ("evaluate", "--k", "0"),
    ("evaluate", "--num_samples", "x"), ("mine_topk", "--k", "27"), ("mine_topk", "--k", "1"),
    ("evaluate", "--k", "27"),
])
def test_bad_arguments_are_refused_up_front_naming_the_flag(script, flag, value, capsys):
    """Before anything is loaded: argparse's usage error (exit status 2) naming the flag, never a traceback
    from deep inside a run, a run that writes nothing and says "done", or silent junk."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        module.parse_args(REQUIRED[script] + [flag, value])
    assert e.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err
