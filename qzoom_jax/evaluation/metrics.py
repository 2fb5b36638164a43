"""Per-sample scores of the evaluation benchmarks and their per-task aggregation (training reference §6.1).

Every metric returns a score in [0, 1] for one prediction; a task's accuracy is 100 x the mean score (or the mean
of per-category means, HR-Bench's "Overall"). Each metric is written from its published definition, named in its
docstring; where the de-facto implementation differs from the text, the docstring says which one we follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

METRICS = ("vqa", "anls", "relaxed", "ocrbench", "option")

# ---- VQA soft accuracy (TextVQA) -------------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe; words that are also plain English words ("its", "well",
# "were", "shell", "ill", "wed", "id", "hell", "lets") are left alone.
_CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't", "hasn't",
        "haven't", "he'd", "he's", "how'd", "how'll", "how's", "i'm", "i've", "isn't", "it'd", "it'll",
        "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't", "o'clock", "oughtn't", "shan't",
        "she's", "should've", "shouldn't", "that'd", "that's", "there'd", "there's", "they'd", "they'll",
        "they're", "they've", "'twas", "wasn't", "we've", "weren't", "what'll", "what're", "what's", "what've",
        "when's", "where'd", "where's", "where've", "who'd", "who'll", "who's", "who've", "why'll", "why're",
        "why's", "won't", "would've", "wouldn't", "y'all", "you'd", "you'll", "you're", "you've",
    )
}  # fmt: skip
# The punctuation set of the official VQA evaluation; apostrophes, colons and periods are handled apart.
_VQA_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!]")


def normalize_vqa_answer(text: str) -> str:
    """The VQA answer normalisation (Antol et al. 2015, visualqa.org "Evaluation"), applied to predictions and
    human answers alike: lower case; commas between digits dropped (100,978 -> 100978); periods dropped unless a
    digit follows (decimals stay); other punctuation but apostrophes and colons -> space; number words -> digits;
    articles dropped; missing contraction apostrophes restored (dont -> don't)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"\.(?!\d)", "", text)
    text = _VQA_PUNCT.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy (Antol et al. 2015; TextVQA, Singh et al. 2019): min(1, #humans who gave the answer / 3),
    averaged over the len(answers) leave-one-out subsets of the human answers (10 choose 9 for TextVQA)."""
    pred = normalize_vqa_answer(prediction)
    matches = np.array([normalize_vqa_answer(a) == pred for a in answers])
    total = matches.sum()
    return float(np.mean([min(1.0, (total - m) / 3) for m in matches]))


# ---- ANLS (DocVQA, InfographicVQA) ------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (Biten et al. 2019, ST-VQA; the DocVQA and
    InfographicVQA metric): max over the answers of 1 - NL if NL < threshold else 0, NL = edit distance /
    max(length), after lower-casing and collapsing whitespace."""
    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    pred, best = norm(prediction), 0.0
    for answer in map(norm, answers):
        longest = max(len(pred), len(answer))
        nl = levenshtein(pred, answer) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# ---- Relaxed accuracy (ChartQA) ---------------------------------------------------------------------------

def _relaxed_float(text: str) -> float | None:
    text = text.strip()
    percent = text.endswith("%")
    try:
        value = float(text[:-1] if percent else text)
    except ValueError:
        return None
    return value / 100 if percent else value


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """Relaxed accuracy (Methani et al. 2020, PlotQA; used by ChartQA, Masry et al. 2022): a numeric answer is
    right within `tolerance` relative error, any other answer needs an exact (case-insensitive) match.

    Numbers are read as ChartQA's common evaluation (Pix2Struct) reads them: a trailing "%" divides by 100, so
    "45%" equals "0.45" but not "45"; thousands separators are not numbers. One fix: a target of 0 needs a
    prediction of exactly 0 (the relative error is undefined; Pix2Struct falls back to comparing strings, which
    rejects "0.0" for "0"). Max over `answers`.
    """
    best = 0.0
    for answer in answers:
        pred, target = _relaxed_float(prediction), _relaxed_float(answer)
        if pred is not None and target is not None:
            ok = pred == 0 if target == 0 else abs(pred - target) / abs(target) <= tolerance
        else:
            ok = prediction.strip().lower() == answer.strip().lower()
        best = max(best, float(ok))
    return best


# ---- OCRBench ---------------------------------------------------------------------------------------------

OCRBENCH_HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_match(prediction: str, answers: Sequence[str], category: str = "") -> float:
    """OCRBench (Liu et al. 2023) accuracy: 1 if any answer occurs in the prediction as a substring, compared
    case-insensitively with newlines as spaces; for handwritten mathematical expressions (category
    OCRBENCH_HME) all whitespace is removed and case kept."""
    def norm(s: str) -> str:
        s = s.strip().replace("\n", " ")
        return "".join(s.split()) if category == OCRBENCH_HME else s.lower()

    pred = norm(prediction)
    return float(any(norm(a) in pred for a in answers))


# ---- Multiple choice (V*, MME-RealWorld-Lite, HR-Bench) -----------------------------------------------------

_LEADING_LETTER = re.compile(r"^(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?:[.:)]|$))")
_ANSWER_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*[(\[]?([A-Z])\b")


def option_letters(num_options: int) -> tuple[str, ...]:
    return tuple(chr(ord("A") + i) for i in range(num_options))


def extract_option_letter(response: str, options: Sequence[str]) -> str | None:
    """The option a free-form reply picks, or None. Rules in order (the first that gives a valid letter wins):
    the reply is one letter, any case ("b", "(B)", "B."); it starts with a letter ("(B) cat", "B) cat", "B: cat");
    a phrase ("The answer is C", "Option: (D)"); it names exactly one option's text ("cat", "A cat."); exactly
    one distinct option letter stands alone in it. A bare "A" before a word ("A cat") is read as an article, not
    a letter, until the last rule."""
    letters = option_letters(len(options))
    text = response.strip()
    single = re.fullmatch(r"[(\[]?([A-Za-z])[)\].:]?", text)
    if single and single.group(1).upper() in letters:
        return single.group(1).upper()
    lead = _LEADING_LETTER.match(text)
    if lead and (letter := next(g for g in lead.groups() if g)) in letters:
        return letter
    phrase = _ANSWER_PHRASE.search(text)
    if phrase and phrase.group(1) in letters:
        return phrase.group(1)
    lowered = text.lower()
    named = [letter for letter, option in zip(letters, options)
             if option.strip() and re.search(rf"(?<!\w){re.escape(option.strip().lower())}(?!\w)", lowered)]
    if len(named) == 1:
        return named[0]
    alone = {m for m in re.findall(r"(?<![\w'])([A-Z])(?![\w'])", text) if m in letters}
    return alone.pop() if len(alone) == 1 else None


def option_accuracy(prediction: str, answer: str, options: Sequence[str]) -> float:
    """Multiple-choice accuracy: 1 if the option extracted from the reply (`extract_option_letter`, a rule-based
    match as in V*, MME-RealWorld and HR-Bench, without their GPT fallback) is the answer letter."""
    return float(extract_option_letter(prediction, options) == answer)


# ---- dispatch and aggregation -------------------------------------------------------------------------------

def score(metric: str, prediction: str, answers: Sequence[str], options: Sequence[str] = (),
          category: str = "") -> float:
    """The score in [0, 1] of one prediction under the task's `metric` (one of METRICS)."""
    if metric == "vqa":
        return vqa_soft_accuracy(prediction, answers)
    if metric == "anls":
        return anls(prediction, answers)
    if metric == "relaxed":
        return relaxed_accuracy(prediction, answers)
    if metric == "ocrbench":
        return ocrbench_match(prediction, answers, category)
    if metric == "option":
        return option_accuracy(prediction, answers[0], options)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def category_accuracy(scores: Sequence[float], categories: Sequence[str]) -> dict[str, float]:
    """{category: 100 x mean score} over the samples that carry a category."""
    by_cat: dict[str, list[float]] = {}
    for s, c in zip(scores, categories):
        if c:
            by_cat.setdefault(c, []).append(s)
    return {c: 100.0 * float(np.mean(v)) for c, v in sorted(by_cat.items())}


def task_accuracy(scores: Sequence[float], categories: Sequence[str], aggregate: str = "mean") -> float | None:
    """A task's accuracy in percent: "mean" = 100 x mean score; "category_mean" = the unweighted mean of the
    per-category accuracies (HR-Bench's Overall = mean of FSP and FCP). None when there are no scores."""
    if not len(scores):
        return None
    if aggregate == "mean":
        return 100.0 * float(np.mean(scores))
    if aggregate == "category_mean":
        per_category = category_accuracy(scores, categories)
        if not per_category:
            raise ValueError("aggregate='category_mean' needs samples with a category")
        return float(np.mean(list(per_category.values())))
    raise ValueError(f"unknown aggregate {aggregate!r}; choose 'mean' or 'category_mean'")
