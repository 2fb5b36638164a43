"""Per-task prompting, generation settings and reply post-processing of the evaluation benchmarks, as upstream's
lmms-eval fork does them (section numbers (§) refer to /work/shared/reference/lmms-eval-tasks.md).

A task reads one benchmark JSONL row (schema: qzoom_jax/evaluation/benchmarks.py): ``question``, ``options``
(option texts without letters) and the answer keys that scoring.py reads.

Usage: ``text = prompt(task, row)`` is the user text handed to the chat template after the image;
``generate(max_new_tokens=max_new_tokens(task))`` greedily, no stop strings; ``pred = postprocess(task, reply)``;
then ``scoring.score(task, pred, row)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

# ref §1.3: the fork's chat wrapper appends "\n" + ANSWER_SUFFIX to every prompt that lacks it; ref §2.5: V*'s
# OPTION_INSTRUCTION (LLaVA's wording).
from qzoom_jax.data.prompts import ANSWER_SUFFIX, OPTION_INSTRUCTION
CHARTQA_INSTRUCTION = "Answer the question with a single word."  # ref §2.3
HRBENCH_INSTRUCTION = "Answer the option letter directly."  # ref §2.7
MMERW_INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. "
                     "Respond with only the letter (A, B, C, D, or E) of the correct option.\n"
                     "The best answer is: ")  # ref §2.6, trailing space included
DEFAULT_MAX_NEW_TOKENS = 128  # ref §1.5: the wrapper's default, for tasks whose yaml sets none


def option_letters(num_options: int) -> tuple[str, ...]:
    """("A", "B", ...) for `num_options` options."""
    return tuple(chr(ord("A") + i) for i in range(num_options))


# ---- doc_to_text per task -------------------------------------------------------------------------------------

def _textvqa(row: Mapping) -> str:
    # ref §2.1: str.capitalize() lowercases everything after the first character ("NASA" -> "nasa").
    return row["question"].capitalize() + "\n" + ANSWER_SUFFIX


def _short_answer(row: Mapping) -> str:
    return row["question"] + "\n" + ANSWER_SUFFIX  # ref §2.2: the question is neither stripped nor capitalised


def _chartqa(row: Mapping) -> str:
    return row["question"] + "\n" + CHARTQA_INSTRUCTION  # ref §2.3: the wrapper then adds ANSWER_SUFFIX too


def _ocrbench(row: Mapping) -> str:
    return row["question"].strip()  # ref §2.4


# ref §2.5 step 1: the fork's pattern for the "(A) text" options inside V*'s `text` field.
_VSTAR_OPTION = re.compile(r"\([A-D]\)\s*([^()]+?)(?=\s*\([A-D]\)|$)")


def _vstar(row: Mapping) -> str:
    # V*'s dataset field `text` is question, "(A) text" lines and OPTION_INSTRUCTION (ref §2.5); the JSONL row
    # holds its parts, so it is rebuilt here and then re-parsed exactly as the fork does.
    text = "\n".join([row["question"], *_lettered(row["options"], "({}) {}"), OPTION_INSTRUCTION])
    found = _VSTAR_OPTION.findall(text)
    if found:
        # ref §2.5: relabelled A, B, ... in order found; the last option swallows the instruction line, and an
        # option holding "(" or ")" is dropped (the later ones move up a letter).
        question = text.split("(A)")[0].strip()
        text = question + "\n" + "\n".join(f"{letter}. {opt.strip()}"
                                           for letter, opt in zip(option_letters(len(found)), found))
    return text + "\n" + OPTION_INSTRUCTION  # ref §2.5 step 2: the post prompt repeats the instruction


def _mmerw(row: Mapping) -> str:
    # ref §2.6: the yaml's pre/post prompts are ignored; the dataset's options are already "(A) text".
    options = "\n".join(_lettered(row["options"], "({}) {}"))
    return f"{row['question']} The choices are listed below:\n{options}\n{MMERW_INSTRUCTION}"


def _hrbench(row: Mapping) -> str:
    return "\n".join([row["question"].strip(), *_lettered(row["options"], "{}. {}"), HRBENCH_INSTRUCTION])


def _lettered(options, fmt: str) -> list[str]:
    return [fmt.format(letter, text) for letter, text in zip(option_letters(len(options)), options)]


# ---- the task table -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    metric: str  # one of scoring.METRICS: which answer keys a row carries and which scorer family applies
    max_new_tokens: int  # ref §1.9
    doc_to_text: Callable[[Mapping], str]


TASKS: dict[str, Task] = {
    "textvqa": Task("vqa", DEFAULT_MAX_NEW_TOKENS, _textvqa),
    "docvqa": Task("anls", 32, _short_answer),
    "infovqa": Task("anls", 32, _short_answer),
    "chartqa": Task("relaxed", 16, _chartqa),
    "ocrbench": Task("ocrbench", 128, _ocrbench),
    "vstar": Task("option", 16, _vstar),
    "mmerealworld_lite": Task("option", 16, _mmerw),
    "hrbench4k": Task("option", DEFAULT_MAX_NEW_TOKENS, _hrbench),  # ref §2.7: no generation_kwargs
    "hrbench8k": Task("option", DEFAULT_MAX_NEW_TOKENS, _hrbench),
    # Our procedural reading task (qzoom_jax/data/reading.py; no lmms-eval counterpart): prompted like DocVQA,
    # scored by exact match (a 3-digit number or a count: a near miss is a misread, not partial credit); 8 new
    # tokens hold any of its answers.
    "reading": Task("exact", 8, _short_answer),
}


def get_task(task: str) -> Task:
    """The rules of `task`; ValueError naming the known tasks for any other name."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}") from None


def prompt(task: str, row: Mapping) -> str:
    """The user text of one benchmark row: the task's doc_to_text, plus ANSWER_SUFFIX where it is missing
    (ref §1.3, every task, multiple choice included)."""
    text = get_task(task).doc_to_text(row)
    return text if ANSWER_SUFFIX in text else text + "\n" + ANSWER_SUFFIX


def max_new_tokens(task: str) -> int:
    """The task's generation budget (ref §1.9). Decoding is greedy for every task and no stop string applies:
    the fork never reads the yaml's `until` (ref §1.5), so generation runs to EOS or this many tokens."""
    return get_task(task).max_new_tokens


# ref §1.6 step 2: first <answer>...</answer> (DOTALL, non-greedy), else \boxed{ up to the FIRST "}".
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^}]*)\}")


def postprocess(task: str, text: str) -> str:
    """The prediction every scorer of `task` receives ("pred" in the reference): the decoded reply with the
    <answer>/\\boxed{} extraction applied, then stripped (ref §1.6). Nothing truncates it (no stop strings)."""
    get_task(task)
    if match := _ANSWER_TAG.search(text):
        text = match.group(1)
    elif match := _BOXED.search(text):
        text = match.group(1)  # so "\boxed{\frac{1}{2}}" gives "\frac{1"
    return text.strip()
