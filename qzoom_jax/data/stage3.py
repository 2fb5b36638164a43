"""Stage-3 (dynamic gate) data: consistency-aware labels from multi-resolution answers (training reference §4).

An *answer record* holds one question answered by a model at several visual-token budgets:
``uid, image (encoded bytes), image_path, prompt, text (the ground truth), res (budgets, increasing),
ms_answers (the answer at each budget)``. Label generation writes them (``qzoom_jax.labelling.gate_labels``), or they come
from an upstream stage-3 pickle (:func:`read_stage3_pickle`). The rules below run when training reads them, so
the raw answers stay inspectable:

* :func:`classify` / :func:`select_pool` — which records train the gate (§4.2): the two highest-budget answers
  must agree and match the ground truth; records whose wrong answers are exactly the lowest budgets are *hard*,
  all-correct ones *easy*; the pool is every hard record plus as many easy ones (seeded), optionally capped.
* :func:`draw` — the label and input budget of one fetch (§4.3), re-drawn every epoch from an explicit RNG
  seeded by (seed, epoch, index) (:func:`fetch_rng`), so runs are deterministic and resumable (fixes §8 #14).

Two upstream quirks are fixed (§8 #13): an empty answer matches nothing (upstream's substring test makes it match
everything, so a blank low-resolution answer counted as right and a blank consensus as the ground truth), and
the ground truth is normalised like the answers (upstream only lowercases it, so "St. Louis" never matched
"st louis").
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from qzoom_jax.runtime.buckets import bucket
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.data import stage1
from qzoom_jax.data.processor import Processor, PromptTooLongError
from qzoom_jax.data.prompts import ANSWER_SUFFIX
from qzoom_jax.models import registry

HIGH = 2  # high_res_group_num: the consensus group is the answers at the HIGH highest budgets
P_HARD_POSITIVE = 0.9  # a hard record is drawn as "needs high resolution" (label 1) with this probability
CATEGORIES = ("hard", "easy", "unstable", "hallucinated", "non_monotone", "short_ladder")

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


# ---- consistency rules (§4.2) ---------------------------------------------------------------------------

def normalize(answer: str) -> str:
    """Lowercase, strip, delete ASCII punctuation (upstream's order: inner spaces left by deletions stay)."""
    return answer.lower().strip().translate(_DELETE_PUNCTUATION)


def matches(a: str, b: str) -> bool:
    """Normalised answers match when one contains the other; an empty answer matches nothing (§8 #13 fix)."""
    return bool(a) and bool(b) and (a in b or b in a)


def _analyse(answers: Sequence[str], gt: str, high: int):
    """(category, wrong indices, correct indices) of one record's answers."""
    norm = [normalize(a) for a in answers]
    if len(norm) <= high:  # no budget below the consensus group: nothing to label
        return "short_ladder", [], []
    target = norm[-1]
    if any(a != target for a in norm[-high:]):
        return "unstable", [], []
    if not matches(target, normalize(gt)):
        return "hallucinated", [], []
    wrong = [i for i, a in enumerate(norm) if not matches(a, target)]
    correct = [i for i, a in enumerate(norm) if matches(a, target)]
    if not wrong:
        return "easy", wrong, correct
    if wrong != list(range(len(wrong))):  # right, then wrong again as the budget grows
        return "non_monotone", wrong, correct
    return "hard", wrong, correct


def classify(answers: Sequence[str], gt: str, high: int = HIGH) -> str:
    """One of CATEGORIES: "hard" (wrong exactly at the lowest budgets) and "easy" (always right) are kept."""
    return _analyse(answers, gt, high)[0]


def select_pool(categories: Sequence[str], seed: int, roi_samples: int = 0) -> list[int]:
    """Indices of the training pool: every hard record plus ``min(|hard|, |easy|)`` easy ones drawn with
    ``seed`` (upstream draws them unseeded, differently on every rank), then, if ``roi_samples`` is set and
    smaller, the first ``roi_samples`` after a shuffle seeded with 42 (as upstream)."""
    hard = [i for i, c in enumerate(categories) if c == "hard"]
    easy = [i for i, c in enumerate(categories) if c == "easy"]
    pool = hard + sorted(random.Random(seed).sample(easy, min(len(hard), len(easy))))
    if roi_samples and len(pool) > roi_samples:
        random.Random(42).shuffle(pool)
        pool = sorted(pool[:roi_samples])
    return pool


# ---- per-fetch label and budget (§4.3) ------------------------------------------------------------------

def fetch_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The RNG of one fetch: a pure function of (seed, epoch, index), whatever the worker or process count."""
    return np.random.default_rng([seed, epoch, index])


def draw(answers: Sequence[str], gt: str, res: Sequence[int], rng: np.random.Generator,
         high: int = HIGH) -> tuple[int, int] | None:
    """(label, budget) for one fetch, or None when this fetch has no label (upstream's -100).

    Easy: label 0 at a budget drawn uniformly among the correct ones below the top ``high``. Hard: with
    probability 0.9 label 1 at one of the two highest still-wrong budgets; otherwise label 0 at a correct budget
    below the top ``high`` if there is one, else None.
    """
    category, wrong, correct = _analyse(answers, gt, high)
    below_top = [i for i in correct if i < len(res) - high]
    if category == "hard" and rng.random() < P_HARD_POSITIVE:
        return 1, int(res[rng.choice(wrong[-2:])])
    if category in ("hard", "easy") and below_top:
        return 0, int(res[rng.choice(below_top)])
    return None


def max_drawn_budget(res: Sequence[int], high: int = HIGH) -> int:
    """The largest budget :func:`draw` can pick for this ladder: the highest one below the consensus group."""
    return int(res[-high - 1]) if len(res) > high else 0


# ---- prompts ---------------------------------------------------------------------------------------------

def short_answer_prompt(prompt: str) -> str:
    """The question with the short-answer instruction the answers were generated with (idempotent)."""
    prompt = stage1.student_prompt(prompt)
    return prompt if ANSWER_SUFFIX in prompt else f"{prompt}\n{ANSWER_SUFFIX}"


# ---- upstream pickle -------------------------------------------------------------------------------------

_PICKLE_KEYS = ("image", "prompt", "text", "res", "ms_answers")


def read_stage3_pickle(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                       skipped: collections.Counter | None = None) -> Iterator[dict]:
    """Answer records from an upstream stage-3 pickle as-is: a dict ``{key: {id, image, prompt, text, res,
    ms_answers}}`` (§4.1). The key becomes ``uid``; images resolve against ``image_root``, by default the
    pickle's directory as upstream does (§8 #7). Missing or unreadable images are skipped and counted in
    ``skipped["missing_image"]``; malformed entries are errors naming the file and key. Only open pickles you
    trust: unpickling can run arbitrary code.
    """
    path = os.fspath(path)
    image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else os.fspath(image_root)
    with open(path, "rb") as f:
        rows = pickle.load(f)
    if not isinstance(rows, Mapping):
        raise TypeError(f"{path}: expected a dict {{key: record}}, got {type(rows).__name__}")
    skips = stage1.SkipLog(path, skipped)
    for key, row in rows.items():
        where = f"{path}[{key!r}]"
        if not isinstance(row, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(row).__name__}")
        missing = [k for k in _PICKLE_KEYS if k not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        res, answers = _ladder(row["res"], row["ms_answers"], where)
        data = stage1.read_image_file(os.path.join(image_root, row["image"]))
        if data is None:
            skips.skip(where, f"missing or unreadable image {row['image']!r}")
            continue
        yield {"uid": str(key), "image": data, "image_path": str(row["image"]), "prompt": str(row["prompt"]),
               "text": str(row["text"]), "res": res, "ms_answers": answers}
    skips.close()


def _ladder(res, answers, where: str) -> tuple[np.ndarray, list[str]]:
    budgets = np.asarray(res)
    if budgets.ndim != 1 or not len(budgets) or not np.issubdtype(budgets.dtype, np.integer):
        raise ValueError(f"{where}: res must be a non-empty list of token budgets, got {res!r}")
    if (budgets <= 0).any() or (np.diff(budgets) <= 0).any():
        raise ValueError(f"{where}: res must be positive and strictly increasing, got {budgets.tolist()}")
    if isinstance(answers, str) or len(answers) != len(budgets):
        raise ValueError(f"{where}: ms_answers must hold one answer per budget ({len(budgets)}), got {answers!r}")
    return budgets.astype(np.int32), ["" if a is None else str(a) for a in answers]


# ---- training examples -----------------------------------------------------------------------------------

def max_patches(max_budget: int, merge_unit: int) -> int:
    """Patch rows every example is padded to: 1.5x the largest drawn budget (min = max pixels can round the
    grid up on both sides), bucketed. Longer inputs are skipped."""
    return bucket(merge_unit * -(-3 * max_budget // 2), 64)


def make_example(record: Mapping[str, Any], processor: Processor, config: QwenVLConfig, *, seed: int,
                 max_len: int, n_patches: int, high: int = HIGH) -> dict[str, np.ndarray]:
    """One stage-3 training example with fixed shapes, for the fetch ``(record["epoch"], record["index"])``.

    The label and budget are drawn (:func:`draw`); the image is resized to ``budget`` merged tokens (min = max
    pixels, aspect kept, no padding) and its patches padded to ``n_patches`` rows, with the row's own vision
    layout (``layout_*`` keys, equal shapes for every row). Returns ``input_ids``/``attention_mask`` int32
    [max_len] left-padded (the query, the last prompt token, is at max_len-1), ``positions`` float32
    [3, max_len], ``pixel_values`` float32 [n_patches, C], ``label`` and ``budget`` int32 scalars.

    Raises SkipSample when this fetch draws no label, or for a corrupt/tiny/elongated image, more patches than
    ``n_patches`` or window tables, or a prompt longer than ``max_len`` tokens.
    """
    uid = record.get("uid", "?")
    drawn = draw(record["ms_answers"], record["text"], record["res"],
                 fetch_rng(seed, int(record["epoch"]), int(record["index"])), high)
    if drawn is None:
        raise stage1.SkipSample(f"{uid}: no label at this fetch (a transition with only the top answers right "
                                f"drew the 10 % label-0 branch)")
    label, budget = drawn
    factor = processor.image_processor.factor
    try:
        image = stage1.decode_image(record["image"], factor)
    except stage1.SkipSample as e:
        raise stage1.SkipSample(f"{uid}: {e}") from None
    pixels = budget * factor ** 2
    try:
        out = processor(images=[image], text=[stage1.chat_text(short_answer_prompt(record["prompt"]), processor)],
                        min_pixels=pixels, max_pixels=pixels)
    except PromptTooLongError as e:  # one record's problem: skipped and counted, the run goes on
        raise stage1.SkipSample(f"{uid}: {e}") from None
    n, patches = out["input_ids"].shape[1], out["pixel_values"].shape[0]
    if n > max_len:
        raise stage1.SkipSample(f"{uid}: prompt is {n} tokens at budget {budget}, longer than max_len={max_len}")
    if patches > n_patches:
        raise stage1.SkipSample(f"{uid}: {patches} patches at budget {budget}, more than n_patches={n_patches}")
    try:
        layout = registry.backbone(config).fixed_layout(out["image_grid_thw"], config.vision, n_patches)
    except ValueError as e:
        raise stage1.SkipSample(f"{uid}: {e}") from None

    input_ids, attention_mask, positions = stage1.padded(config, out["input_ids"][0], max_len,
                                                              out["image_grid_thw"])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "positions": positions,
        "pixel_values": np.pad(out["pixel_values"].astype(np.float32), ((0, n_patches - patches), (0, 0))),
        "label": np.int32(label),
        "budget": np.int32(budget),
        **{f"layout_{name}": value for name, value in layout._asdict().items()},
    }


def layout_of(batch: Mapping[str, Any], config: QwenVLConfig):
    """The per-row vision layouts of a batch of :func:`make_example` outputs (arrays with a leading batch axis)."""
    layout_type = registry.backbone(config).layout_type
    return layout_type(**{name: batch[f"layout_{name}"] for name in layout_type._fields})
