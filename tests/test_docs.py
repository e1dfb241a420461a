"""The repository's own documents: every reference into docs/methods.md points at a section that exists; every
flag the README names exists and every default it states is the code's; every usage line a script's docstring
shows (and every command in the README) parses with that script's own parser; the README stays a guide."""
import argparse
import ast
import contextlib
import functools
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from unittest import mock

import pytest

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


# ----------------------------------------------------------------------------------------------------
# the command lines the documents show: every flag exists, every stated default is the code's, every usage
# line parses. A script's parser is built as its own parse_args (or main) builds it, stopped where it would
# read the command line: importing a script loads no model.

SCRIPTS = ["sft.py", "grpo.py", "evaluate.py", "mine_topk.py", "bench.py", "engine.py", "tiny.py",
           "data/prepare.py", "runs/compare.py", "runs/sampler_gap.py", "runs/toy_base.py", "runs/toy_errors.py",
           "runs/toy_probe.py"]
OTHER_TOOLS = {"--index-url": "pip", "--standalone": "torchrun", "--nproc_per_node": "torchrun"}
README_LINES = 200


def readme():
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


@functools.lru_cache(maxsize=None)
def module_of(script):
    """The script imported: a module of the root or data/ by its name, one of runs/ (no package) from its file."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if not script.startswith("runs/"):
        return importlib.import_module(script[:-3].replace("/", "."))
    spec = importlib.util.spec_from_file_location("docs_" + script[:-3].replace("/", "_"), os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Stopped(Exception):
    """Raised by ArgumentParser.parse_args while a parser is captured: carries the parser."""


@functools.lru_cache(maxsize=None)
def parser_of(script):
    """The script's ArgumentParser, as its parse_args (or main, where the parser is built there) makes it."""
    module = module_of(script)
    entry = getattr(module, "parse_args", None) or module.main

    def stop(self, args=None, namespace=None):
        raise _Stopped(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            entry([])
        except _Stopped as stopped:
            return stopped.args[0]
    raise AssertionError(f"{script}: {entry.__name__}([]) never called ArgumentParser.parse_args")


def subparsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from subparsers(sub)


def option_strings(parser):
    """Every flag of the parser and its subcommands, but a former spelling kept only to be refused by name
    (hidden from --help: common.renamed)."""
    return {flag for p in subparsers(parser) for flag, action in p._option_string_actions.items()
            if action.help != argparse.SUPPRESS}


def choices_of(flag):
    """The values `flag` accepts in each script that has it (None: any value)."""
    found = []
    for script in SCRIPTS:
        for p in subparsers(parser_of(script)):
            action = p._option_string_actions.get(flag)
            if action is not None and action.help != argparse.SUPPRESS:
                found.append(action.choices)
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_builds_its_parser_without_a_model(script):
    assert parser_of(script)._actions


def test_the_readme_is_a_guide_of_at_most_200_lines():
    assert len(readme().splitlines()) <= README_LINES


def test_every_flag_the_readme_names_exists():
    """Every `--flag` in the README is a flag of one of the scripts (or of pip / torchrun, named as such)."""
    known = set(OTHER_TOOLS)
    for script in SCRIPTS:
        known |= option_strings(parser_of(script))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", readme()))
    assert len(named) >= 40  # the parser reads the README's flags
    missing = sorted(named - known)
    assert not missing, f"flags the README names that no script has: {missing}"


def test_the_values_the_readme_lists_for_a_flag_are_its_choices():
    """`--flag a|b|c` in the README: each value is a choice of the flag in a script that has it."""
    listed = re.findall(r"(?<![\w-])(--[a-z][a-z0-9_]*) ([\w.-]+(?:\|[\w.-]+)+)", readme())
    assert len(listed) >= 8
    wrong = []
    for flag, values in listed:
        accepted = choices_of(flag)
        if any(c is None for c in accepted):
            continue
        wrong += [f"{flag} {v}" for v in values.split("|") if not any(v in c for c in accepted)]
    assert not wrong, f"values the README lists that no script accepts: {wrong}"


# what the README says a default is (its words, whitespace folded), the scripts it says it of, the flag's
# dest and the default (None: the flag is left unset, and the script resolves it as the README says)
README_DEFAULTS = [
    ("`--dtype auto|fp32|bf16` (auto:", ["sft.py", "grpo.py", "evaluate.py", "mine_topk.py", "bench.py", "engine.py"],
     "dtype", "auto"),
    ("`--device auto|cpu|cuda`", ["sft.py", "grpo.py", "evaluate.py", "mine_topk.py", "bench.py", "engine.py"],
     "device", "auto"),
    ("`--max_pixels` / `--min_pixels`, the area after resizing; default none",
     ["sft.py", "grpo.py", "evaluate.py", "mine_topk.py"], "max_pixels", None),
    ("`--max_pixels` / `--min_pixels`, the area after resizing; default none",
     ["sft.py", "grpo.py", "evaluate.py", "mine_topk.py"], "min_pixels", None),
    ("`--prompt` (sft.py, grpo.py; default auto", ["sft.py", "grpo.py"], "prompt", "auto"),
    ("the names the open question lists: none in sft.py, grpo.py", ["sft.py", "grpo.py"], "class_list", "none"),
    ("and evaluate.py's open mode, split in its two_step", ["evaluate.py"], "class_list", None),
    ("two_step, base in mining", ["mine_topk.py"], "class_list", "base"),
    ("`--report_to none|wandb|tensorboard` (also evaluate.py)", ["sft.py", "grpo.py", "evaluate.py"],
     "report_to", "none"),
    ("`--lora_alpha 32`", ["sft.py", "grpo.py"], "lora_alpha", 32),
    ("`--beta 0.04`", ["grpo.py"], "beta", 0.04),
    ("`--kl_estimator k1|k2|k3` (k3)", ["grpo.py"], "kl_estimator", "k3"),
    ("`--rollout_correction_cap 2`", ["grpo.py"], "rollout_correction_cap", 2),
]


def folded(text):
    return " ".join(text.split())


@pytest.mark.parametrize("words, scripts, dest, default", README_DEFAULTS,
                         ids=[f"{d}-{'+'.join(s)}" for _, s, d, _ in README_DEFAULTS])
def test_a_default_the_readme_states_is_the_scripts_default(words, scripts, dest, default):
    assert folded(words) in folded(readme()), f"the README no longer says {words!r}: update README_DEFAULTS"
    for script in scripts:
        parser = parser_of(script)
        assert any(a.dest == dest for a in parser._actions), f"{script} has no --{dest}"
        found = parser.get_default(dest)
        assert found == default, f"{script} --{dest}: {found!r}, the README {default!r}"


def test_evaluate_lists_none_for_open_and_the_split_for_two_step_by_default():
    """What the README says evaluate.py's unset --class_list means: none in open mode, split in two_step (the
    base names for a base-class image, the novel names for a novel one)."""
    evaluate = module_of("evaluate.py")
    args = evaluate.parse_args(["--model", "m", "--data", "d", "--classes", "c", "--out", "o"])
    is_base = type("Index", (), {"is_base": lambda self, record: record["base"]})()
    with mock.patch.object(evaluate, "listed_classes", lambda table, dataset, which: which):
        listed = lambda mode, record: evaluate.class_list_for(mode, args, None, is_base)(record)  # noqa: E731
        assert listed("open", {"base": True}) == "none"
        assert (listed("two_step", {"base": True}), listed("two_step", {"base": False})) == ("base", "novel")


@pytest.mark.parametrize("losses, low, high", [(["grpo", "bnpo", "dr_grpo", "dapo"], 0.2, 0.2),
                                               (["gspo", "gspo_token"], 3e-4, 4e-4), (["cispo"], 1.0, 4.0)])
def test_the_clip_defaults_the_readme_states_are_each_losss(losses, low, high):
    assert "(left out, the loss's paper's: 0.2 / 0.2; gspo 3e-4 / 4e-4; cispo 1 / 4" in folded(readme())
    grpo = module_of("grpo.py")
    for loss in losses:
        args = grpo.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", "--loss", loss])
        assert (args.epsilon_low, args.epsilon_high) == pytest.approx((low, high)), loss


def test_an_epsilon_low_of_1_no_lower_clip_can_be_given():
    """CISPO's default ε_low, 1 (a lower bound of 0), is also a value a user may give."""
    args = module_of("grpo.py").parse_args(["--model", "m", "--data", "d", "--out", "o", "--epsilon_low", "1"])
    assert args.epsilon_low == 1


# ----------------------------------------------------------------------------------------------------
# usage lines: `python X.py ...`, `python -m data.prepare ...`, `torchrun ... X.py ...`

def command_lines(text):
    """The lines of `text` that run a command, a trailing backslash joining the next line."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        if line.startswith(("python ", "torchrun ")):
            yield line
        i += 1


def script_and_argv(line):
    """(the script a command line runs, its arguments, whether the line elides some with `...`), or None when
    it runs no script of this repository (pytest, ...). Shell comments (`# ...`) and a closing remark in
    parentheses ("(same flags)") are dropped; `[--flag]` (optional) is kept as `--flag`."""
    tokens = shlex.split(line, comments=True)
    cut = next((i for i, t in enumerate(tokens) if t.startswith("(")), len(tokens))
    tokens = [t.strip("[]") for t in tokens[:cut]]
    elided = "..." in tokens
    tokens = [t for t in tokens if t and t != "..."]
    if tokens[0] == "python" and tokens[1] == "-m":
        script, rest = tokens[2].replace(".", "/") + ".py", tokens[3:]
    else:
        at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if at is None:
            return None
        script, rest = tokens[at], tokens[at + 1:]
    if not os.path.exists(os.path.join(ROOT, script)):
        return None if tokens[0] == "python" and tokens[1] == "-m" else (script, rest, elided)
    return script, rest, elided


@contextlib.contextmanager
def nothing_required(parser):
    """For a line that elides flags (`...`): what it shows must parse, what it leaves out may be required."""
    saved = [(a, a.required) for p in subparsers(parser) for a in p._actions]
    for action, _ in saved:
        action.required = False
    try:
        yield
    finally:
        for action, required in saved:
            action.required = required


def parse_error(script, argv, elided):
    """argparse's message when `script` refuses `argv`, else None. A whole line goes through the script's own
    parse_args (with its own checks); an elided one through its parser with nothing required."""
    if script not in SCRIPTS:
        return f"{script} is not one of the scripts this test knows (SCRIPTS)"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if elided:
                parser = parser_of(script)
                with nothing_required(parser):
                    parser.parse_args(argv)
            else:
                module = module_of(script)
                (getattr(module, "parse_args", None) or parser_of(script).parse_args)(argv)
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def docstring_usage():
    for pattern in ("*.py", "data/*.py", "runs/*.py"):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()), clean=False) or ""
            for line in command_lines(doc):
                yield os.path.relpath(path, ROOT), line


USAGE = list(docstring_usage())


def test_the_scripts_docstrings_show_usage_lines():
    shown = {script for script, _ in USAGE}
    assert {"sft.py", "grpo.py", "evaluate.py", "mine_topk.py", "bench.py", "engine.py", "data/prepare.py",
            "runs/compare.py"} <= shown
    assert any((script_and_argv(line) or (0, 0, False))[2] for _, line in USAGE)  # `...` lines: elided


@pytest.mark.parametrize("where, line", USAGE, ids=[f"{w}:{i}" for i, (w, _) in enumerate(USAGE)])
def test_every_usage_line_in_a_docstring_parses(where, line):
    parsed = script_and_argv(line)
    assert parsed is not None, f"{where}: {line!r} runs no script of this repository"
    script, argv, elided = parsed
    error = parse_error(script, argv, elided)
    assert error is None, f"{where}: {line!r}: {error}"


def readme_commands():
    """The command lines of the README's ```bash blocks (the pipeline's diagram is no command)."""
    text, fence = [], None
    for line in readme().splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
        elif fence == "bash":
            text.append(line)
    return list(command_lines("\n".join(text)))


def test_every_command_in_the_readme_parses():
    commands = readme_commands()
    assert len(commands) >= 3
    errors = []
    for line in commands:
        parsed = script_and_argv(line)
        if parsed:
            error = parse_error(*parsed)
            if error:
                errors.append(f"{line!r}: {error}")
    assert not errors, errors
