"""Golden per-sample scores, answer extraction and aggregation of the fork (lmms-eval-tasks.md §2, §3), both rule
sets, written from the reference's rules and worked ("computed") examples; plus every case of the former
tests/test_eval_metrics.py, with the fork's expectation where its rules differ."""

import pytest

from qzoom_jax.evaluation import scoring
from qzoom_jax.evaluation.scoring import (
    aggregate,
    anls,
    breakdown,
    exact_match,
    extract_option,
    hrbench_option,
    levenshtein,
    mmerw_letter,
    normalize_vqa_answer,
    ocrbench_match,
    relaxed_accuracy,
    score,
    score_detail,
    vqa_soft_accuracy,
    vstar_letter,
)
from qzoom_jax.evaluation.tasks import TASKS, postprocess

COLOURS = ["red", "blue", "green", "white"]  # the options of §2.8


def mc(answer, options=COLOURS, **extra):
    return {"question": "Which colour?", "options": list(options), "answer": answer, **extra}


def test_names():
    assert scoring.SCORINGS == ("lmms", "official")
    assert scoring.METRICS == ("vqa", "anls", "relaxed", "ocrbench", "option", "exact")
    assert {t.metric for t in TASKS.values()} == set(scoring.METRICS)
    assert scoring.option_letters(4) == ("A", "B", "C", "D") and scoring.option_letters(0) == ()


# ---- §2.1 TextVQA normalisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalized", [
    # the reference's computed table
    ("A cat", "cat"), ("t-shirt", "t shirt"), ("Dont", "don't"), ("t-shirt - red", "tshirt red"), ("None", "0"),
    ("1,000", "1000"), ("two dogs", "2 dogs"), ("3.5", "3.5"), ("5.", "5"), ("U.S.A.", "usa"),
    ("John's", "john 's"), ("3/4", "3 4"), ("3 / 4", "3 4"), ("Coca-Cola!", "coca cola"), ("10:30", "10:30"),
    ("$5", "$5"), ("50%", "50%"),
    # tests/test_eval_metrics.py, still true
    ("The Cat.", "cat"), ("an apple", "apple"), ("Two dogs", "2 dogs"), ("none", "0"), ("100,978", "100978"),
    ("3.5 kg", "3.5 kg"), ("a.m.", "am"), ("Yes!", "yes"), ("dont", "don't"), ("its", "its"), ("12:30", "12:30"),
    ("  the  red\tcar\n", "red car"),
    # the rules one by one
    ("why?", "why"), ("a,b", "ab"), ("hello ! world", "hello world"), ("x_y", "x y"), ("(x) y", "x y"),
    ("x=y+z", "x y z"), ('say "hi"', "say hi"), ("@home", "home"), ("x`y", "x y"), ("x\\y", "x y"),
    ("5 - 3", "5 3"), ("<tag>", "tag"), ("[1]{2}", "1 2"), ("it's", "it 's"), ("what's", "what 's"),
    ("#1 & *2 ~3 ^4 |5", "#1 & *2 ~3 ^4 |5"), ("'quoted'", "'quoted'"), ("3.14.15", "3.14.15"),
    ("one two ten eleven", "1 2 10 eleven"), ("zero", "0"), ("the one", "1"), ("An", ""), ("ONE", "1"),
    ("whats", "what's"), ("cant", "can't"), ("wont", "won't"), ("im", "im"), ("lets", "lets"), ("shes", "shes"),
    ("somebody'd", "somebodyd"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"), ("twas", "'twas"), ("yall", "y'all"), ("oclock", "o'clock"),
    ("x" + "." * 40, "x" + "." * 8),  # at most 32 periods go (re.UNICODE passed as count)
    ("", ""), ("\n\t", ""),
])
def test_vqa_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize("pred, answers, expected", [
    # the reference's computed table
    ("Nokia", ["nokia"] * 10, 1.0),
    ("nokia", ["nokia"] * 3 + ["other"] * 7, 0.9),
    ("nokia", ["nokia"] + ["other"] * 9, 0.3),
    ("dont", ["don't"] * 10, 1.0),
    ("0", ["none"] * 10, 1.0),
    ("A Cat.", ["cat"] * 10, 1.0),  # GTs normalised although they agree
    ("t-shirt - red", ["t-shirt red"] * 10, 0.0),
    ("", ["unanswerable"] * 10, 0.0),
    # k matches of 10 (tests/test_eval_metrics.py)
    ("cat", ["dog"] * 10, 0.0), ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6), ("cat", ["cat"] * 4 + ["dog"] * 6, 1.0),
    ("Two.", ["2"] * 10, 1.0), ("the dont", ["don't"] * 3 + ["no"] * 7, 0.9),
    ("what's", ["whats"] * 10, 0.0),  # "what 's" vs "what's"
    ("cat", None, 0.0), ("cat", [], 0.0),
])
def test_vqa_soft_accuracy(pred, answers, expected):
    assert vqa_soft_accuracy(pred, answers) == pytest.approx(expected, abs=1e-12)
    row = {"answers": answers} if answers is not None else {}
    for scoring_name in scoring.SCORINGS:  # no fork deviation is named for TextVQA
        assert score("textvqa", pred, row, scoring_name) == pytest.approx(expected, abs=1e-12)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("abc", "abc") == 0


# ---- §2.2 ANLS ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answers, pred, lmms, official", [
    # the reference's computed table (lmms), and the official rule
    (["ab"], "ac", 0.5, 0.0),  # tie at the threshold: kept by the fork, zeroed officially
    (["abcd"], "abxy", 0.5, 0.0),
    (["abcde"], "abxyz", 0.0, 0.0),
    (["abc"], "abx", 2 / 3, 2 / 3),
    (["New York"], "new  york", 1.0, 1.0),
    (["12 "], "13", 2 / 3, 0.0),  # raw length 3 is the fork's denominator; normalised NL = 0.5
    (["10", "ten"], "10", 1.0, 1.0),
    (["abc"], "", 0.0, 0.0),
    ([""], "", 1.0, 1.0),
    (["5"], "5 kg", 0.0, 0.0),
    (["$1,000"], "1000", 2 / 3, 2 / 3),
    # tests/test_eval_metrics.py
    (["hello"], "hallo", 0.8, 0.8),
    (["abxye"], "abcde", 0.6, 0.6),
    (["abef"], "abcd", 0.5, 0.0),
    (["hello world"], "Hello  World ", 1.0, 1.0),
    (["xyz", "hello"], "hallo", 0.8, 0.8),
    # more
    (["ß"], "s", 0.5, 0.0),  # "ß".upper() is "SS": the fork's raw length is 2
    (["  Total  "], "total", 1.0, 1.0),
    ([], "x", 0.0, 0.0),
    (["March 3"], "3 March", 0.0, 0.0),
])
def test_anls(answers, pred, lmms, official):
    assert anls(pred, answers) == pytest.approx(lmms)
    assert anls(pred, answers, "official") == pytest.approx(official)
    for task in ("docvqa", "infovqa"):
        assert score(task, pred, {"answers": answers}) == pytest.approx(lmms)
        assert score(task, pred, {"answers": answers}, "official") == pytest.approx(official)


# ---- exact match: our reading task (no lmms-eval counterpart) ------------------------------------------------------

@pytest.mark.parametrize("pred, answers, expected", [
    ("417", ["417"], 1.0),
    (" 417 ", ["417"], 1.0),  # both sides stripped
    ("417", [" 417\n"], 1.0),
    ("418", ["417"], 0.0),  # a near miss is a misread: no partial credit
    ("4170", ["417"], 0.0),
    ("41", ["417"], 0.0),
    ("The number is 417", ["417"], 0.0),  # no substring match
    ("Three", ["three"], 1.0),  # case-insensitive
    ("", ["417"], 0.0),
    ("3", ["417", "3"], 1.0),  # any answer
    ("417", [], 0.0),
])
def test_exact_match(pred, answers, expected):
    assert exact_match(pred, answers) == expected
    for scoring_name in scoring.SCORINGS:  # one rule under both scorings
        assert score_detail("reading", pred, {"answers": answers}, scoring_name) == (expected, True)


def test_reading_scores_the_post_processed_reply():
    assert score("reading", postprocess("reading", "<answer> 417 </answer>"), {"answers": ["417"]}) == 1.0
    assert score("reading", postprocess("reading", "417\n"), {"answers": ["417"]}) == 1.0


# ---- §2.3 ChartQA ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, target, lmms, official", [
    # the reference's computed table
    ("105", "100", 1.0, 1.0), ("105.01", "100", 0.0, 0.0), ("2.31", "2.2", 1.0, 1.0), ("2.09", "2.2", 0.0, 0.0),
    ("1,000", "1000", 0.0, 0.0), ("1e3", "1000", 1.0, 1.0), ("-5", "5", 0.0, 0.0), ("0", "0", 1.0, 1.0),
    ("0.0", "0", 0.0, 1.0),  # zero target: string equality in the fork, numeric officially
    ("45%", "45", 0.0, 0.0), ("0.45", "45%", 1.0, 1.0), ("1,000", "1,000", 1.0, 1.0), ("Yes", "yes", 1.0, 1.0),
    ("yes.", "Yes", 0.0, 0.0), ("", "0", 0.0, 0.0),
    # tests/test_eval_metrics.py
    ("10.4", "10", 1.0, 1.0), ("10.5", "10", 1.0, 1.0), ("10.6", "10", 0.0, 0.0), ("45%", "0.45", 1.0, 1.0),
    ("45%", "46%", 1.0, 1.0), ("no", "yes", 0.0, 0.0), ("0.01", "0", 0.0, 0.0), (" 7 ", "7.2", 1.0, 1.0),
    # Python float's grammar, both sides
    ("+5", "5", 1.0, 1.0), ("1_000", "1000", 1.0, 1.0), ("$5", "5", 0.0, 0.0), ("5 kg", "5", 0.0, 0.0),
    ("5%%", "0.05", 1.0, 1.0), ("%", "%", 1.0, 1.0), ("inf", "inf", 0.0, 0.0), ("nan", "nan", 0.0, 0.0),
    ("-0", "0", 0.0, 1.0), ("0%", "0", 0.0, 1.0), ("zero", "0", 0.0, 0.0), ("0", "0.0", 0.0, 1.0),
    ("Peru", "peru", 1.0, 1.0), ("Peru ", "Peru", 0.0, 0.0),  # no stripping beyond the framework's
])
def test_relaxed_accuracy(pred, target, lmms, official):
    assert relaxed_accuracy(pred, [target]) == lmms
    assert relaxed_accuracy(pred, [target], "official") == official
    assert score("chartqa", pred, {"answer": target}) == lmms
    assert score("chartqa", pred, {"answers": [target]}, "official") == official


def test_relaxed_accuracy_takes_the_best_target():
    assert relaxed_accuracy("10", ["99", "10.2"]) == 1.0
    assert score("chartqa", "7", {"answer": 7}) == 1.0  # a JSON number as the label


# ---- §2.4 OCRBench ------------------------------------------------------------------------------------------------

HME = {"dataset": "HME100k"}


@pytest.mark.parametrize("pred, answers, extra, lmms, official", [
    # the reference's computed table
    ("The word is HELLO.", ["hello"], {"dataset": "IIIT5K"}, 1.0, 1.0),
    ("10", ["1"], {}, 1.0, 1.0),
    ("hel lo", ["hello"], {}, 0.0, 0.0),
    ("New York", ["new\nyork"], {}, 1.0, 1.0),
    ("x^{2}+1", ["x ^ { 2 } + 1"], HME, 1.0, 1.0),
    ("\\frac{A}{2}", ["\\frac { A } { 2 }"], HME, 0.0, 1.0),  # the fork lowercases the prediction only
    ("anything", [""], {}, 1.0, 1.0),
    # tests/test_eval_metrics.py
    ("The sign says HELLO world", ["hello"], {}, 1.0, 1.0),
    ("goodbye", ["hello", "bye"], {}, 1.0, 1.0),
    ("x ^ { 2 } + 1", ["x^{2}+1"], HME, 1.0, 1.0),
    ("X^{2}+1", ["x^{2}+1"], HME, 1.0, 0.0),
    ("X^{2}+1", ["x^{2}+1"], {}, 1.0, 1.0),
    # more
    ("x^{2}+1", ["x^{2}+1"], {"category": scoring.OCRBENCH_HME}, 1.0, 1.0),  # our schema's question type
    ("\\frac{A}{2}", ["\\frac{A}{2}"], {"category": scoring.OCRBENCH_HME}, 0.0, 1.0),
    ("a\nb", ["a b"], {}, 1.0, 1.0),
    ("ab", ["a b"], {}, 0.0, 0.0),
    ("a b", ["ab"], HME, 1.0, 1.0),
    ("answer: cat", "cat", {}, 1.0, 1.0),  # a single-string GT
    ("dog", ["cat", "bird"], {}, 0.0, 0.0),
    ("", ["cat"], {}, 0.0, 0.0),
])
def test_ocrbench(pred, answers, extra, lmms, official):
    row = {"answers": answers, **extra}
    assert score("ocrbench", pred, row) == lmms
    assert score("ocrbench", pred, row, "official") == official
    hme = extra.get("dataset") == "HME100k" or "category" in extra
    golds = [answers] if isinstance(answers, str) else answers
    assert ocrbench_match(pred, golds, hme) == lmms


def test_ocrbench_boxed_reply_is_cut_before_scoring():
    pred = postprocess("ocrbench", "\\boxed{\\frac{1}{2}}")
    assert pred == "\\frac{1"
    assert score("ocrbench", pred, {"answers": ["\\frac { 1 } { 2 }"], **HME}) == 0.0


# ---- §2.5-§2.8 multiple-choice extraction ---------------------------------------------------------------------

# §2.8, the reference's side-by-side table (options A=red, B=blue, C=green, D=white); None = HR-Bench's judge case
TABLE_2_8 = [
    ("A", "A", "A", "A"),
    ("(B)", "B", "B", "B"),
    ("b", "B", "B", None),
    ("A cat", "A", "A", "A"),
    ("Cat", "C", "C", None),
    ("red", "D", "", "A"),
    ("green", None, "", "C"),
    ("Answer: D", "A", "A", "D"),
    ("The answer is C.", "C", "C", "C"),
    ("Based on the image, C", "B", "B", "C"),
    ("Maybe B or C", "B", "B", None),
    ("", None, "A", None),
    ("E", None, "E", None),
    ("I prefer the colored one", None, "", "A"),
    ("A\n\nBecause it is red", "A", "A", "A"),
]


@pytest.mark.parametrize("pred, vstar, mmerw, hrbench", TABLE_2_8)
def test_multiple_choice_table(pred, vstar, mmerw, hrbench):
    assert vstar_letter(pred) == vstar
    assert mmerw_letter(pred) == mmerw
    assert hrbench_option(pred, COLOURS) == hrbench
    assert extract_option("vstar", pred) == vstar
    assert extract_option("mmerealworld_lite", pred) == mmerw
    assert extract_option("hrbench8k", pred, COLOURS) == hrbench


@pytest.mark.parametrize("pred, vstar, mmerw, hrbench", TABLE_2_8)
@pytest.mark.parametrize("gold", ["A", "C"])
def test_multiple_choice_table_scores(pred, vstar, mmerw, hrbench, gold):
    for scoring_name in scoring.SCORINGS:  # no fork deviation is named for the three
        assert score("vstar", pred, mc(gold), scoring_name) == float(vstar == gold)
        assert score("mmerealworld_lite", pred, mc(gold), scoring_name) == float(mmerw == gold)
        assert score_detail("hrbench4k", pred, mc(gold), scoring_name) == (float(hrbench == gold), hrbench is not None)


@pytest.mark.parametrize("reply, letter", [
    # rule 1: any leading A-D after upper-casing
    ("Blue", "B"), ("Dog", "D"), ("d)", "D"), ("c]", "C"), ("B.", "B"), ("  a  ", "A"), ("Definitely B", "D"),
    # rule 2 before rule 3
    ("My answer is B, not (C)", "B"), ("Option: b", "B"), ("the choice: d", "D"), ("Its answer is  c", "C"),
    # rule 3
    ("The choice is (C)", "C"), ("I go with (b)", "B"),
    # rule 4, no word boundary
    ("It is C. Or B", "C"), ("RED.", "D"), ("so b)", "B"), ("pick [d]", "D"),
    # rule 5
    ("I pick B", "B"), ("it is c", "C"),
    # rule 6: exactly one A-D character in the whole reply
    ("xdx", "D"), ("yddy", None), ("purple", None), ("none of them", None),
])
def test_vstar_letter_rules(reply, letter):
    assert vstar_letter(reply) == letter


@pytest.mark.parametrize("reply, letter", [
    # step 2: phrases deleted case-sensitively, anywhere
    ("Best answer: C", "C"), ("Best option: D", "D"), ("So, Best answer: E", "E"), ("BEST ANSWER: C", "B"),
    ("The best answer is D", "D"), ("The correct option is E", "E"), ("The answer", "A"),
    # step 4: the first upper-case A-E anywhere
    ("(C)", "C"), ("I think E", "E"), ("Dog", "D"), ("not sure, maybe Ceylon", "C"),
    # step 5: the lower-cased text inside "(A)".."(E)"
    ("c", "C"), ("(d", "D"), ("a)", "A"), (")", "A"), ("e", "E"), ("(", "A"), ("c.", ""), ("ab", ""),
    # step 3 (long, no letter) and the rest: ""
    ("i think it is the one on the left side of it", ""), ("purple", ""),
])
def test_mmerw_letter_rules(reply, letter):
    assert mmerw_letter(reply) == letter


def test_mmerw_empty_reply_is_read_as_a():
    assert score("mmerealworld_lite", "", mc("A")) == 1.0
    assert score("mmerealworld_lite", "", mc("B")) == 0.0
    assert score("mmerealworld_lite", "(b)", mc("(B)")) == 1.0  # gold letters in the schema's accepted forms


@pytest.mark.parametrize("reply, options, choice", [
    # step 1: refusals and the API-failure text
    ("Cannot determine the answer", COLOURS, "Z"),
    ("Sorry, I can't help with images of people yet.", COLOURS, "Z"),
    ("I can't process this file.", COLOURS, "Z"),
    ("I'm sorry, but without the image provided, A", COLOURS, "Z"),
    ("Failed to obtain answer via API: A", COLOURS, None),  # no letter reading; no option text either
    ("Failed to obtain answer via API, it is red", COLOURS, "A"),  # ... but the text step still runs
    # step 1: exact, case-sensitive tokens after the separators
    ("**B**", COLOURS, "B"), ("[D]", COLOURS, "D"), ("C:", COLOURS, "C"), ("{A}", COLOURS, "A"),
    ("#C", COLOURS, "C"), ("B!", COLOURS, "B"), ("B;", COLOURS, "B"), ("B,", COLOURS, "B"), ("a", COLOURS, None),
    ("A or B", COLOURS, None), ("B B", COLOURS, "B"), ("Z", COLOURS, "Z"), ("Z.", COLOURS, "Z"),
    ("A Z", COLOURS, "A"), ("E", COLOURS + ["black"], "E"), ("B-", COLOURS, None),
    # step 2: exactly one option text inside the lower-cased reply
    ("blue sky", COLOURS, "B"), ("RED", COLOURS, "A"), ("red and blue", COLOURS, None),
    ("Whitewater", COLOURS, "D"), ("Big Dog", ["big dog", "cat"], "A"),
])
def test_hrbench_option_rules(reply, options, choice):
    assert hrbench_option(reply, options) == choice


def test_hrbench_refusal_is_matched_and_wrong():
    def judge(*args):
        raise AssertionError("a resolved reply must not reach the judge")

    assert score_detail("hrbench4k", "Cannot determine the answer", mc("A"), judge=judge) == (0.0, True)
    assert score_detail("hrbench4k", "Z", mc("A"), judge=judge) == (0.0, True)


# ---- HR-Bench judge and the unmatched count (§2.7 step 3) -----------------------------------------------------

def test_hrbench_unmatched_replies_are_counted_and_wrong_without_a_judge():
    replies = ["A", "b", "Cat", "red", "Maybe B or C", "", "E", "The answer is C."]
    details = [score_detail("hrbench8k", r, mc("C")) for r in replies]
    assert [d.matched for d in details].count(False) == 5
    assert [d.score for d in details] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_hrbench_judge_decides_unmatched_replies():
    calls = []

    def judge(question, options, prediction):
        calls.append((question, dict(options), prediction))
        return {"Maybe B or C": "The answer is B", "Cat": "I cannot tell", "b": "Z"}[prediction]

    row = mc("B", ["Red", "Blue", "Green", "White"])
    assert score_detail("hrbench4k", "Maybe B or C", row, judge=judge) == (1.0, False)
    assert score_detail("hrbench4k", "Cat", row, judge=judge) == (0.0, False)  # unparseable verdict: wrong
    assert score_detail("hrbench4k", "b", row, judge=judge) == (0.0, False)  # "Z" is always wrong
    assert score_detail("hrbench4k", "B", row, judge=judge) == (1.0, True)  # resolved locally: no call
    assert calls[0] == ("Which colour?", {"A": "red", "B": "blue", "C": "green", "D": "white"}, "Maybe B or C")
    assert len(calls) == 3
    assert score("hrbench4k", "Maybe B or C", row, judge=judge) == 1.0


def test_matched_is_true_for_free_form_tasks():
    assert score_detail("docvqa", "", {"answers": ["x"]}) == (0.0, True)
    assert score_detail("vstar", "purple", mc("A")) == (0.0, False)
    assert score_detail("mmerealworld_lite", "purple", mc("A")) == (0.0, False)


def test_extract_option_rejects_free_form_and_unknown_tasks():
    with pytest.raises(ValueError, match="not multiple choice"):
        extract_option("docvqa", "A")
    with pytest.raises(ValueError, match="unknown task 'mmbench'"):
        extract_option("mmbench", "A")


# ---- odd predictions never crash ---------------------------------------------------------------------------------

ODD = ["", " ", "\u00e9\u00df\u4e2d\u6587\U0001f600", "x" * 3000, "A" * 3000 + "?", "\\boxed{", "<answer></answer>",
       "\x00\x01", "((((((((", "%%%"]
ROWS = {
    "textvqa": {"answers": ["yes"] * 10}, "docvqa": {"answers": ["abc"]}, "infovqa": {"answers": ["abc"]},
    "chartqa": {"answer": "12"}, "ocrbench": {"answers": ["abc"], "dataset": "HME100k"}, "vstar": mc("A"),
    "mmerealworld_lite": mc("A"), "hrbench4k": mc("A"), "hrbench8k": mc("A"),
    "reading": {"answers": ["417"]},
}


@pytest.mark.parametrize("task", list(ROWS))
@pytest.mark.parametrize("reply", ODD)
def test_odd_predictions_score_in_range(task, reply):
    for scoring_name in scoring.SCORINGS:
        value = score(task, postprocess(task, reply), ROWS[task] | {"question": "q"}, scoring_name)
        assert 0.0 <= value <= 1.0


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown task 'gqa'; choose one of \["):
        score("gqa", "a", {"answers": ["a"]})
    with pytest.raises(ValueError, match=r"unknown scoring 'vlmevalkit'; choose one of \('lmms', 'official'\)"):
        score("docvqa", "a", {"answers": ["a"]}, "vlmevalkit")
    with pytest.raises(ValueError, match="unknown scoring"):
        anls("a", ["a"], "strict")


# ---- aggregation (§1.7, §2.4, §2.5, §2.6, §2.7) -----------------------------------------------------------------

def hr_rows(cycles, categories=None):
    categories = categories or ["single"] * len(cycles)
    return [mc("A", cycle_category=c, category=k) for c, k in zip(cycles, categories)]


@pytest.mark.parametrize("task", ["hrbench4k", "hrbench8k"])
@pytest.mark.parametrize("scoring_name", ["lmms", "official"])
def test_hrbench_averages_over_cycle_category(task, scoring_name):
    # the reference's example: c1 [1, 1] and c2 [0, 0, 0, 1] give (1 + 0.25) / 2, not the micro 0.5
    rows = hr_rows(["c1", "c1", "c2", "c2", "c2", "c2"])
    assert aggregate(task, [1, 1, 0, 0, 0, 1], rows, scoring_name) == pytest.approx(62.5)


def test_hrbench_single_and_cross_are_cycle_means_too():
    rows = hr_rows(["c1", "c1", "c2", "c2", "c2", "c2", "c1", "c2"],
                   ["single"] * 6 + ["cross"] * 2)
    scores = [1, 1, 0, 0, 0, 1, 1, 0]
    assert breakdown("hrbench4k", scores, rows) == pytest.approx({"cross": 50.0, "single": 62.5})
    assert aggregate("hrbench4k", scores, rows) == pytest.approx(100 * (3 / 3 + 1 / 5) / 2)


def test_hrbench_rows_must_carry_cycle_category():
    with pytest.raises(ValueError, match="cycle_category.*row 1"):
        aggregate("hrbench4k", [1, 0], [mc("A", cycle_category="c1"), mc("A")])


@pytest.mark.parametrize("scoring_name, expected", [("lmms", 0.2), ("official", 200 / 3)])
def test_ocrbench_divides_by_a_fixed_1000(scoring_name, expected):
    rows = [{"answers": ["a"], "category": "Regular Text Recognition"}] * 3
    assert aggregate("ocrbench", [1, 1, 0], rows, scoring_name) == pytest.approx(expected)
    assert aggregate("ocrbench", [1] * 1000, rows * 333 + rows[:1], scoring_name) == pytest.approx(100.0)


@pytest.mark.parametrize("task", ["textvqa", "docvqa", "infovqa", "chartqa", "vstar", "mmerealworld_lite",
                                  "reading"])
@pytest.mark.parametrize("scoring_name", ["lmms", "official"])
def test_other_tasks_report_the_micro_mean_in_percent(task, scoring_name):
    # V*'s fork aggregate is already x100 and the others are fractions; to_pct puts all in percent (§1.7)
    rows = [{"category": "a"}] * 3 + [{"category": "b"}]
    assert aggregate(task, [1.0, 0.0, 0.5, 1.0], rows, scoring_name) == pytest.approx(62.5)
    assert breakdown(task, [1.0, 0.0, 0.5, 1.0], rows, scoring_name) == pytest.approx({"a": 50.0, "b": 100.0})


def test_aggregate_edges():
    assert aggregate("docvqa", [], []) is None
    assert breakdown("docvqa", [1.0], [{"category": ""}]) == {}
    with pytest.raises(ValueError, match="2 scores but 1 rows"):
        aggregate("docvqa", [1, 0], [{}])
    with pytest.raises(ValueError, match="unknown task"):
        aggregate("gqa", [1], [{}])


def test_plain_mean_and_categories():
    # the former category_accuracy / task_accuracy cases, through the one aggregation; their "category_mean" over
    # HR-Bench's FSP/FCP is superseded by the cycle_category mean (test_hrbench_averages_over_cycle_category)
    assert breakdown("docvqa", [1, 0, 1], [{"category": "x"}, {"category": "x"}, {}]) == {"x": 50.0}
    assert aggregate("docvqa", [1, 0, 1, 1], [{}] * 4) == 75.0
    assert aggregate("hrbench4k", [1, 1, 0, 0, 0, 1], hr_rows(["c1", "c1", "c2", "c2", "c2", "c2"])) == 62.5


# ---- the former tests/test_eval_metrics.py option cases under the fork's three extractors -------------------------

# Its one rule-based extractor (options dog, cat, bird, fish) gave way to the fork's per-task ones (§2.5-§2.7). Each
# reply: (old letter, V* letter, MME-RW letter, HR-Bench local result); None = no letter (HR-Bench: the judge case).
ANIMALS = ["dog", "cat", "bird", "fish"]
OLD_OPTION_CASES = [
    ("B", "B", "B", "B", "B"),
    ("b", "B", "B", "B", None),  # HR-Bench tokens are case-sensitive; no option text in "b"
    ("B.", "B", "B", "B", "B"),
    ("(B)", "B", "B", "B", "B"),
    ("(B) cat", "B", "B", "B", "B"),
    ("B) cat", "B", "B", "B", "B"),
    ("B: cat", "B", "B", "B", "B"),
    ("The answer is C", "C", "C", "C", "C"),
    ("The correct option is (D).", "D", "D", "D", "D"),  # V*: rule 2 cannot cross "(", rule 3 reads (D)
    ("Answer: A", "A", "A", "A", "A"),
    ("cat", "B", "C", "", "B"),  # V* reads the leading C of "CAT"; MME-RW finds no capital and no "(x)"
    ("A cat.", "B", "A", "A", "A"),  # the old article rule is gone: every fork rule reads the letter A
    ("I think it is the bird", "C", None, "", "C"),  # V*: B and D both occur (rule 6 needs exactly one)
    ("dog or cat", None, "D", "", None),  # V*: the leading D of "DOG"
    ("E", None, None, "E", None),  # only MME-RW has an E option letter range
    ("no idea", None, None, "", None),  # V*: D and A both occur
]


@pytest.mark.parametrize("reply, old, vstar, mmerw, hrbench", OLD_OPTION_CASES)
def test_former_option_cases(reply, old, vstar, mmerw, hrbench):
    assert vstar_letter(reply) == vstar
    assert mmerw_letter(reply) == mmerw
    assert hrbench_option(reply, ANIMALS) == hrbench
    row = mc("B", ANIMALS)
    assert score("vstar", reply, row) == float(vstar == "B")
    assert score("mmerealworld_lite", reply, row) == float(mmerw == "B")
    assert score_detail("hrbench4k", reply, row) == (float(hrbench == "B"), hrbench is not None)


def test_former_score_dispatch():
    row = mc("C", ANIMALS)
    for task in ("vstar", "mmerealworld_lite", "hrbench4k"):
        assert score(task, "(C) bird", row) == 1.0
    # "cat" for gold C: the old extractor read B (wrong); V* now reads its leading C (right), the others stay wrong
    assert (score("vstar", "cat", row), score("mmerealworld_lite", "cat", row), score("hrbench4k", "cat", row)) == (
        1.0, 0.0, 0.0)
    assert score("docvqa", "hallo", {"answers": ["hello"]}) == pytest.approx(0.8)
    assert score("textvqa", "cat", {"answers": ["cat"] * 2 + ["dog"] * 8}) == pytest.approx(0.6)
    assert score("chartqa", "45%", {"answer": "0.45"}) == 1.0
    assert score("ocrbench", "it reads STOP", {"answers": ["stop"]}) == 1.0
