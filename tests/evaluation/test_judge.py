"""The local HR-Bench judge (evaluation/judge.py) with a stand-in engine: the prompt it asks, how it calls the
engine, and that a failing judge never crashes scoring."""

from types import SimpleNamespace

import pytest

from qzoom_jax.evaluation import judge, scoring


class StandIn:
    """The QZoom interface (prepare + run); replies `reply`, or raises it when it is an exception."""

    processor = SimpleNamespace(image_processor=SimpleNamespace(factor=28))

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def prepare(self, images, questions, *, min_pixels, max_pixels):
        self.calls.append(("prepare", [im.size for im in images], [im.getpixel((0, 0)) for im in images],
                           questions, min_pixels, max_pixels))
        return questions[0]

    def run(self, prepared, **kwargs):
        self.calls.append(("run", kwargs))
        if isinstance(self.reply, Exception):
            raise self.reply
        return [SimpleNamespace(answer=self.reply)]


def test_judge_prompt_is_the_few_shot_template():
    text = judge.judge_prompt("Which colour is the car?", {"A": "red", "B": "blue"}, "Maybe B or C")
    assert text.startswith("You are an AI assistant who will help me to match an answer with several options")
    assert text.endswith("Example 3: \nQuestion: Which colour is the car?\nOptions: A. red B. blue\n"
                         "Answer: Maybe B or C\nYour output: ")
    assert text.count("Example") == 3 and "Answer: Spider\nYour output: Z\n" in text


def test_engine_judge_asks_the_engine_without_zooming():
    engine = StandIn("The answer is B")
    ask = judge.EngineJudge(engine)
    assert ask("Which colour?", {"A": "red", "B": "blue"}, "Maybe B or C") == "The answer is B"
    (_, sizes, pixels, questions, lo, hi), (_, run_args) = engine.calls
    assert sizes == [(56, 56)] and pixels == [(255, 255, 255)] and lo == hi == 56 * 56  # 4 blank tokens
    assert questions == [judge.judge_prompt("Which colour?", {"A": "red", "B": "blue"}, "Maybe B or C")]
    assert run_args == {"roi_threshold": 1.0, "gate_threshold": 1.0, "max_new_tokens": 16, "zoom": False}
    # through HR-Bench's scoring: the verdict is read with the same matcher; the reply stays "unmatched"
    row = {"question": "Which colour?", "options": ["Red", "Blue"], "answer": "B"}
    assert scoring.score_detail("hrbench8k", "Maybe A or B", row, judge=ask) == (1.0, False)
    assert engine.calls[-2][3][0].endswith("Options: A. red B. blue\nAnswer: Maybe A or B\nYour output: ")
    assert ask.calls == 2 and ask.errors == 0


@pytest.mark.parametrize("failure", [RuntimeError("device lost"), ValueError("bad"), KeyError("x")])
def test_a_failing_judge_scores_the_reply_zero_and_is_counted(failure, caplog):
    ask = judge.EngineJudge(StandIn(failure))
    row = {"question": "Which colour?", "options": ["red", "blue"], "answer": "A"}
    for _ in range(7):
        assert scoring.score_detail("hrbench4k", "no idea", row, judge=ask) == (0.0, False)
    assert (ask.calls, ask.errors) == (7, 7)
    assert len([r for r in caplog.records if "judge failed" in r.getMessage()]) == 5  # then quiet
