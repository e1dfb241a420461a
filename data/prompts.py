"""The questions every stage asks, in one place.

SFT, top-k mining, GRPO and evaluation must ask the model the same way, or a model is trained on one
wording and tested on another. Each function returns the *user text* of a turn; the image and the chat
template are added by `vlm.py`.

All prompts ask for the answer format of the three papers: reasoning inside <think> </think>, then the
final answer inside <answer> </answer>.
"""

FORMAT = ("First think about the question inside <think> </think> tags, "
          "then give the final answer inside <answer> </answer> tags.")

# dataset -> (noun, attribute): "What is the {attribute} of the {noun} in this image?"
DOMAINS = {
    "cub": ("bird", "species"),
    "aircraft": ("aircraft", "variant"),
    "cars": ("car", "model"),
    "flowers": ("flower", "species"),
    "pets": ("pet", "breed"),
    "food": ("dish", "name"),
    "toy": ("shape", "name"),
}
DEFAULT_DOMAIN = ("object", "category")

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def domain(dataset):
    """(noun, attribute) for a dataset name; prefixes match too ("cub_taxonomy" -> cub)."""
    for key, value in DOMAINS.items():
        if dataset == key or str(dataset).startswith(key + "_"):
            return value
    return DEFAULT_DOMAIN


def open_question(dataset, class_names=None):
    """Open-ended question; with `class_names` the candidate names are listed (DiVE-k's mining prompt)."""
    noun, attribute = domain(dataset)
    text = f"What is the {attribute} of the {noun} in this image?"
    if class_names:
        text += " Choose one of: " + ", ".join(class_names) + "."
    return text + " " + FORMAT


def mcq_question(dataset, options):
    """Closed-world multiple-choice question; options are lettered A, B, C, ... in the given order."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"an MCQ needs 2..{len(LETTERS)} options, got {len(options)}")
    noun, attribute = domain(dataset)
    lines = [f"{LETTERS[i]}. {name}" for i, name in enumerate(options)]
    return (f"What is the {attribute} of the {noun} in this image? Options:\n" + "\n".join(lines)
            + "\nAnswer with the option's letter. " + FORMAT)


def open_world_question(dataset=None):
    """SpeciaRL's open-world prompt: no label list, abstaining is allowed."""
    return ("Classify the image. " + FORMAT
            + " The answer must be a single label, or the word 'None' to abstain.")


def question_for(record, mode, class_names=None):
    """The question for a record in a mode: 'open' (listing `class_names` when given), 'mcq', 'open_world',
    or 'record' (the record's own `question` field, as SFT files carry)."""
    dataset = record.get("dataset", "")
    if mode == "record":
        if "question" not in record:
            raise KeyError("record has no 'question' field")
        return record["question"]
    if mode == "open":
        return open_question(dataset, class_names)
    if mode == "mcq":
        return mcq_question(dataset, record["options"])
    if mode == "open_world":
        return open_world_question(dataset)
    raise ValueError(f"unknown prompt mode {mode!r}")
