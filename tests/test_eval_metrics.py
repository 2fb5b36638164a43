"""Benchmark metrics against hand-computed values (training reference §6.1; definitions in the docstrings)."""

import pytest

from qzoom_jax.evaluation.metrics import (anls, extract_option_letter, levenshtein, normalize_vqa_answer,
    ocrbench_match, relaxed_accuracy, score, task_accuracy, vqa_soft_accuracy)


@pytest.mark.parametrize("raw, normalized", [
    ("The Cat.", "cat"),                # case, article, final period
    ("an apple", "apple"),
    ("Two dogs", "2 dogs"),             # number words
    ("none", "0"),
    ("100,978", "100978"),              # comma between digits dropped, not spaced
    ("3.5 kg", "3.5 kg"),               # decimal point kept
    ("a.m.", "am"),
    ("t-shirt", "t shirt"),             # punctuation -> space
    ("Yes!", "yes"),
    ("dont", "don't"),                  # contraction apostrophe restored
    ("its", "its"),                     # ... but not for plain words
    ("12:30", "12:30"),                 # colons kept
    ("  the  red\tcar\n", "red car"),
])
def test_vqa_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),   # the 9 subsets without the match have 1 -> 1/3; the one with it removed has 0
    (2, 0.6),   # 2 x 1/3 + 8 x 2/3, over 10
    (3, 0.9),   # 3 x 2/3 + 7 x 1, over 10
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_soft_accuracy_over_leave_one_out_subsets(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_soft_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_normalizes_both_sides():
    assert vqa_soft_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_soft_accuracy("the dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize("pred, answers, expected", [
    ("hallo", ["hello"], 0.8),                  # 1 edit / 5 chars
    ("abcde", ["abxye"], 0.6),                  # NL 0.4 < 0.5
    ("abcd", ["abef"], 0.0),                    # NL exactly 0.5 is cut to 0
    ("Hello  World ", ["hello world"], 1.0),    # case and whitespace
    ("hallo", ["xyz", "hello"], 0.8),           # best answer
    ("", [""], 1.0),
])
def test_anls(pred, answers, expected):
    assert anls(pred, answers) == pytest.approx(expected)


@pytest.mark.parametrize("pred, target, expected", [
    ("10.4", "10", 1.0),       # 4 % off
    ("10.5", "10", 1.0),       # exactly 5 % is inside
    ("10.6", "10", 0.0),
    ("45%", "0.45", 1.0),      # a percent sign divides by 100
    ("45%", "45", 0.0),
    ("45%", "46%", 1.0),       # 2.2 % relative
    ("Yes", "yes", 1.0),       # non-numeric: exact, case-insensitive
    ("no", "yes", 0.0),
    ("0.0", "0", 1.0),         # zero target: exact numeric equality (fixed)
    ("0.01", "0", 0.0),
    ("1,000", "1000", 0.0),    # thousands separators are not numbers
    (" 7 ", "7.2", 1.0),
])
def test_relaxed_accuracy(pred, target, expected):
    assert relaxed_accuracy(pred, [target]) == expected


def test_ocrbench_match():
    assert ocrbench_match("The sign says HELLO world", ["hello"]) == 1.0
    assert ocrbench_match("goodbye", ["hello", "bye"]) == 1.0
    assert ocrbench_match("hel lo", ["hello"]) == 0.0
    hme = "Handwritten Mathematical Expression Recognition"
    assert ocrbench_match("x ^ { 2 } + 1", ["x^{2}+1"], hme) == 1.0     # spaces removed
    assert ocrbench_match("X^{2}+1", ["x^{2}+1"], hme) == 0.0           # case kept
    assert ocrbench_match("X^{2}+1", ["x^{2}+1"]) == 1.0


OPTIONS = ["dog", "cat", "bird", "fish"]


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"),
    ("b", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("(B) cat", "B"),
    ("B) cat", "B"),
    ("B: cat", "B"),
    ("The answer is C", "C"),
    ("The correct option is (D).", "D"),
    ("Answer: A", "A"),
    ("cat", "B"),
    ("A cat.", "B"),               # "A" is an article here
    ("I think it is the bird", "C"),
    ("dog or cat", None),          # two options named
    ("E", None),                   # not an option
    ("no idea", None),
])
def test_option_letter_extraction(reply, letter):
    assert extract_option_letter(reply, OPTIONS) == letter


def test_score_dispatch():
    assert score("option", "(C) bird", ["C"], OPTIONS) == 1.0
    assert score("option", "cat", ["C"], OPTIONS) == 0.0
    assert score("anls", "hallo", ["hello"]) == pytest.approx(0.8)
    assert score("vqa", "cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)
    assert score("relaxed", "45%", ["0.45"]) == 1.0
    assert score("ocrbench", "it reads STOP", ["stop"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", "a", ["a"])


def test_task_accuracy():
    assert task_accuracy([1, 0, 1, 1], [""] * 4) == 75.0
    # HR-Bench Overall: mean of the FSP (2 of 3 right) and FCP (0 of 1) accuracies, not of the samples
    assert task_accuracy([1, 1, 0, 0], ["FSP", "FSP", "FSP", "FCP"], "category_mean") == pytest.approx(100 / 3)
    assert task_accuracy([], []) is None
    with pytest.raises(ValueError, match="needs samples with a category"):
        task_accuracy([1.0], [""], "category_mean")
