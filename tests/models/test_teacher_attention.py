"""Stage-1 teacher signal: decode-step-averaged attention to image tokens, against transformers' generate with
``output_attentions`` (the probabilities upstream's forward hooks record, training reference §1.2 step 5)."""

import dataclasses

import numpy as np
import pytest
import torch

from qzoom_jax.models.vlm import QwenVL
from tests.hf_reference import IDS, batch, prompt_ids, random_pixels, tiny_pair, to_torch

GRID = (1, 12, 16)  # 48 merged image tokens
N_IMG = 12 * 16 // 4
CAPTURE = (2, 0)    # out of order on purpose: results come back in the order asked


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("gqa2_win112", text_layers=3)


def _sample(seed, n_text):
    rng = np.random.default_rng(seed)
    inputs = batch([prompt_ids(rng, n_text, [N_IMG])])
    inputs["pixel_values"] = random_pixels(rng, [GRID])
    inputs["image_grid_thw"] = np.array([GRID], np.int64)
    return inputs


def _hf_teacher(hf, inputs, max_new_tokens, eos):
    """mean over decode steps 1..n-1 of P(query = generated token -> key = image token), per layer and head."""
    with torch.no_grad():
        out = hf.generate(**to_torch(inputs), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                          pad_token_id=IDS["pad_token_id"], output_attentions=True, return_dict_in_generate=True)
    img = np.nonzero(inputs["input_ids"][0] == IDS["image_token_id"])[0]
    steps = out.attentions[1:]  # [0] is the prefill; step t's single query is generated token t
    per_layer = [np.mean([s[layer][0, :, 0, img].numpy() for s in steps], axis=0) for layer in CAPTURE]
    return out.sequences[0, inputs["input_ids"].shape[1]:].numpy(), np.stack(per_layer)


def test_teacher_attention_matches_transformers(pair):
    hf, ours = pair
    inputs = _sample(0, 7)
    ref_tokens, ref_attn = _hf_teacher(hf, inputs, 10, IDS["eos_token_id"])
    tokens, attn = ours.generate_with_attention(**inputs, capture_layers=CAPTURE, max_new_tokens=10)
    np.testing.assert_array_equal(tokens[0], ref_tokens)
    assert attn.shape == (2, 1, ours.config.text.num_attention_heads, N_IMG)
    np.testing.assert_allclose(attn[:, 0], ref_attn, rtol=1e-4, atol=1e-7)
    assert ref_attn.max() > 1e-3  # the comparison is not between near-zero maps


def test_batched_rows_that_stop_early_match_one_by_one(pair):
    """A row that hits eos stops contributing queries; padding and batching change nothing."""
    hf, ours = pair
    a, b = _sample(1, 5), _sample(2, 13)
    free = ours.generate(**a, max_new_tokens=8)[0]
    eos = int(free[3])
    if eos in free[:3]:
        pytest.skip("4th token repeats an earlier one; no clean stop position")
    model = QwenVL(dataclasses.replace(ours.config, eos_token_id=eos), ours.params)
    rows = [list(a["input_ids"][0]), list(b["input_ids"][0])]
    both = batch(rows, "left")
    both["pixel_values"] = np.concatenate([a["pixel_values"], b["pixel_values"]])
    both["image_grid_thw"] = np.array([GRID, GRID], np.int64)
    tokens, attn = model.generate_with_attention(**both, capture_layers=CAPTURE, max_new_tokens=8)
    for row, single in enumerate((a, b)):
        ref_tokens, ref_attn = _hf_teacher(hf, single, 8, eos)
        np.testing.assert_array_equal(tokens[row, :len(ref_tokens)], ref_tokens)
        np.testing.assert_allclose(attn[:, row], ref_attn, rtol=1e-4, atol=1e-7)
    assert (tokens[0] == eos).sum() == 1 and tokens[0, 3] == eos  # row 0 really stopped early


def test_single_token_answer_gives_zero_map(pair):
    _, ours = pair
    inputs = _sample(3, 6)
    first = int(ours.generate(**inputs, max_new_tokens=1)[0, 0])
    model = QwenVL(dataclasses.replace(ours.config, eos_token_id=first), ours.params)
    tokens, attn = model.generate_with_attention(**inputs, capture_layers=CAPTURE, max_new_tokens=8)
    assert tokens.shape[1] == 1 and not attn.any()


def test_rows_with_different_image_token_counts_are_rejected(pair):
    _, ours = pair
    rng = np.random.default_rng(4)
    inputs = batch([prompt_ids(rng, 5, [N_IMG]), prompt_ids(rng, 5)])
    inputs["pixel_values"] = random_pixels(rng, [GRID])
    inputs["image_grid_thw"] = np.array([GRID], np.int64)
    with pytest.raises(ValueError, match="same number of image tokens"):
        ours.generate_with_attention(**inputs, capture_layers=CAPTURE)


def test_per_row_token_limits_match_one_by_one(pair):
    """Each record's own max_new_tokens (upstream's universal JSONL field): a row that reaches its limit stops
    adding queries to its map, exactly as transformers' generate with that limit."""
    hf, ours = pair
    a, b = _sample(1, 5), _sample(2, 13)
    both = batch([list(a["input_ids"][0]), list(b["input_ids"][0])], "left")
    both["pixel_values"] = np.concatenate([a["pixel_values"], b["pixel_values"]])
    both["image_grid_thw"] = np.array([GRID, GRID], np.int64)
    tokens, attn = ours.generate_with_attention(**both, capture_layers=CAPTURE, max_new_tokens=[3, 7])
    for row, (single, limit) in enumerate(((a, 3), (b, 7))):
        ref_tokens, ref_attn = _hf_teacher(hf, single, limit, IDS["eos_token_id"])
        np.testing.assert_array_equal(tokens[row, :len(ref_tokens)], ref_tokens)
        np.testing.assert_allclose(attn[:, row], ref_attn, rtol=1e-4, atol=1e-7)
    pad = ours.config.pad_token_id if ours.config.pad_token_id is not None else ours.config.eos_token_id
    assert tokens.shape[1] > 3 and (tokens[0, 3:] == pad).all()  # row 0 stopped at its own limit
