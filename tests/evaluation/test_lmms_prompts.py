"""Golden prompts, generation budgets and reply post-processing of the fork (lmms-eval-tasks.md §1.3, §1.5-1.6,
§1.9, §2.1-2.7), written from the reference's rules and worked examples."""

import pytest

from qzoom_jax.evaluation import tasks
from qzoom_jax.evaluation.tasks import max_new_tokens, postprocess, prompt

SUFFIX = "Answer the question using a single word or phrase."
MC_ROW = {"question": "What is the material of the glove?", "options": ["rubber", "cotton", "kevlar", "leather"],
          "answer": "D"}
ALL_TASKS = ("textvqa", "docvqa", "infovqa", "chartqa", "ocrbench", "vstar", "mmerealworld_lite", "hrbench4k",
             "hrbench8k", "reading")


def row(question, options=("red", "blue", "green", "white")):
    return {"question": question, "options": list(options), "answers": ["x"], "answer": "A"}


def test_the_task_table_is_the_config_task_set():
    assert tuple(tasks.TASKS) == ALL_TASKS


# ---- §2.1 TextVQA: capitalize() + SUFFIX ------------------------------------------------------------------------

@pytest.mark.parametrize("question, text", [
    ("What does NASA own?", "What does nasa own?"),  # the reference's example: acronyms are lowercased
    ("what is written on the sign?", "What is written on the sign?"),
    ("iPhone or Android?", "Iphone or android?"),
    ("WHAT BRAND IS THIS?", "What brand is this?"),
    (" what year?", " what year?"),  # capitalize() upper-cases the first character only, here a space
    ("123 what?", "123 what?"),
])
def test_textvqa_prompt_capitalises(question, text):
    assert prompt("textvqa", row(question)) == text + "\n" + SUFFIX


# ---- §2.2 DocVQA / InfoVQA: Q + SUFFIX, untouched -----------------------------------------------------------------

@pytest.mark.parametrize("task", ["docvqa", "infovqa", "reading"])
@pytest.mark.parametrize("question", ["What is the date?", "what is the TOTAL? ", "  Name of the company"])
def test_anls_tasks_keep_the_question_as_it_is(task, question):
    assert prompt(task, row(question)) == question + "\n" + SUFFIX


def test_reading_prompt_is_the_question_and_the_suffix():
    question = "What number is written in the red box?"  # reading.READ_QUESTION
    assert prompt("reading", {"question": question, "answers": ["417"]}) == (
        "What number is written in the red box?\nAnswer the question using a single word or phrase.")
    assert prompt("reading", {"question": "How many boxes are there?"}) == (
        "How many boxes are there?\nAnswer the question using a single word or phrase.")


# ---- §2.3 ChartQA: two instructions ---------------------------------------------------------------------------

@pytest.mark.parametrize("question", ["What is the value of Peru in 2010?", "how many bars are there? "])
def test_chartqa_prompt_carries_both_instructions(question):
    assert prompt("chartqa", row(question)) == (
        question + "\nAnswer the question with a single word.\nAnswer the question using a single word or phrase.")


# ---- §2.4 OCRBench: Q.strip() + SUFFIX ------------------------------------------------------------------------

@pytest.mark.parametrize("question, text", [
    ("what is written in the image?", "what is written in the image?"),
    ("  What is the title?\n", "What is the title?"),
    ("\tRead the text. ", "Read the text."),
])
def test_ocrbench_prompt_strips(question, text):
    assert prompt("ocrbench", row(question)) == text + "\n" + SUFFIX


# ---- §2.5 V*: re-parsed options, the instruction three times over ---------------------------------------------

VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def test_vstar_prompt_is_the_worked_example():
    assert prompt("vstar", MC_ROW) == (
        "What is the material of the glove?\nA. rubber\nB. cotton\nC. kevlar\nD. leather\n"
        "Answer with the option's letter from the given choices directly.\n"
        "Answer with the option's letter from the given choices directly.\n"
        "Answer the question using a single word or phrase.")


def test_vstar_two_options():
    text = prompt("vstar", row("Is the dog left or right of the cat?", ["left", "right"]))
    assert text == ("Is the dog left or right of the cat?\nA. left\nB. right\n" + VSTAR_INSTRUCTION + "\n"
                    + VSTAR_INSTRUCTION + "\n" + SUFFIX)


def test_vstar_option_with_parentheses_is_dropped_and_the_rest_relabelled():
    # ref §2.5: an option holding "(" or ")" is silently skipped; the later ones move up a letter
    text = prompt("vstar", row("Which colour?", ["red (dark)", "blue", "green"]))
    assert text == "Which colour?\nA. blue\nB. green\n" + VSTAR_INSTRUCTION + "\n" + VSTAR_INSTRUCTION + "\n" + SUFFIX


def test_vstar_option_whitespace_is_stripped():
    text = prompt("vstar", row("Which?", ["  red  ", "blue"]))
    assert text.startswith("Which?\nA. red\nB. blue\n")


def test_vstar_question_is_stripped():
    assert prompt("vstar", row("  Which?  ", ["red", "blue"])).startswith("Which?\nA. red\n")


def test_vstar_without_options_keeps_the_text():
    twice = VSTAR_INSTRUCTION + "\n" + VSTAR_INSTRUCTION
    assert prompt("vstar", row("Which?", [])) == "Which?\n" + twice + "\n" + SUFFIX


# ---- §2.6 MME-RealWorld-Lite ------------------------------------------------------------------------------------

MMERW_TAIL = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
              "the letter (A, B, C, D, or E) of the correct option.\nThe best answer is: \n" + SUFFIX)


def test_mmerw_prompt_five_options():
    colours = ["red", "blue", "green", "white", "black"]
    text = prompt("mmerealworld_lite", row("What is the colour of the car?", colours))
    assert text == ("What is the colour of the car? The choices are listed below:\n(A) red\n(B) blue\n(C) green\n"
                    "(D) white\n(E) black\n" + MMERW_TAIL)


def test_mmerw_prompt_ends_with_the_trailing_space_then_suffix():
    text = prompt("mmerealworld_lite", MC_ROW)
    assert text.endswith("The best answer is: \nAnswer the question using a single word or phrase.")
    assert text.startswith("What is the material of the glove? The choices are listed below:\n(A) rubber\n")


def test_mmerw_question_is_not_stripped():
    assert prompt("mmerealworld_lite", row("Q? ", ["a", "b"])).startswith("Q?  The choices are listed below:\n(A) a")


# ---- §2.7 HR-Bench ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["hrbench4k", "hrbench8k"])
def test_hrbench_prompt(task):
    assert prompt(task, row("  What colour is the flag?\n")) == (
        "What colour is the flag?\nA. red\nB. blue\nC. green\nD. white\nAnswer the option letter directly.\n" + SUFFIX)


def test_hrbench_prompt_two_options():
    assert prompt("hrbench4k", row("Left or right?", ["left", "right"])) == (
        "Left or right?\nA. left\nB. right\nAnswer the option letter directly.\n" + SUFFIX)


# ---- §1.3 the wrapper's suffix ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_prompt_ends_with_the_suffix_once(task):
    text = prompt(task, MC_ROW | {"answers": ["x"]})
    assert text.endswith("\n" + SUFFIX) and text.count(SUFFIX) == 1


@pytest.mark.parametrize("task", ["ocrbench", "vstar", "hrbench4k", "mmerealworld_lite", "chartqa"])
def test_the_suffix_is_not_added_when_the_text_has_it(task):
    question = "Read it. " + SUFFIX
    text = prompt(task, row(question))
    assert text.count(SUFFIX) == 1 and not text.endswith("\n" + SUFFIX)


# ---- §1.9 generation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, tokens", [
    ("textvqa", 128), ("docvqa", 32), ("infovqa", 32), ("chartqa", 16), ("ocrbench", 128), ("vstar", 16),
    ("mmerealworld_lite", 16), ("hrbench4k", 128), ("hrbench8k", 128), ("reading", 8),
])
def test_max_new_tokens(task, tokens):
    assert max_new_tokens(task) == tokens


# ---- unknown tasks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: prompt("gqa", row("q")), lambda: max_new_tokens("gqa"), lambda: postprocess("gqa", "x"),
    lambda: tasks.get_task("gqa"), lambda: prompt("TextVQA", row("q")),
])
def test_unknown_task_names_the_known_ones(call):
    with pytest.raises(ValueError, match=r"unknown task '(gqa|TextVQA)'; choose one of \[.*'chartqa'.*'vstar'\]"):
        call()


# ---- §1.6 post-processing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, pred", [
    ("  B  ", "B"),
    ("\nyes\n", "yes"),
    ("", ""),
    ("   ", ""),
    ("A\n\nBecause the glove is shiny.", "A\n\nBecause the glove is shiny."),  # no stop string truncates
    ("<answer> B </answer>", "B"),
    ("thinking...<answer>\n42\n</answer>", "42"),  # DOTALL, trimmed
    ("<answer>a\nb</answer>", "a\nb"),
    ("<answer>first</answer> <answer>second</answer>", "first"),  # first, non-greedy
    ("<answer></answer>", ""),
    ("<answer>x</answer> \\boxed{y}", "x"),  # the tag wins over \boxed
    ("\\boxed{y} <answer>x</answer>", "x"),
    ("\\boxed{42}", "42"),
    ("The answer is \\boxed{ 7 }.", "7"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1"),  # up to the first "}"
    ("\\boxed{}", ""),
    ("\\boxed{a} \\boxed{b}", "a"),
    ("\\boxed{unclosed", "\\boxed{unclosed"),
    ("<answer>unclosed", "<answer>unclosed"),
    ("<ANSWER>x</ANSWER>", "<ANSWER>x</ANSWER>"),  # case-sensitive tag
    ("  Straße \u00e9\u4e2d  ", "Straße \u00e9\u4e2d"),
])
def test_postprocess(reply, pred):
    assert postprocess("docvqa", reply) == pred


@pytest.mark.parametrize("task", ALL_TASKS)
def test_postprocess_is_the_same_for_every_task(task):
    assert postprocess(task, " <answer> C </answer>\n") == "C"


def test_postprocess_keeps_very_long_text():
    text = "word " * 20000
    assert postprocess("textvqa", text) == text.strip()
