"""Per-sample scores and per-task aggregates of the evaluation benchmarks (section numbers (§) refer to
/work/shared/reference/lmms-eval-tasks.md, which describes upstream's lmms-eval fork).

Two rule sets (SCORINGS):

* "lmms" (default) reproduces the fork case for case, its quirks included, so that our tables compare with the
  published ones.
* "official" corrects what the reference names as the fork's deviations from the benchmarks' own evaluators:
  ANLS zeroes NL >= 0.5 and divides by the normalised lengths (§2.2); a ChartQA target of 0 needs a prediction
  equal to 0 (§2.3); OCRBench's handwritten maths keeps the case of both sides (§2.4); OCRBench averages over the
  docs scored rather than a fixed 1000 (§2.4). Every other rule is the same in both.

"exact" is ours (the procedural reading task has no lmms-eval counterpart): one rule, under both scorings.

`prediction` is always the post-processed reply (tasks.postprocess). A row is a benchmark JSONL row
(qzoom_jax/evaluation/benchmarks.py), plus the optional keys that some fork rules read: OCRBench ``dataset``,
HR-Bench ``cycle_category``.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from .tasks import get_task, option_letters
from .text_norm import collapse_whitespace, levenshtein, normalize_vqa_answer

__all__ = [
    "METRICS", "OCRBENCH_HME", "SCORINGS", "Judge", "ScoreDetail", "aggregate", "anls", "breakdown", "exact_match",
    "extract_option", "hrbench_option", "levenshtein", "mmerw_letter", "normalize_vqa_answer", "ocrbench_match",
    "option_letters", "relaxed_accuracy", "score", "score_detail", "vqa_soft_accuracy", "vstar_letter",
]

METRICS = ("vqa", "anls", "relaxed", "ocrbench", "option", "exact")
SCORINGS = ("lmms", "official")


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {SCORINGS}")


# ---- TextVQA (ref §2.1) ---------------------------------------------------------------------------------------

def vqa_soft_accuracy(prediction: str, answers: Sequence[str] | None) -> float:
    """Mean over the human answers i of min(1, #{j != i: answer_j == pred} / 3), everything normalised first;
    0 without answers. With 10 answers, k matches give 0, .3, .6, .9, 1 for k = 0, 1, 2, 3, >= 4."""
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(str(a)) == pred for a in answers]
    total = sum(hits)
    return float(statistics.mean(min(1.0, (total - hit) / 3) for hit in hits))


# ---- ANLS: DocVQA, InfoVQA (ref §2.2) ---------------------------------------------------------------------------

def anls(prediction: str, answers: Sequence[str], scoring: str = "lmms") -> float:
    """The best similarity 1 - NL over the answers, NL = edit distance of the lower-cased, whitespace-collapsed
    strings / their length. "lmms": the length is that of the RAW strings (.upper(), the answer unstripped) and
    a best score < 0.5 becomes 0 (exactly 0.5 is kept). "official": normalised lengths, NL >= 0.5 gives 0."""
    _check_scoring(scoring)
    pred, best = collapse_whitespace(prediction), 0.0
    for answer in answers:
        gold = collapse_whitespace(answer)
        if scoring == "lmms":
            longest = max(len(answer.upper()), len(prediction.upper()))
        else:
            longest = max(len(gold), len(pred))
        nl = levenshtein(gold, pred) / longest if longest else 0.0
        if scoring == "lmms" or nl < 0.5:
            best = max(best, 1.0 - nl)
    return best if best >= 0.5 else 0.0


# ---- relaxed accuracy: ChartQA (ref §2.3) ---------------------------------------------------------------------

def _chart_float(text: str) -> float | None:
    try:  # ref §2.3 step 1: Python float, so " 7 ", "1e3", "1_000", "nan" parse and "1,000", "$5" do not
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], scoring: str = "lmms") -> float:
    """1.0 if the prediction is within 5% relative error of a numeric target (a trailing "%" divides by 100, on
    either side alone), else if it equals the target case-insensitively (nothing stripped); max over `answers`.
    "lmms": a target of 0 always falls back to string equality ("0.0" != "0"). "official": it needs a numeric
    prediction equal to 0."""
    _check_scoring(scoring)
    pred = _chart_float(prediction)
    for answer in answers:
        target = _chart_float(answer)
        if pred is not None and target:
            ok = abs(pred - target) / abs(target) <= 0.05  # IEEE doubles: 2.09 vs 2.2 is 0.0500000000000001
        elif pred is not None and target == 0 and scoring == "official":
            ok = pred == 0
        else:
            ok = prediction.lower() == answer.lower()
        if ok:
            return 1.0
    return 0.0


# ---- OCRBench (ref §2.4) ----------------------------------------------------------------------------------------

OCRBENCH_HME = "Handwritten Mathematical Expression Recognition"  # the question type of the HME100k docs


def ocrbench_match(prediction: str, answers: Sequence[str], handwritten_math: bool = False,
                   scoring: str = "lmms") -> float:
    """1.0 if some answer occurs in the prediction as a substring. Text: both lower-cased and stripped, newlines
    as spaces, so inner spaces matter and an empty answer always matches. Handwritten maths: every space removed;
    "lmms" lower-cases the prediction only (an answer holding a capital never matches), "official" neither."""
    _check_scoring(scoring)
    pred = prediction.strip()
    if scoring == "lmms" or not handwritten_math:
        pred = pred.lower()
    if handwritten_math:
        pred = pred.replace("\n", " ").replace(" ", "")
        golds = [a.strip().replace("\n", " ").replace(" ", "") for a in answers]
    else:
        pred = pred.replace("\n", " ")
        golds = [a.lower().strip().replace("\n", " ") for a in answers]
    return float(any(gold in pred for gold in golds))


# ---- exact match: our reading task (no lmms-eval counterpart) -------------------------------------------------

def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals an answer, both stripped and lower-cased, else 0.0. No partial credit: the
    reading task's answers are 3-digit numbers and counts, where a near miss ("418", "4170") is a wrong read."""
    pred = prediction.strip().lower()
    return float(any(pred == str(answer).strip().lower() for answer in answers))


# ---- multiple choice: the three extractors (ref §2.5-§2.8) --------------------------------------------------

# ref §2.5: tried in order on the stripped, upper-cased reply; the first match's group 1 wins.
_VSTAR_PATTERNS = tuple(re.compile(p) for p in (
    r"^([A-D])\s*[\.)\]]*",  # any reply starting with A-D: "Blue" -> B
    r"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+([A-D])",
    r"\(([A-D])\)",
    r"([A-D])\s*(?:\.|\)|])",  # no word boundary: "RED." -> D
    r"(?:^|\s)([A-D])(?:\s|$)",
))


def vstar_letter(reply: str) -> str | None:
    """V*'s extract_answer_letter: the patterns above, then the reply's only A-D character if it has exactly one
    ("red" -> D); else None. (The fork's last rule, "the first character if in ABCD", cannot fire after the first
    pattern and is left out.)"""
    text = reply.strip().upper()
    for pattern in _VSTAR_PATTERNS:
        if match := pattern.search(text):
            return match.group(1)
    letters = [ch for ch in text if ch in "ABCD"]
    return letters[0] if len(letters) == 1 else None


_MMERW_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Best answer:", "Best option:")


def mmerw_letter(reply: str) -> str:
    """MME-RealWorld's extract_characters_regex (ref §2.6): the answer phrases above deleted (case-sensitively,
    anywhere), then the FIRST upper-case A-E anywhere ("Answer: D" -> A); failing that, the letter of the first of
    "(A)".."(E)" that contains the lower-cased text ("" -> A, "e" -> E); else "". (The fork's "more than 10 words
    and no A-E gives ''" rule changes nothing: such a text can be in no "(X)".)"""
    text = reply.strip()
    for prefix in _MMERW_PREFIXES:
        text = text.replace(prefix, "")
    if match := re.search(r"[ABCDE]", text):
        return match.group(0)
    return next((letter for letter in "ABCDE" if text.lower() in f"({letter.lower()})"), "")


# ref §2.7 step 1: VLMEvalKit's can_infer_option refusal strings (the reference quotes the last one).
_HR_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
_HR_SEPARATORS = str.maketrans({ch: " " for ch in ".()[],:;!*#{}"})


def hrbench_option(reply: str, options: Sequence[str]) -> str | None:
    """HR-Bench's local matcher (VLMEvalKit's can_infer, ref §2.7 steps 1-2): "Z" for a refusal; else the one
    option letter that stands as an exact, case-sensitive token; else "Z" if no letter but a "Z" token does; else
    the one option whose lower-cased text is a substring of the lower-cased reply; else None, the replies the fork
    sends to its GPT judge. (The fork's VERBOSE-env-var variant is not reproduced: the default behaviour is.)"""
    letters = option_letters(len(options))
    if "Failed to obtain answer via API" not in reply:
        if any(refusal in reply for refusal in _HR_REFUSALS):
            return "Z"
        tokens = set(reply.translate(_HR_SEPARATORS).split())
        named = [letter for letter in letters if letter in tokens]
        if len(named) == 1:
            return named[0]
        if not named and "Z" in tokens:
            return "Z"
    lowered = reply.lower()
    found = [letter for letter, text in zip(letters, options) if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


# The HR-Bench fallback judge (ref §2.7 step 3): called as judge(question, {letter: option text lower-cased, as the
# fork's matcher leaves them}, prediction) -> the judge's reply text, which is read with `hrbench_option`.
Judge = Callable[[str, Mapping[str, str], str], str]


def extract_option(task: str, reply: str, options: Sequence[str] = ()) -> str | None:
    """The letter that `task`'s own extractor reads from a reply (None or "" when none): V* (`vstar_letter`),
    MME-RealWorld-Lite (`mmerw_letter`), HR-Bench (`hrbench_option`, no judge)."""
    if task == "vstar":
        return vstar_letter(reply)
    if task == "mmerealworld_lite":
        return mmerw_letter(reply)
    if get_task(task).metric == "option":
        return hrbench_option(reply, options)
    raise ValueError(f"task {task!r} is not multiple choice")


# ---- one sample -------------------------------------------------------------------------------------------------

class ScoreDetail(NamedTuple):
    """A sample's score, and whether the task's rules could read an answer from the reply at all. `matched` is
    False only for multiple choice: no letter (V*), "" (MME-RW), or (HR-Bench) a reply the local matcher does not
    resolve: exactly the replies the fork sends to its GPT judge, counted as such even when `judge` then decides
    them. Without a judge such a reply scores 0 (offline, the fork's run would abort on it)."""
    score: float
    matched: bool


def _answers(row: Mapping) -> list[str]:
    value = row.get("answers")
    if value is None:
        value = row.get("answer")
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _answer_letter(row: Mapping) -> str:
    """The correct letter; "(B)" and " b " read as "B", as benchmarks.py accepts them."""
    value = row.get("answer")
    if value is None:
        value = next(iter(_answers(row)), "")
    return str(value).strip().strip("()").upper()


def _option_detail(task: str, pred: str, row: Mapping, judge: Judge | None) -> ScoreDetail:
    gold, options = _answer_letter(row), row.get("options", ())
    if task == "vstar":  # ref §2.5: the letter must equal the label
        letter = vstar_letter(pred)
        return ScoreDetail(float(letter == gold), letter is not None)
    if task == "mmerealworld_lite":  # ref §2.6: equality or the answer inside the extracted text
        letter = mmerw_letter(pred)
        return ScoreDetail(float(letter.lower() == gold.lower() or gold.lower() in letter.lower()), letter != "")
    choice = hrbench_option(pred, options)  # ref §2.7; "Z" never equals a gold letter
    if choice is not None:
        return ScoreDetail(float(choice.lower() == gold.lower()), True)
    if judge is None:
        return ScoreDetail(0.0, False)
    letters = option_letters(len(options))
    verdict = hrbench_option(judge(row["question"], {k: str(v).lower() for k, v in zip(letters, options)}, pred),
                             options)
    return ScoreDetail(float(verdict is not None and verdict.lower() == gold.lower()), False)


def score_detail(task: str, prediction: str, row: Mapping, scoring: str = "lmms",
                 judge: Judge | None = None) -> ScoreDetail:
    """The score in [0, 1] of one post-processed prediction, with `matched` (see ScoreDetail). `judge` is used by
    HR-Bench-style tasks only; its exceptions propagate."""
    _check_scoring(scoring)
    metric = get_task(task).metric
    if metric == "option":
        return _option_detail(task, prediction, row, judge)
    answers = _answers(row)
    if metric == "vqa":
        value = vqa_soft_accuracy(prediction, row.get("answers"))
    elif metric == "anls":
        value = anls(prediction, answers, scoring)
    elif metric == "relaxed":
        value = relaxed_accuracy(prediction, answers, scoring)
    elif metric == "exact":
        value = exact_match(prediction, answers)
    else:  # ocrbench: the fork keys the maths rule on the source dataset (ref §2.4)
        hme = row.get("dataset") == "HME100k" or row.get("category") == OCRBENCH_HME
        value = ocrbench_match(prediction, answers, hme, scoring)
    return ScoreDetail(value, True)


def score(task: str, prediction: str, row: Mapping, scoring: str = "lmms", judge: Judge | None = None) -> float:
    """`score_detail(...).score`: the per-sample value the task's aggregate is built from."""
    return score_detail(task, prediction, row, scoring, judge).score


# ---- aggregation ------------------------------------------------------------------------------------------------

_OCRBENCH_DOCS = 1000  # ref §2.4: the fork divides by 1000 whatever the number of docs scored
_HRBENCH = ("hrbench4k", "hrbench8k")


def _cycle_macro(scores: Sequence[float], rows: Sequence[Mapping]) -> float:
    """ref §2.7: the unweighted mean of the accuracies within each `cycle_category`."""
    groups: dict[str, list[float]] = {}
    for i, (value, row) in enumerate(zip(scores, rows)):
        if "cycle_category" not in row:
            raise ValueError(f"HR-Bench averages over 'cycle_category' (ref §2.7); row {i} has none")
        groups.setdefault(str(row["cycle_category"]), []).append(value)
    return statistics.fmean(statistics.fmean(g) for g in groups.values())


def _value(task: str, scores: Sequence[float], rows: Sequence[Mapping], scoring: str) -> float:
    if task in _HRBENCH:
        return _cycle_macro(scores, rows)
    if task == "ocrbench" and scoring == "lmms":
        return sum(scores) / _OCRBENCH_DOCS
    return statistics.fmean(scores)  # ref §2.1-2.6: a plain (micro) mean; MME-RW's too


def _check(task: str, scores: Sequence[float], rows: Sequence[Mapping], scoring: str) -> None:
    get_task(task)
    _check_scoring(scoring)
    if len(scores) != len(rows):
        raise ValueError(f"{len(scores)} scores but {len(rows)} rows")


def aggregate(task: str, scores: Sequence[float], rows: Sequence[Mapping], scoring: str = "lmms") -> float | None:
    """The task's headline number in percent (the summary's to_pct puts V*'s 0-100 and the others' fractions on one
    scale, ref §1.7); None without scores. The mean, except OCRBench under "lmms" (sum / 1000) and HR-Bench (mean
    of the cycle_category accuracies, which its rows must carry)."""
    _check(task, scores, rows, scoring)
    return 100.0 * _value(task, scores, rows, scoring) if len(scores) else None


def breakdown(task: str, scores: Sequence[float], rows: Sequence[Mapping], scoring: str = "lmms") -> dict[str, float]:
    """{row category: percent} over the rows that carry a category: the mean score, or for HR-Bench the
    cycle_category macro mean within each category (its `single`/`cross` keys, ref §2.7)."""
    _check(task, scores, rows, scoring)
    groups: dict[str, tuple[list[float], list[Mapping]]] = {}
    for value, row in zip(scores, rows):
        if category := str(row.get("category") or ""):
            group = groups.setdefault(category, ([], []))
            group[0].append(value)
            group[1].append(row)
    if task in _HRBENCH:
        return {c: 100.0 * _cycle_macro(s, r) for c, (s, r) in sorted(groups.items())}
    return {c: 100.0 * statistics.fmean(s) for c, (s, _) in sorted(groups.items())}
