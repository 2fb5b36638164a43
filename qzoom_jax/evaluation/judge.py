"""Local judges: a stand-in for HR-Bench's GPT judge (lmms-eval-tasks.md §2.7 step 3), and the correctness judge of
stage-2 mining (``CorrectnessJudge``, training reference §2.1 step C).

The fork sends a reply that its local matcher cannot resolve to gpt-4o with a fixed few-shot prompt and reads the
judge's answer with the same matcher; offline its run aborts on the first such reply. Here the judge is optional
(configs/eval.py ``judge``): without one such a reply scores 0 and is counted as unmatched; with one, a Q-Zoom
engine (the evaluated model or another checkpoint) answers the prompt below by plain greedy decoding. Its verdicts
are not gpt-4o's, so numbers produced with a judge say so (the task summary's ``judge``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from PIL import Image

log = logging.getLogger(__name__)

# The layout of VLMEvalKit's option-matching prompt, which the fork's judge follows (two worked examples, then the
# case). The reference does not quote the fork's exact string; this is the widely used form.
PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice "
    "question. You are provided with a question, several options, and an answer, and you need to find which "
    "option is most similar to the answer. If the meaning of all options are significantly different from the "
    "answer, output Z. Your should output a single uppercase character in A, B, C, D (if they are valid options), "
    "and Z. \n"
    "Example 1: \nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \nQuestion: {question}?\nOptions: {options}\nAnswer: {answer}\nYour output: "
)
MAX_NEW_TOKENS = 16  # a letter, or a short sentence around one; the matcher reads either
_MAX_WARNINGS = 5
# The engine takes one image per question and the judge needs none: the smallest image the processor accepts
# (2x2 merged tokens), blank, so that the prompt costs almost nothing beyond its text.
_BLANK_SIDE_TOKENS = 2


def judge_prompt(question: str, options: Mapping[str, str], prediction: str) -> str:
    """The judge's user text for one reply; `options` maps letters to option texts (scoring.Judge's arguments)."""
    listed = " ".join(f"{letter}. {text}" for letter, text in options.items())  # as in the examples
    # The template supplies the question mark.
    return PROMPT.format(question=question.strip().rstrip("?"), options=listed, answer=prediction)


class EngineJudge:
    """A ``scoring.Judge`` answered by `engine` (the QZoom interface: prepare + run) without zooming.

    Never raises: the judge only decides the score of a reply nothing else could read, so a failed call is logged,
    counted in ``errors`` and answered "" (no option: the reply scores 0, as without a judge)."""

    def __init__(self, engine, max_new_tokens: int = MAX_NEW_TOKENS):
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.calls = self.errors = 0

    def __call__(self, question: str, options: Mapping[str, str], prediction: str) -> str:
        self.calls += 1
        try:
            side = _BLANK_SIDE_TOKENS * self.engine.processor.image_processor.factor
            blank = Image.new("RGB", (side, side), (255, 255, 255))
            prepared = self.engine.prepare([blank], [judge_prompt(question, options, prediction)],
                                           min_pixels=side * side, max_pixels=side * side)
            answer = self.engine.run(prepared, roi_threshold=1.0, gate_threshold=1.0,
                                     max_new_tokens=self.max_new_tokens, zoom=False)[0]
            return answer.answer
        except Exception as e:  # noqa: BLE001 -- any failure of the judge leaves the reply unresolved, never a crash
            self.errors += 1
            if self.errors <= _MAX_WARNINGS:
                log.warning("judge failed on %r (%s: %s); the reply scores 0", prediction, type(e).__name__, e)
            return ""


# ---- stage-2 mining: is an answer right? -------------------------------------------------------------------
# The reference does not have upstream's judge prompt (its worker scripts are missing, §2.1 / §8 #9): ours asks
# for one word, so a reply is read without guessing.
CORRECTNESS_PROMPT = (
    "You are grading an answer to a question about an image.\n"
    "Question: {question}\nReference answer: {reference}\nCandidate answer: {candidate}\n"
    "Does the candidate answer mean the same as the reference answer? Reply with one word: yes or no."
)
_YES, _NO = ("yes", "correct", "true"), ("no", "incorrect", "wrong", "false")


def correctness_prompt(question: str, reference: str, candidate: str) -> str:
    return CORRECTNESS_PROMPT.format(question=question.strip(), reference=reference.strip(),
                                     candidate=candidate.strip())


def parse_verdict(reply: str) -> bool | None:
    """True / False from a reply whose first word is yes / no (or correct / incorrect ...); None ("no
    decision") for anything else, never a guess."""
    words = reply.strip().lower().split()
    first = words[0].strip(".,:;!\"'*()[]") if words else ""
    return True if first in _YES else False if first in _NO else None


class CorrectnessJudge:
    """An LLM-as-a-judge for answers: ``engine`` (the QZoom interface, no zoom) answers the correctness prompt
    for a batch at a time; ``__call__`` returns True / False / None (no decision) per answer."""

    def __init__(self, engine, batch_size: int = 8, max_new_tokens: int = 4):
        self.engine, self.batch_size, self.max_new_tokens = engine, batch_size, max_new_tokens

    def __call__(self, questions, references, candidates) -> list[bool | None]:
        side = _BLANK_SIDE_TOKENS * self.engine.processor.image_processor.factor
        blank = Image.new("RGB", (side, side), (255, 255, 255))
        prompts = [correctness_prompt(q, r, c) for q, r, c in zip(questions, references, candidates)]
        verdicts = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one compiled shape per batch size
            prepared = self.engine.prepare([blank] * len(padded), padded, min_pixels=side * side,
                                           max_pixels=side * side)
            answers = self.engine.run(prepared, max_new_tokens=self.max_new_tokens, zoom=False)
            verdicts += [parse_verdict(a.answer) for a in answers[:len(chunk)]]
        return verdicts
