"""Rewards for fine-grained recognition with RL, shared by every stage.

grpo.py trains on these rewards, evaluate.py scores with them and mine_topk.py normalises answers with
them, so "correct" has exactly one definition in the codebase: `is_correct`. Plain Python, no torch.
Every reward reads only the text inside the *first* <answer>...</answer> of a completion.

- format     1 if the completion is <think>...</think> <answer>...</answer> and nothing else (whitespace
             around the tags allowed, exactly one of each tag), else 0.
- exact      1 if normalize(answer) equals the normalised label or one of its aliases. A hedge ("A or
             B"), a list of classes or an empty answer never equals a name, so it scores 0. Substring
             containment (Visual-RFT's reward) is hackable: here it is only a metric, `text_inclusion`.
- mcq        1 if the answer names exactly the ground-truth option: its letter ("B", "(B)", "B.", "B)",
             "B) name" where name is that option's own text) or its exact text (DiVE-k).
- speciarl   SpeciaRL's best-in-group reward over specificity categories (see `dynamic_rewards`).
- binary, scale1, scale2, scale3    SpeciaRL's static graded tables (see `STATIC_TABLES`).

A reward is a weighted sum of terms, named on the command line with `parse_reward`: "mcq+format" is
DiVE-k's 0/1/2 sum, "exact:0.9+format:0.1" Fine-R1, "speciarl" SpeciaRL (no format term: an answer
that cannot be parsed already gets -1).
"""
import math
import re
import sqlite3
import string
import unicodedata

# -----------------------------------------------------------------------------
# Answer extraction and the format check

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)


def extract_answer(text):
    """Stripped text of the first complete <answer>...</answer> block, or None when there is none."""
    m = ANSWER_RE.search(text or "")
    return m.group(1).strip() if m else None


def format_ok(text):
    """True if `text` is exactly <think>...</think> ws <answer>...</answer>, one of each tag."""
    text = text or ""
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    return FORMAT_RE.fullmatch(text) is not None


# -----------------------------------------------------------------------------
# Names: normalisation and matching

ARTICLES = ("a", "an", "the")


def normalize(name):
    """The one normalisation of class names and answers (docs/methods.md §2).

    NFKC (full-width 'Ｔｅｒｎ' becomes 'tern'), lower case, possessive 's dropped ("Brewer's" ->
    "brewer", matching CUB's "Brewer_Blackbird"), dashes and underscores to spaces, other punctuation
    (Unicode P* and ASCII symbols like '<', '+') deleted ("F/A-18" -> "fa 18"), spaces collapsed, a
    leading article dropped. Letters of other scripts are kept as they are: a Cyrillic 'а' is not a
    Latin 'a', so a look-alike never merges two names.
    """
    s = unicodedata.normalize("NFKC", str(name or "")).lower()
    s = re.sub(r"(?<=\w)['\u2019]s\b", "", s)
    chars = []
    for ch in s:
        cat = unicodedata.category(ch)
        if cat in ("Pd", "Pc"):          # '-', '_' and the other dashes separate words
            chars.append(" ")
        elif not (cat.startswith("P") or ch in string.punctuation):  # other punctuation is deleted
            chars.append(ch)
    words = "".join(chars).split()
    if len(words) > 1 and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(words)


def label_of(entry):
    """Canonical name of a record ("label") or of a class-table entry ("name")."""
    return entry["label"] if "label" in entry else entry["name"]


def names_of(record):
    """Normalised label and aliases of a record (or class entry): the names that count as correct."""
    names = {normalize(label_of(record))} | {normalize(a) for a in record.get("aliases") or ()}
    names.discard("")
    return names


def is_correct(answer, record):
    """Exact match after normalisation against the label or an alias. Empty answers are never correct."""
    return answer is not None and normalize(answer) in names_of(record)


def text_inclusion(answer, record):
    """Metric only (Visual-RFT / Fine-R1 tables): some normalised name is a substring of the answer.
    'Tern or Gull' and a list of every class score here, which is why this is never a training reward."""
    text = normalize(answer) if answer is not None else ""
    return bool(text) and any(name in text for name in names_of(record))


HEDGE_RE = re.compile(r"\b(or|either|and/or|vs|versus|maybe|possibly|perhaps|probably)\b"
                      r"|[,;&]|\w{2,}\s*/\s*\w{2,}", re.I)


def is_hedge(answer):
    """True if a free-text answer offers several options or hedges ("A or B", "A/B", "A, B", "maybe A").
    Single-letter slashes are allowed because real names have them ("F/A-18", "F-16A/B"); callers check
    for an exact name first, so a class literally named "X or Y" is still matched."""
    return HEDGE_RE.search(answer or "") is not None


class ClassMatcher:
    """Maps a free-text answer to the one class it names exactly (after normalize, aliases included).

    Built from class dicts ({"name", "aliases"} or records with "label"), (name, aliases) pairs or plain
    names. A normalised string shared by two different classes is ambiguous and matches neither.
    mine_topk.py uses it to count valid answers."""

    def __init__(self, classes):
        self.names, self.index, self.ambiguous = [], {}, set()
        for entry in classes:
            if isinstance(entry, str):
                name, aliases = entry, ()
            elif isinstance(entry, dict):
                name, aliases = label_of(entry), entry.get("aliases") or ()
            else:
                name, aliases = entry
            if name not in self.names:
                self.names.append(name)
            for key in {normalize(name)} | {normalize(a) for a in aliases}:
                if not key or key in self.ambiguous:
                    continue
                if self.index.get(key, name) != name:
                    self.ambiguous.add(key)
                    del self.index[key]
                else:
                    self.index[key] = name

    def match(self, answer):
        return None if answer is None else self.index.get(normalize(answer))

    __call__ = match

    def __len__(self):
        return len(self.names)


# -----------------------------------------------------------------------------
# MCQ

LETTERS = string.ascii_uppercase  # same lettering as data/prompts.py: "A. name", "B. name", ...
LETTER_RE = re.compile(r"""(?:\(\s*(?P<p>[A-Z])\s*\)      # (B)
                            | \[\s*(?P<b>[A-Z])\s*\]      # [B]
                            | (?P<d>[A-Z])\s*[.):]        # B.  B)  B:
                            | (?P<w>[A-Z])(?=\s|$))       # B alone, or followed by a space
                           \s*(?P<rest>.*)""", re.X | re.S)


def mcq_choice(answer, options):
    """Index of the single option the answer names, or None (no answer, ambiguous, or none named).

    Either the option's exact text (normalised), or a letter form: "B", "(B)", "[B]", "B.", "B)", "B:",
    optionally followed by text that must then be option B's own text ("B) Arctic Tern"). Only upper-case
    letters count, so an answer starting with the article "a" is not read as option A. "B or C", "B/C",
    "A, B, C" and "B. <text of option C>" all give None."""
    if answer is None:
        return None
    answer = unicodedata.normalize("NFKC", answer).strip()
    norm = normalize(answer)
    hits = [i for i, option in enumerate(options) if normalize(option) == norm] if norm else []
    if hits:
        return hits[0] if len(hits) == 1 else None
    m = LETTER_RE.fullmatch(answer)
    if m is None:
        return None
    index = LETTERS.index(m["p"] or m["b"] or m["d"] or m["w"])
    if index >= len(options):
        return None
    if m["rest"].strip() and normalize(m["rest"]) != normalize(options[index]):
        return None
    return index


def mcq_target(record):
    """Index of an MCQ record's ground-truth option: its `answer` must be exactly one of the option letters,
    else ValueError (LETTERS.index would read "" and "AB" as option A and "BC" as option B)."""
    letters = LETTERS[:len(record.get("options") or ())]
    answer = record.get("answer")
    if not (isinstance(answer, str) and len(answer) == 1 and answer in letters):
        raise ValueError(f"answer {answer!r} is not one of the option letters {letters}")
    return letters.index(answer)


def mcq_correct(answer, record):
    """True if the answer picks the record's target option (record["answer"] is its letter; a record
    whose answer is not one option's letter raises ValueError, see `mcq_target`)."""
    target = mcq_target(record)
    return mcq_choice(answer, record["options"]) == target


# -----------------------------------------------------------------------------
# Specificity categories (SpeciaRL) and the two verifiers

MORE_SPECIFIC, SPECIFIC, LESS_SPECIFIC = "more_specific", "specific", "less_specific"
GENERIC, ABSTAIN, WRONG = "generic", "abstain", "wrong"
CATEGORIES = (MORE_SPECIFIC, SPECIFIC, LESS_SPECIFIC, GENERIC, ABSTAIN, WRONG)
RANK = {MORE_SPECIFIC: 1, SPECIFIC: 1, LESS_SPECIFIC: 2, GENERIC: 3, ABSTAIN: 4, WRONG: 5}
UNJUDGED = "unjudged"  # the verifier could not judge an answered item: neutral reward 0
ABSTAIN_WORDS = {"none", "na", "no answer", "unknown", "abstain", "i dont know", "not sure", "cannot tell"}
# broad words for a domain noun (the noun comes from the class table or from data/prompts.py)
GENERIC_WORDS = {
    "bird": {"bird", "birds", "animal"},
    "aircraft": {"aircraft", "airplane", "aeroplane", "plane", "airliner", "jet"},
    "car": {"car", "vehicle", "automobile"},
    "flower": {"flower", "plant"},
    "pet": {"pet", "animal"},
    "dish": {"dish", "food", "meal"},
    "shape": {"shape"},
}


def obvious_category(record, prediction):
    """The cases no verifier has to think about, else None: the label or an alias is specific, a
    "None"-like word abstains, a hedge is wrong (checked after the names, so "F/A-18" is fine)."""
    pred = normalize(prediction or "")
    if pred in names_of(record):
        return SPECIFIC
    if pred in ABSTAIN_WORDS:
        return ABSTAIN
    if is_hedge(prediction):
        return WRONG
    return None


def _domain_noun(dataset):
    try:
        from data.prompts import domain  # lazy: keeps `import reward` free of the data package
    except ImportError:
        return None
    return domain(dataset)[0]


def _parent_levels(parents):
    """One set of accepted normalised names per level, broadest first. A level also matches with its
    broader parent's name added or removed as a prefix: "Boeing 737" <-> "737" under "Boeing"."""
    levels = []
    for i, parent in enumerate(parents):
        names = {normalize(parent)}
        if i > 0:
            up, this = normalize(parents[i - 1]), normalize(parent)
            names.add(this[len(up) + 1:] if this.startswith(up + " ") else f"{up} {this}")
        names.discard("")
        levels.append(names)
    return levels


class TaxonomyVerifier:
    """Offline, deterministic verifier from the label hierarchy and aliases.

    `classes`: a classes.json table ({"domain", "classes": [{"name", "aliases", "parents"}]}) or a list
    of class dicts or records. For a record and a prediction, in this order:
      label or alias -> specific; "None"-like word -> abstain; hedge -> wrong;
      a class whose parents include the label -> more_specific; the closest parent -> less_specific;
      a broader parent or the domain noun ("bird", "airplane", ...) -> generic; anything else -> wrong.
    An empty prediction gives None: the caller treats it as a parse failure."""

    def __init__(self, classes, domain_words=()):
        self.domain = None
        if isinstance(classes, dict):
            self.domain, classes = classes.get("domain"), classes["classes"]
        self.by_name, self.parents_of = {}, {}  # normalised name -> [class parents]; label -> parents
        for entry in classes:
            label, parents = normalize(label_of(entry)), list(entry.get("parents") or ())
            if label in self.parents_of:
                continue
            self.parents_of[label] = parents
            for name in names_of(entry):
                self.by_name.setdefault(name, []).append(parents)
        self.domain_words = {normalize(w) for w in domain_words}

    def generic_words(self, record):
        noun = self.domain or _domain_noun(record.get("dataset", ""))
        return self.domain_words | GENERIC_WORDS.get(noun, set()) | ({normalize(noun)} if noun else set())

    def categorize(self, record, prediction):
        pred = normalize(prediction or "")
        if not pred:
            return None
        names, obvious = names_of(record), obvious_category(record, prediction)
        if obvious is not None:
            return obvious
        if any(normalize(p) in names for parents in self.by_name.get(pred, ()) for p in parents):
            return MORE_SPECIFIC
        parents = record.get("parents") or self.parents_of.get(normalize(label_of(record)), [])
        levels = _parent_levels(parents)
        if levels and pred in levels[-1]:
            return LESS_SPECIFIC
        if any(pred in level for level in levels[:-1]) or pred in self.generic_words(record):
            return GENERIC
        return WRONG

    def verify(self, pairs):
        """Batch form: [(record, prediction)] -> [category or None]."""
        return [self.categorize(record, prediction) for record, prediction in pairs]


VERIFIER_PROMPT = """You judge the answer of an image classifier against the ground truth.
Ground truth: {label}{aliases}
Prediction: {prediction}
Reply with exactly one of these labels and nothing else:
more_specific - the prediction is a sub-type of the ground truth
specific - the prediction is the ground truth or a synonym (common or scientific name)
less_specific - the prediction is a close parent of the ground truth (genus, family, product line)
generic - the prediction is a broad category containing the ground truth (e.g. "bird", "airplane")
abstain - the prediction declines to answer (e.g. "None")
wrong - the prediction is incorrect, or hedges between several options
Label:"""
MAX_VERIFIED_WORDS = 16  # longer "answers" are essays, judged wrong without asking the judge


def parse_category(text):
    """A judge's reply -> one of CATEGORIES, or None. Strict: the reply must be the label alone
    (surrounding whitespace, quotes, '*' and a final '.' tolerated, "more specific" = more_specific)."""
    if not isinstance(text, str):
        return None
    label = text.strip().strip("`'\"*.").strip().lower().replace("-", "_").replace(" ", "_")
    return label if label in CATEGORIES else None


class LLMVerifier:
    """Specificity from a local instruction-tuned text model, with an on-disk cache.

    generate_fn(list of prompts) -> list of replies; run it at temperature 0 (the lead passes vlm.py's
    sampler; tests pass fakes). Verdicts are cached in SQLite keyed by (normalised label, normalised
    prediction), so a pair is judged once across runs; failures are not cached, so a later run retries.
    Cheap sure cases never reach the model: a label/alias is specific, "None" abstains, a hedge or an
    answer over MAX_VERIFIED_WORDS words is wrong (a judge can be talked round by an essay).
    If the generator raises or replies with anything but one label, the item's category is the
    `fallback` verifier's (if given) or None (neutral), and `failures` counts it. Never raises."""

    def __init__(self, generate_fn, cache_path=None, fallback=None):
        self.generate_fn, self.fallback = generate_fn, fallback
        self.failures = self.asked = self.cache_hits = 0
        self.memo = {}
        self.db = None
        if cache_path:
            # timeout: several ranks may share one cache file; SQLite serialises their writes
            self.db = sqlite3.connect(str(cache_path), timeout=60)
            self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (truth TEXT, prediction TEXT, "
                            "category TEXT, PRIMARY KEY (truth, prediction))")
            self.db.commit()

    def _cached(self, key):
        if key not in self.memo and self.db is not None:
            row = self.db.execute("SELECT category FROM verdicts WHERE truth = ? AND prediction = ?",
                                  key).fetchone()
            if row is not None:
                self.memo[key] = row[0]
        return self.memo.get(key)

    def verify(self, pairs):
        """[(record, prediction)] -> [category or None]; the model sees each unknown pair once."""
        out, todo = [None] * len(pairs), {}  # key -> indices of the items waiting for it
        for i, (record, prediction) in enumerate(pairs):
            if not normalize(prediction or ""):
                continue  # no answer: a parse failure, the caller's business
            out[i] = obvious_category(record, prediction)
            if out[i] is None and len(normalize(prediction).split()) > MAX_VERIFIED_WORDS:
                out[i] = WRONG
            if out[i] is None:
                key = (normalize(label_of(record)), normalize(prediction))
                out[i] = self._cached(key)
                if out[i] is not None:
                    self.cache_hits += 1
                else:
                    todo.setdefault(key, []).append(i)
        if not todo:
            return out
        keys = list(todo)
        prompts = [self.prompt(*pairs[todo[key][0]]) for key in keys]
        self.asked += len(prompts)
        try:
            replies = list(self.generate_fn(prompts))
            if len(replies) != len(prompts):
                raise ValueError(f"{len(replies)} replies for {len(prompts)} prompts")
        except Exception:  # a broken judge must never stop training: neutral reward, counted
            replies = [None] * len(prompts)
        for key, reply in zip(keys, replies):
            category = parse_category(reply)
            if category is None:
                self.failures += len(todo[key])
                if self.fallback is not None:
                    category = self.fallback.verify([pairs[todo[key][0]]])[0]
            else:
                self.memo[key] = category
                if self.db is not None:
                    self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?)", (*key, category))
            for i in todo[key]:
                out[i] = category
        if self.db is not None:
            self.db.commit()
        return out

    @staticmethod
    def prompt(record, prediction):
        aliases = [a for a in record.get("aliases") or () if normalize(a) != normalize(label_of(record))]
        also = f" (also called: {', '.join(aliases)})" if aliases else ""
        return VERIFIER_PROMPT.format(label=label_of(record), aliases=also, prediction=prediction.strip())

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None


def specificity_categories(answers, records, verifier):
    """Category per answer: None when there is no answer (parse failure), UNJUDGED when the verifier
    could not judge it, else one of CATEGORIES. Answered items go to the verifier as one batch."""
    answered = [i for i, a in enumerate(answers) if a is not None and normalize(a)]
    verdicts = verifier.verify([(records[i], answers[i]) for i in answered]) if answered else []
    out = [None] * len(answers)
    for i, category in zip(answered, verdicts):
        out[i] = category if category in CATEGORIES else UNJUDGED
    return out


# -----------------------------------------------------------------------------
# Rewards from categories

PARSE_FAILURE_REWARD = -1.0
# values for more_specific / specific / less_specific / generic / abstain / wrong
STATIC_TABLES = {
    "binary": dict(zip(CATEGORIES, (1.0, 1.0, 0.0, 0.0, 0.0, 0.0))),
    "scale1": dict(zip(CATEGORIES, (1.0, 1.0, 0.75, 0.5, 0.25, 0.0))),
    "scale2": dict(zip(CATEGORIES, (1.0, 1.0, 0.75, 0.5, 0.0, 0.0))),
    "scale3": dict(zip(CATEGORIES, (1.0, 1.0, 0.75, 0.0, 0.0, 0.0))),
}


def static_rewards(categories, table):
    """Graded reward from a table (name or dict); None (no answer) -> -1, UNJUDGED -> 0."""
    table = STATIC_TABLES[table] if isinstance(table, str) else table
    return [PARSE_FAILURE_REWARD if c is None else 0.0 if c == UNJUDGED else table[c] for c in categories]


def dynamic_rewards(categories, group_ids):
    """SpeciaRL's best-in-group reward. With rank(more_specific) = rank(specific) = 1 < less_specific 2
    < generic 3 < abstain 4 < wrong 5 and best_g = min rank of the judged rollouts of group g:

        R_i = -1                                    if rollout i has no parsable answer (category None)
        R_i = 0                                     if the verifier could not judge it (UNJUDGED)
        R_i = 1 if rank_i == best_g < 5 else 0      otherwise

    Unjudged rollouts neither earn nor set the bar: a flaky judge must not decide who wins a group."""
    best = {}
    for c, g in zip(categories, group_ids):
        if c in RANK:
            best[g] = min(best.get(g, RANK[WRONG]), RANK[c])
    return [PARSE_FAILURE_REWARD if c is None else 0.0 if c == UNJUDGED else float(RANK[c] == best[g] < RANK[WRONG])
            for c, g in zip(categories, group_ids)]


def open_world_metrics(categories):
    """evaluate.py's open-world scores. Correctness = share of items neither wrong nor abstaining (a
    missing answer counts as not correct); Specificity = share of the correct ones that are specific or
    more specific; HM of the two. Unjudged items are left out of both."""
    judged = [c for c in categories if c != UNJUDGED]
    correct = [c for c in judged if c in (MORE_SPECIFIC, SPECIFIC, LESS_SPECIFIC, GENERIC)]
    corr = len(correct) / len(judged) if judged else 0.0
    spec = sum(c in (MORE_SPECIFIC, SPECIFIC) for c in correct) / len(correct) if correct else 0.0
    hm = 2 * corr * spec / (corr + spec) if corr + spec else 0.0
    return {"correctness": corr, "specificity": spec, "hm": hm, "unjudged": len(categories) - len(judged)}


# -----------------------------------------------------------------------------
# Composition and the --reward flag

ACCURACY_TERMS = ("exact", "mcq")
SPECIFICITY_TERMS = ("speciarl",) + tuple(STATIC_TABLES)
TERMS = ACCURACY_TERMS + SPECIFICITY_TERMS + ("format",)
REWARD_HELP = ("reward terms joined by '+', each with an optional ':weight' (default 1). Terms: exact "
               "(normalised exact match with label/aliases), mcq (option letter or text), format "
               "(<think></think><answer></answer>), speciarl (best-in-group specificity), binary, scale1, "
               "scale2, scale3 (static specificity tables). E.g. 'mcq+format' (DiVE-k), "
               "'exact:0.9+format:0.1' (Fine-R1), 'speciarl' (SpeciaRL), 'exact+format' (baseline).")


class Reward:
    """total_i = sum over terms of weight * term_i. Call it on a batch:

        rewards, details = reward(completions, records, group_ids, verifier=None)

    Specificity terms need a verifier, passed here or set once as `reward.verifier`; there is no
    default built from the batch, because a hierarchy built from whichever records happen to be in a
    batch would make the same answer score differently from batch to batch."""

    def __init__(self, terms, verifier=None):
        self.terms = [(name, float(weight)) for name, weight in terms]
        names = [name for name, _ in self.terms]
        unknown = [n for n in names if n not in TERMS]
        if unknown:
            raise ValueError(f"unknown reward term(s) {unknown}; {REWARD_HELP}")
        if len(set(names)) != len(names):
            raise ValueError(f"a reward term appears twice in {names}")
        if len([n for n in names if n != "format"]) > 1:
            raise ValueError(f"at most one accuracy term (exact, mcq or a specificity one): {names}")
        if not names:
            raise ValueError("empty reward")
        self.verifier = verifier

    @property
    def needs_verifier(self):
        return any(name in SPECIFICITY_TERMS for name, _ in self.terms)

    @property
    def record_fields(self):
        """The fields every scored record must carry besides its label: the mcq term's options and answer."""
        return ("options", "answer") if any(name == "mcq" for name, _ in self.terms) else ()

    @property
    def spec(self):
        return "+".join(f"{name}:{weight:g}" for name, weight in self.terms)

    def __repr__(self):
        return f"Reward({self.spec!r})"

    def __call__(self, completions, records, group_ids=None, verifier=None):
        """-> (rewards, details). details[i]: answer, format (0/1), correct, category (specificity terms
        only), inclusion (metric), reward, and each term's unweighted value under the term's name."""
        n = len(completions)
        if len(records) != n or (group_ids is not None and len(group_ids) != n):
            raise ValueError("completions, records and group_ids must have the same length")
        group_ids = list(range(n)) if group_ids is None else list(group_ids)
        answers = [extract_answer(c) for c in completions]
        formats = [int(format_ok(c)) for c in completions]
        categories = None
        if self.needs_verifier:
            verifier = verifier or self.verifier
            if verifier is None:
                raise ValueError(f"reward {self.spec!r} needs a verifier: pass verifier=TaxonomyVerifier"
                                 "(classes) (or an LLMVerifier), or set reward.verifier")
            categories = specificity_categories(answers, records, verifier)
        values = {}
        for name, _ in self.terms:
            if name == "format":
                values[name] = [float(f) for f in formats]
            elif name == "exact":
                values[name] = [float(is_correct(a, r)) for a, r in zip(answers, records)]
            elif name == "mcq":
                values[name] = [float(mcq_correct(a, r)) for a, r in zip(answers, records)]
            elif name == "speciarl":
                values[name] = dynamic_rewards(categories, group_ids)
            else:
                values[name] = static_rewards(categories, name)
        rewards, details = [], []
        for i, (answer, record) in enumerate(zip(answers, records)):
            total = sum(weight * values[name][i] for name, weight in self.terms)
            if categories is not None:
                correct = categories[i] in (SPECIFIC, MORE_SPECIFIC)
            elif "mcq" in values or ("exact" not in values and "options" in record):
                correct = mcq_correct(answer, record)
            else:
                correct = is_correct(answer, record)
            detail = {"answer": answer, "format": formats[i], "correct": bool(correct),
                      "inclusion": text_inclusion(answer, record), "reward": total}
            if categories is not None:
                detail["category"] = categories[i]
            detail.update({name: values[name][i] for name in values if name != "format"})
            rewards.append(total)
            details.append(detail)
        return rewards, details


def parse_reward(spec, verifier=None):
    """'mcq+format', 'exact:0.9+format:0.1', 'speciarl' -> Reward. Weights default to 1."""
    terms = []
    for part in str(spec).replace(" ", "").split("+"):
        name, _, weight = part.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = math.nan
        if not math.isfinite(w):
            raise ValueError(f"bad weight in reward term {part!r} (a finite number); {REWARD_HELP}")
        terms.append((name.lower(), w))
    return Reward(terms, verifier=verifier)


def summarize(details):
    """Batch means for logging: reward, accuracy, format rate, and the share of each category."""
    n = max(len(details), 1)
    out = {"reward": sum(d["reward"] for d in details) / n,
           "accuracy": sum(d["correct"] for d in details) / n,
           "format": sum(d["format"] for d in details) / n}
    if details and "category" in details[0]:
        for c in CATEGORIES + (UNJUDGED, None):
            out[f"cat/{c or 'no_answer'}"] = sum(d["category"] == c for d in details) / n
    return out
