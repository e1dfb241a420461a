"""Tests for reward.py: every function, the reward-hacking suite, the verifiers and their cache."""
import subprocess
import sys

import pytest

import reward as R


def C(answer, think="The bill is orange and the tail forked."):
    """A well-formatted completion with a given answer."""
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


ARCTIC = {"label": "Arctic Tern", "aliases": ["Artic Tern", "Artic_Tern", "Sterna paradisaea"],
          "parents": ["Charadriiformes", "Laridae", "Sterna"], "dataset": "cub"}
COMMON = {"label": "Common Tern", "aliases": ["Sterna hirundo"],
          "parents": ["Charadriiformes", "Laridae", "Sterna"], "dataset": "cub"}
ALBATROSS = {"label": "Black-footed Albatross",
             "aliases": ["Black footed Albatross", "Black_footed_Albatross", "Phoebastria nigripes"],
             "parents": ["Procellariiformes", "Diomedeidae", "Phoebastria"], "dataset": "cub"}
BREWER = {"label": "Brewer Blackbird", "aliases": ["Brewer's Blackbird", "Euphagus cyanocephalus"],
          "parents": ["Passeriformes", "Icteridae", "Euphagus"], "dataset": "cub"}
B738 = {"label": "737-800", "aliases": ["Boeing 737-800"], "parents": ["Boeing", "Boeing 737"],
        "dataset": "aircraft"}
B737_FAMILY = {"label": "Boeing 737", "aliases": ["737"], "parents": ["Boeing"], "dataset": "aircraft"}
AIRCRAFT = {"dataset": "aircraft", "domain": "aircraft", "classes": [
    {"id": 0, "name": "737-700", "aliases": ["Boeing 737-700"], "parents": ["Boeing", "Boeing 737"]},
    {"id": 1, "name": "737-800", "aliases": ["Boeing 737-800"], "parents": ["Boeing", "Boeing 737"]},
    {"id": 2, "name": "747-400", "aliases": ["Boeing 747-400"], "parents": ["Boeing", "Boeing 747"]},
    {"id": 3, "name": "A320", "aliases": ["Airbus A320"], "parents": ["Airbus", "A320"]},
    {"id": 4, "name": "F/A-18", "aliases": [], "parents": ["McDonnell Douglas", "F/A-18"]},
    {"id": 5, "name": "F-16A/B", "aliases": [], "parents": ["General Dynamics", "F-16"]}]}
MCQ = {"label": "Arctic Tern", "aliases": ["Sterna paradisaea"], "dataset": "cub",
       "options": ["Common Tern", "Arctic Tern", "Forsters Tern", "Caspian Tern"], "answer": "B"}
TOY = {"label": "striped red triangle", "aliases": [], "parents": ["triangle", "red triangle"],
       "dataset": "toy"}


# -----------------------------------------------------------------------------
# extraction and format

def test_extract_answer():
    assert R.extract_answer(C("Arctic Tern")) == "Arctic Tern"
    assert R.extract_answer("<answer>\n  Arctic Tern \n</answer>") == "Arctic Tern"
    assert R.extract_answer("<answer>Common Tern</answer><answer>Arctic Tern</answer>") == "Common Tern"
    assert R.extract_answer("<answer></answer>") == ""
    assert R.extract_answer("<think>Arctic Tern</think>") is None
    assert R.extract_answer("<answer>Arctic Tern") is None
    assert R.extract_answer("") is None and R.extract_answer(None) is None


@pytest.mark.parametrize("text", [
    "<think>x</think><answer>y</answer>",
    "  <think>x</think>\n\n<answer> y </answer>\n",
    "<think>\nmulti\nline\n</think> <answer>Arctic Tern</answer>",
    "<think></think><answer></answer>",
])
def test_format_ok(text):
    assert R.format_ok(text)


@pytest.mark.parametrize("text", [
    "<answer>y</answer>",                                       # no think
    "<think>x</think>",                                         # no answer
    "<think>x</think><answer>y</answer> trailing",              # text after
    "preamble <think>x</think><answer>y</answer>",              # text before
    "<think>x</think> between <answer>y</answer>",              # text between
    "<think>x</think><answer>y</answer><answer>z</answer>",     # two answers
    "<think>x</think><think>x</think><answer>y</answer>",       # two thinks
    "<answer>y</answer><think>x</think>",                       # wrong order
    "<think>x<answer>y</answer></think>",                       # nested
    "<think>x</think><answer>y",                                # unclosed
    "",
])
def test_format_bad(text):
    assert not R.format_ok(text)


# -----------------------------------------------------------------------------
# normalisation and exact match

@pytest.mark.parametrize("raw,norm", [
    ("Arctic Tern", "arctic tern"),
    ("  ARCTIC   tern. ", "arctic tern"),
    ("Black-footed_Albatross", "black footed albatross"),
    ("Brewer's Blackbird", "brewer blackbird"),
    ("Brewer\u2019s Blackbird", "brewer blackbird"),
    ("Chuck-will's-widow", "chuck will widow"),
    ("The Arctic Tern", "arctic tern"),
    ("an Arctic Tern", "arctic tern"),
    ("A", "a"),                                   # a lone article-like word is kept
    ("737-800", "737 800"),
    ("F/A-18", "fa 18"),
    ("\uff21\uff52\uff43\uff54\uff49\uff43 Tern", "arctic tern"),   # full-width -> ASCII (NFKC)
    ("Arctic\u00a0Tern", "arctic tern"),          # no-break space
    ("737\u2013800", "737 800"),                  # en dash is a dash
    ("", ""),
    (None, ""),
])
def test_normalize(raw, norm):
    assert R.normalize(raw) == norm


def test_lookalikes_are_not_merged():
    cyrillic = "\u0410rctic Tern"    # Cyrillic capital A
    assert R.normalize(cyrillic) != R.normalize("Arctic Tern")
    assert not R.is_correct(cyrillic, ARCTIC)
    assert not R.is_correct("Arctic T\u0435rn", ARCTIC)   # Cyrillic small ie
    assert R.is_correct("\uff21rctic Tern", ARCTIC)       # full-width A is allowed to match
    # distinct real class names stay distinct after normalisation
    names = ["737-700", "737-800", "747-400", "A320", "F/A-18", "F-16A/B", "Arctic Tern", "Tern",
             "Common Tern", "Black Tern", "Black-footed Albatross", "Laysan Albatross"]
    assert len({R.normalize(n) for n in names}) == len(names)


def test_names_of():
    assert R.names_of(ALBATROSS) == {"black footed albatross", "phoebastria nigripes"}
    assert R.names_of({"name": "737-800", "aliases": ["Boeing 737-800", ""]}) == {"737 800",
                                                                                 "boeing 737 800"}


@pytest.mark.parametrize("answer,record", [
    ("Arctic Tern", ARCTIC), ("arctic tern", ARCTIC), ("ARCTIC TERN.", ARCTIC), ("The Arctic Tern", ARCTIC),
    ("Artic Tern", ARCTIC), ("Sterna paradisaea", ARCTIC), ("sterna Paradisaea", ARCTIC),
    ("Black-footed Albatross", ALBATROSS), ("Black footed Albatross", ALBATROSS),
    ("black_footed_albatross", ALBATROSS), ("Phoebastria nigripes", ALBATROSS),
    ("Brewer's Blackbird", BREWER), ("Brewer Blackbird", BREWER), ("Euphagus cyanocephalus", BREWER),
    ("737-800", B738), ("737 800", B738), ("Boeing 737-800", B738), ("boeing 737_800", B738),
])
def test_correct_positive(answer, record):
    assert R.is_correct(answer, record)
    rewards, details = R.parse_reward("exact+format")([C(answer)], [record])
    assert rewards == [2.0] and details[0]["correct"]


HACKS = [
    "Arctic Tern or Common Tern",
    "Common Tern or Arctic Tern",
    "either Arctic Tern or Common Tern",
    "Arctic Tern/Common Tern",
    "Arctic Tern / Common Tern",
    "Arctic Tern, Common Tern, Caspian Tern, Forsters Tern, Black Tern, Least Tern",
    "Arctic Tern and Common Tern",
    "",
    "   ",
    "Tern",                                   # label is a superstring of the answer
    "Arctic",
    "\u0410rctic Tern",                       # Cyrillic look-alike
    "Arctic Tern? maybe",
    "It is an Arctic Tern.",
    "Arctic Tern " * 500,                     # thousands of characters containing the label
]


@pytest.mark.parametrize("answer", HACKS)
def test_exact_hacks_get_nothing(answer):
    rewards, details = R.parse_reward("exact")([C(answer)], [ARCTIC])
    assert rewards == [0.0] and not details[0]["correct"]


def test_structural_hacks_get_nothing():
    """Right name only in <think>, two answer blocks with the right one second, no answer block."""
    hacks = ["<think>It is an Arctic Tern.</think><answer>Common Tern</answer>",
             "<think>Arctic Tern</think><answer></answer>",
             "<think>Arctic Tern</think>",
             "<think>x</think><answer>Common Tern</answer><answer>Arctic Tern</answer>",
             "Arctic Tern"]
    rewards, details = R.parse_reward("exact+format")(hacks, [ARCTIC] * len(hacks))
    assert [d["exact"] for d in details] == [0.0] * len(hacks)
    assert not any(d["correct"] for d in details)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0]   # format only where the format is right


def test_longer_wrong_name_is_not_the_label():
    tern = {"label": "Tern", "aliases": [], "dataset": "cub"}
    assert not R.is_correct("Arctic Tern", tern) and not R.is_correct("Tern", ARCTIC)
    assert R.text_inclusion("Arctic Tern", tern)   # why inclusion is only a metric


def test_text_inclusion_metric():
    assert R.text_inclusion("Arctic Tern", ARCTIC)
    assert R.text_inclusion("Arctic Tern or Common Tern", ARCTIC)   # hackable: only a metric
    assert R.text_inclusion("it is a sterna paradisaea!", ARCTIC)
    assert not R.text_inclusion("Tern", ARCTIC)
    assert not R.text_inclusion("", ARCTIC) and not R.text_inclusion(None, ARCTIC)
    _, details = R.parse_reward("exact")([C("Arctic Tern or Common Tern")], [ARCTIC])
    assert details[0]["inclusion"] and details[0]["exact"] == 0.0


def test_is_hedge():
    for text in ["A or B", "either A or B", "Arctic Tern/Common Tern", "Tern, Gull", "maybe a tern",
                 "Arctic Tern vs Common Tern", "Tern & Gull"]:
        assert R.is_hedge(text), text
    for text in ["Arctic Tern", "F/A-18", "F-16A/B", "Orchard Oriole", "737-800", "None", ""]:
        assert not R.is_hedge(text), text


# -----------------------------------------------------------------------------
# MCQ

@pytest.mark.parametrize("answer", ["B", "(B)", "B.", "B)", "B:", "[B]", " B ", "B) Arctic Tern",
                                    "B. Arctic Tern", "(B) arctic tern", "B Arctic Tern", "Arctic Tern",
                                    "arctic_tern.", "\uff22"])
def test_mcq_positive(answer):
    assert R.mcq_choice(answer, MCQ["options"]) == 1
    assert R.mcq_correct(answer, MCQ)


@pytest.mark.parametrize("answer", [
    "B or C", "B/C", "B, C", "B and C", "A B C D", "A, B, C, D", "(B) or (C)", "BC",
    "B. Common Tern",                 # right letter, other option's text
    "B) Arctic Tern or Common Tern",
    "Common Tern, Arctic Tern, Forsters Tern, Caspian Tern",
    "b",                              # lower case is not a letter answer
    "Z",                              # no such option
    "", None, "Brewer Blackbird", "Tern",
    "B " + "Arctic Tern " * 300,
])
def test_mcq_hacks(answer):
    assert R.mcq_choice(answer, MCQ["options"]) is None
    assert not R.mcq_correct(answer, MCQ)


def test_mcq_choice_other_options():
    opts = MCQ["options"]
    assert R.mcq_choice("A", opts) == 0 and R.mcq_choice("D. Caspian Tern", opts) == 3
    assert R.mcq_choice("Common Tern", opts) == 0 and not R.mcq_correct("A", MCQ)
    # an option text that starts like a letter form is still read by its text
    assert R.mcq_choice("A 380", ["A 380", "A320"]) == 0 and R.mcq_choice("B", ["A 380", "A320"]) == 1
    assert R.mcq_choice("Tern", ["Tern", "tern"]) is None   # two options with one name: ambiguous


@pytest.mark.parametrize("target", ["", "AB", "BC", "b", "E", None])
def test_mcq_reward_refuses_a_record_whose_answer_is_not_one_letter(target):
    """"" and "AB" are substrings of the letters (index 0: option A), "BC" reads as option B: the reward is
    also a library others call, so it refuses such a record instead of crediting an option."""
    record = dict(MCQ, answer=target)
    with pytest.raises(ValueError, match="is not one of the option letters ABCD"):
        R.mcq_correct("A", record)
    with pytest.raises(ValueError, match="is not one of the option letters"):
        R.parse_reward("mcq+format")([C("A")], [record])


def test_mcq_reward_is_divek_sum():
    completions = [C("B"), C("A"), "<answer>B</answer>", C("B or C"), "no tags at all"]
    rewards, details = R.parse_reward("mcq+format")(completions, [MCQ] * 5, [0] * 5)
    assert rewards == [2.0, 1.0, 1.0, 1.0, 0.0]
    assert [d["correct"] for d in details] == [True, False, True, False, False]


# -----------------------------------------------------------------------------
# ClassMatcher

def test_class_matcher():
    m = R.ClassMatcher([{"id": 0, "name": "Arctic Tern", "aliases": ["Artic Tern"]},
                        ("Common Tern", ["Sterna hirundo"]), "Tern", "Black-footed Albatross"])
    assert len(m) == 4
    assert m.match("artic tern") == "Arctic Tern" and m("The Arctic Tern.") == "Arctic Tern"
    assert m("sterna hirundo") == "Common Tern" and m("TERN") == "Tern"
    assert m("black footed albatross") == "Black-footed Albatross"
    assert m("Arctic Tern or Common Tern") is None and m("") is None and m(None) is None
    assert m("\u0410rctic Tern") is None
    amb = R.ClassMatcher([("Tern A", ["tern"]), ("Tern B", ["Tern"])])
    assert amb("tern") is None and amb("Tern A") == "Tern A" and "tern" in amb.ambiguous
    # records of the same class (many images) are fine
    assert R.ClassMatcher([ARCTIC, ARCTIC, COMMON])("artic_tern") == "Arctic Tern"


# -----------------------------------------------------------------------------
# Specificity: taxonomy verifier

def test_taxonomy_aircraft():
    v = R.TaxonomyVerifier(AIRCRAFT)
    cases = {"737-800": "specific", "Boeing 737-800": "specific", "Boeing 737": "less_specific",
             "737": "less_specific", "Boeing": "generic", "airplane": "generic", "Aircraft": "generic",
             "737-700": "wrong", "747-400": "wrong", "Airbus": "wrong", "None": "abstain",
             "none": "abstain", "737-800 or 737-700": "wrong", "737-700/737-800": "wrong",
             "bird": "wrong", "": None}
    for pred, cat in cases.items():
        assert v.categorize(B738, pred) == cat, pred
    assert v.categorize(B738, None) is None
    # a family-level ground truth: a variant of it is more specific
    assert v.categorize(B737_FAMILY, "737-800") == "more_specific"
    assert v.categorize(B737_FAMILY, "Boeing 737-700") == "more_specific"
    assert v.categorize(B737_FAMILY, "747-400") == "wrong"
    assert v.categorize(B737_FAMILY, "Boeing") == "less_specific"
    assert v.verify([(B738, "737-800"), (B738, "Boeing"), (B738, "")]) == ["specific", "generic", None]


def test_taxonomy_birds_and_toy_from_records():
    v = R.TaxonomyVerifier([ARCTIC, COMMON, ALBATROSS, TOY], domain_words=["seabird"])
    cases = {"Sterna paradisaea": "specific", "Sterna": "less_specific", "Laridae": "generic",
             "Charadriiformes": "generic", "bird": "generic", "seabird": "generic",
             "Common Tern": "wrong", "Tern": "wrong", "I don't know": "abstain"}
    for pred, cat in cases.items():
        assert v.categorize(ARCTIC, pred) == cat, pred
    assert v.categorize(TOY, "red triangle") == "less_specific"
    assert v.categorize(TOY, "triangle") == "generic" and v.categorize(TOY, "shape") == "generic"
    assert v.categorize(TOY, "striped blue triangle") == "wrong"
    # parents looked up in the table when a record carries none
    assert v.categorize({"label": "Arctic Tern", "dataset": "cub"}, "Sterna") == "less_specific"


# -----------------------------------------------------------------------------
# Specificity: LLM verifier

class FakeJudge:
    """Counts prompts; replies from a function of the prompt."""

    def __init__(self, reply):
        self.reply, self.prompts, self.calls = reply, [], 0

    def __call__(self, prompts):
        self.calls += 1
        self.prompts.extend(prompts)
        return [self.reply(p) for p in prompts]


def judge_by_prediction(prompt):
    pred = prompt.split("Prediction: ")[1].split("\n")[0]
    return {"Sterna": "less_specific", "seabird": " Generic.", "Arctic Tern (juvenile)": "more specific",
            "Gull": "wrong"}.get(pred, "I think it is specific")


def test_parse_category():
    assert R.parse_category("specific") == "specific" and R.parse_category(" Wrong.\n") == "wrong"
    assert R.parse_category("more specific") == "more_specific"
    assert R.parse_category("**less_specific**") == "less_specific"
    for bad in ["", "The answer is specific", "specific or generic", "spec", None, 3]:
        assert R.parse_category(bad) is None


def test_llm_verifier_prompt_and_sure_cases():
    judge = FakeJudge(judge_by_prediction)
    v = R.LLMVerifier(judge)
    pairs = [(ARCTIC, "Sterna"), (ARCTIC, "seabird"), (ARCTIC, "Arctic Tern (juvenile)"), (ARCTIC, "Gull"),
             (ARCTIC, "artic tern"), (ARCTIC, "None"), (ARCTIC, "Arctic Tern or Common Tern"),
             (ARCTIC, "Arctic Tern " * 100), (ARCTIC, ""), (ARCTIC, None)]
    assert v.verify(pairs) == ["less_specific", "generic", "more_specific", "wrong", "specific", "abstain",
                               "wrong", "wrong", None, None]
    assert judge.calls == 1 and v.asked == 4 and v.failures == 0   # one batch, sure cases not asked
    p = judge.prompts[0]
    assert "Ground truth: Arctic Tern" in p and "Sterna paradisaea" in p and "Prediction: Sterna" in p
    assert all(c in p for c in R.CATEGORIES)


def test_llm_verifier_cache_persists(tmp_path):
    path = tmp_path / "verdicts.sqlite"
    pairs = [(ARCTIC, "Sterna"), (ARCTIC, "sterna"), (COMMON, "Sterna"), (ARCTIC, "Gull")]
    judge = FakeJudge(judge_by_prediction)
    first = R.LLMVerifier(judge, cache_path=path)
    out = first.verify(pairs)
    assert out == ["less_specific", "less_specific", "less_specific", "wrong"]
    assert judge.calls == 1 and len(judge.prompts) == 3   # "Sterna" and "sterna" are one key
    assert first.verify(pairs) == out and judge.calls == 1   # same instance: in memory
    first.close()
    judge2 = FakeJudge(lambda p: pytest.fail("a cached pair was asked again"))
    second = R.LLMVerifier(judge2, cache_path=path)
    assert second.verify(pairs) == out
    assert judge2.calls == 0 and second.asked == 0 and second.cache_hits == 4
    second.close()


@pytest.mark.parametrize("make_judge", [
    lambda: FakeJudge(lambda p: "hmm, hard to say"),                 # garbage reply
    lambda: FakeJudge(lambda p: ""),                                  # empty reply
    lambda: FakeJudge(lambda p: 1 / 0),                               # raises
    lambda: (lambda prompts: ["specific"]),                           # wrong number of replies
])
def test_llm_verifier_failure_is_neutral(make_judge, tmp_path):
    path = tmp_path / "c.sqlite"
    v = R.LLMVerifier(make_judge(), cache_path=path)
    assert v.verify([(ARCTIC, "Sterna"), (ARCTIC, "Gull"), (ARCTIC, "Arctic Tern")]) == [None, None,
                                                                                         "specific"]
    assert v.failures == 2
    v.close()
    # failures are not cached: a later run with a working judge asks again
    judge = FakeJudge(judge_by_prediction)
    again = R.LLMVerifier(judge, cache_path=path)
    assert again.verify([(ARCTIC, "Sterna")]) == ["less_specific"] and judge.calls == 1


def test_llm_verifier_fallback():
    v = R.LLMVerifier(FakeJudge(lambda p: "?"), fallback=R.TaxonomyVerifier([ARCTIC]))
    assert v.verify([(ARCTIC, "Sterna"), (ARCTIC, "Gull")]) == ["less_specific", "wrong"]
    assert v.failures == 2


# -----------------------------------------------------------------------------
# rewards from categories

MS, S, LS, G, AB, W, U = (R.MORE_SPECIFIC, R.SPECIFIC, R.LESS_SPECIFIC, R.GENERIC, R.ABSTAIN, R.WRONG,
                          R.UNJUDGED)


def test_dynamic_rewards_groups():
    dyn = R.dynamic_rewards
    assert dyn([W, W, W], [0, 0, 0]) == [0.0, 0.0, 0.0]                           # all wrong
    assert dyn([LS, G, W, LS], [0] * 4) == [1.0, 0.0, 0.0, 1.0]                   # best = less_specific
    assert dyn([MS, S, LS, G], [0] * 4) == [1.0, 1.0, 0.0, 0.0]                   # more_specific = specific
    assert dyn([MS, LS], [0, 0]) == [1.0, 0.0]
    assert dyn([AB, W, AB], [0] * 3) == [1.0, 0.0, 1.0]                           # abstaining beats wrong
    assert dyn([G, None, W], [0] * 3) == [1.0, -1.0, 0.0]                         # parse failure
    assert dyn([None, None], [0, 0]) == [-1.0, -1.0]
    assert dyn([None, W], [0, 0]) == [-1.0, 0.0]
    # groups are independent and need not be contiguous
    assert dyn([S, G, G, W, S, LS], [0, 1, 1, 2, 0, 2]) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    # unjudged: neutral 0, and it does not set the bar for the group
    assert dyn([U, LS, G], [0] * 3) == [0.0, 1.0, 0.0]
    assert dyn([U, U], [0, 0]) == [0.0, 0.0]
    assert dyn([U, W, None], [0] * 3) == [0.0, 0.0, -1.0]


def test_static_rewards():
    cats = [MS, S, LS, G, AB, W, None, U]
    assert R.static_rewards(cats, "binary") == [1, 1, 0, 0, 0, 0, -1, 0]
    assert R.static_rewards(cats, "scale1") == [1, 1, 0.75, 0.5, 0.25, 0, -1, 0]
    assert R.static_rewards(cats, "scale2") == [1, 1, 0.75, 0.5, 0, 0, -1, 0]
    assert R.static_rewards(cats, "scale3") == [1, 1, 0.75, 0, 0, 0, -1, 0]
    assert R.static_rewards([G], {c: 7.0 for c in R.CATEGORIES}) == [7.0]


def test_open_world_metrics():
    m = R.open_world_metrics([S, MS, LS, G, W, AB, None, U])
    assert m["correctness"] == pytest.approx(4 / 7) and m["specificity"] == pytest.approx(2 / 4)
    assert m["hm"] == pytest.approx(2 * (4 / 7) * 0.5 / (4 / 7 + 0.5)) and m["unjudged"] == 1
    assert R.open_world_metrics([])["hm"] == 0.0


# -----------------------------------------------------------------------------
# composition and the --reward flag

def test_parse_reward():
    r = R.parse_reward("exact:0.9+format:0.1")
    assert r.terms == [("exact", 0.9), ("format", 0.1)] and r.spec == "exact:0.9+format:0.1"
    assert R.parse_reward(" mcq + format ").terms == [("mcq", 1.0), ("format", 1.0)]
    assert R.parse_reward("speciarl").needs_verifier and R.parse_reward("scale2").needs_verifier
    assert not R.parse_reward("mcq+format").needs_verifier
    for bad in ["", "inclusion", "exact:x", "exact+mcq", "format+format", "exact+speciarl"]:
        with pytest.raises(ValueError):
            R.parse_reward(bad)
    for term in R.TERMS:
        assert term in R.REWARD_HELP


def test_fine_r1_weights():
    completions = [C("Arctic Tern"), "<answer>Arctic Tern</answer>", C("Common Tern"), "nothing"]
    rewards, details = R.parse_reward("exact:0.9+format:0.1")(completions, [ARCTIC] * 4)
    assert rewards == pytest.approx([1.0, 0.9, 0.1, 0.0])
    d = details[0]
    assert d["answer"] == "Arctic Tern" and d["format"] == 1 and d["exact"] == 1.0 and d["correct"]
    assert "category" not in d and d["reward"] == pytest.approx(1.0)
    assert details[3]["answer"] is None


def test_speciarl_reward_end_to_end():
    v = R.TaxonomyVerifier(AIRCRAFT)
    completions = [C("Boeing 737"), C("Boeing"), C("737-700"), "no answer here",        # group 0
                   C("737-800"), C("Boeing 737"), C("..."), C("None")]               # group 1
    records, groups = [B738] * 8, [0, 0, 0, 0, 1, 1, 1, 1]
    reward = R.parse_reward("speciarl")
    with pytest.raises(ValueError, match="verifier"):
        reward(completions, records, groups)
    rewards, details = reward(completions, records, groups, verifier=v)
    assert rewards == [1.0, 0.0, 0.0, -1.0, 1.0, 0.0, -1.0, 0.0]
    assert [d["category"] for d in details] == ["less_specific", "generic", "wrong", None,
                                                "specific", "less_specific", None, "abstain"]
    assert [d["correct"] for d in details] == [False] * 4 + [True] + [False] * 3
    reward.verifier = v                                     # set once instead of per call
    assert reward(completions, records, groups)[0] == rewards
    static, _ = R.parse_reward("scale1")(completions, records, groups, verifier=v)
    assert static == [0.75, 0.5, 0.0, -1.0, 1.0, 0.75, -1.0, 0.25]
    summary = R.summarize(details)
    assert summary["accuracy"] == pytest.approx(1 / 8) and summary["cat/no_answer"] == pytest.approx(2 / 8)


def test_speciarl_with_failing_llm_verifier():
    v = R.LLMVerifier(FakeJudge(lambda p: 1 / 0))
    completions = [C("Sterna"), C("Gull"), C("Arctic Tern"), C("")]
    rewards, details = R.parse_reward("speciarl")(completions, [ARCTIC] * 4, [0] * 4, verifier=v)
    assert rewards == [0.0, 0.0, 1.0, -1.0]
    assert [d["category"] for d in details] == [R.UNJUDGED, R.UNJUDGED, "specific", None]
    assert v.failures == 2


def test_length_mismatch():
    with pytest.raises(ValueError):
        R.parse_reward("exact")([C("x")], [ARCTIC, ARCTIC])


def test_summarize():
    _, details = R.parse_reward("mcq+format")([C("B"), C("A")], [MCQ, MCQ])
    s = R.summarize(details)
    assert s == {"reward": 1.5, "accuracy": 0.5, "format": 1.0}


def test_import_is_light():
    code = "import sys, reward; assert 'torch' not in sys.modules and 'data' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=R.__file__.rsplit("/", 1)[0])
