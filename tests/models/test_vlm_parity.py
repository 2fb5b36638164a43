"""Parity of the full model (vision + splice + decoder + lm_head, and greedy generation) with transformers."""

import dataclasses

import numpy as np
import pytest
import torch

from qzoom_jax.models.vlm import QwenVL
from tests.hf_reference import TINY_CONFIGS, IDS, batch, prompt_ids, random_pixels, tiny_pair, to_torch

# Two images of different odd sizes: 308x420 px -> 22x30 patches, 140x560 px -> 10x40 patches.
GRIDS = [(1, 22, 30), (1, 10, 40)]
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    return request.param, *tiny_pair(request.param)


def _image_batch(rng, padding_side):
    rows = [prompt_ids(rng, 5, [22 * 30 // 4]), prompt_ids(rng, 11, [10 * 40 // 4])]
    inputs = batch(rows, padding_side)
    inputs["pixel_values"] = random_pixels(rng, GRIDS)
    inputs["image_grid_thw"] = np.array(GRIDS, np.int64)
    return inputs


def _rel_err(hf, ours, inputs):
    with torch.no_grad():
        ref = hf(**to_torch(inputs)).logits.numpy()
    got = ours.logits(**inputs)
    assert got.shape == ref.shape
    valid = inputs["attention_mask"].astype(bool)  # padded positions carry no meaning in either library
    return float(np.abs(ref - got)[valid].max() / np.abs(ref[valid]).max())


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_two_images_padded(pair, padding_side):
    name, hf, ours = pair
    err = _rel_err(hf, ours, _image_batch(np.random.default_rng(1), padding_side))
    print(f"{name} {padding_side}-padded: max|dlogits|/max|logits| = {err:.2e}")
    assert err <= TOL


def test_logits_two_images_in_one_prompt(pair):
    name, hf, ours = pair
    rng = np.random.default_rng(2)
    rows = [prompt_ids(rng, 4, [22 * 30 // 4, 10 * 40 // 4]), prompt_ids(rng, 30)]
    inputs = batch(rows, "left")
    inputs["pixel_values"] = random_pixels(rng, GRIDS)
    inputs["image_grid_thw"] = np.array(GRIDS, np.int64)
    err = _rel_err(hf, ours, inputs)
    print(f"{name} two images in one row + text-only row: {err:.2e}")
    assert err <= TOL


def test_logits_text_only(pair):
    name, hf, ours = pair
    inputs = batch([prompt_ids(np.random.default_rng(3), 21)])
    assert _rel_err(hf, ours, inputs) <= TOL


def test_greedy_generation_matches(pair):
    name, hf, ours = pair
    inputs = _image_batch(np.random.default_rng(4), "left")
    with torch.no_grad():
        ref = hf.generate(**to_torch(inputs), max_new_tokens=16, do_sample=False,
                          eos_token_id=IDS["eos_token_id"], pad_token_id=IDS["pad_token_id"])
    ref_new = ref[:, inputs["input_ids"].shape[1]:].numpy()
    got = ours.generate(**inputs, max_new_tokens=16)
    np.testing.assert_array_equal(got, ref_new)
    assert got.shape[1] == 16 or (got == IDS["eos_token_id"]).any(axis=1).all()


def test_generation_stops_at_eos(pair):
    """Make <|im_end|> the model's 4th greedy token: both libraries stop there, and so do we."""
    name, hf, ours = pair
    inputs = batch([prompt_ids(np.random.default_rng(5), 9)])
    free_run = ours.generate(**inputs, max_new_tokens=6)[0]
    eos = int(free_run[3])
    if eos in free_run[:3]:
        pytest.skip("4th token repeats an earlier one; no clean stop position")
    stopped = _with_eos(ours, eos).generate(**inputs, max_new_tokens=16)
    with torch.no_grad():
        ref = hf.generate(**to_torch(inputs), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                          pad_token_id=IDS["pad_token_id"])
    np.testing.assert_array_equal(stopped[0], free_run[:4])
    np.testing.assert_array_equal(stopped, ref[:, inputs["input_ids"].shape[1]:].numpy())


def _with_eos(model, eos):
    return QwenVL(dataclasses.replace(model.config, eos_token_id=eos), model.params)


@pytest.mark.parametrize("penalty", [1.3, 2.0])
def test_repetition_penalty_matches_transformers(pair, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor (prompt ids, padding included, and generated ids) for 16
    greedy steps on a padded batch; the penalty must change the tokens, or the test would prove nothing."""
    name, hf, ours = pair
    inputs = _image_batch(np.random.default_rng(4), "left")
    with torch.no_grad():
        ref = hf.generate(**to_torch(inputs), max_new_tokens=16, do_sample=False, repetition_penalty=penalty,
                          eos_token_id=IDS["eos_token_id"], pad_token_id=IDS["pad_token_id"])
    got = ours.generate(**inputs, max_new_tokens=16, repetition_penalty=penalty)
    np.testing.assert_array_equal(got, ref[:, inputs["input_ids"].shape[1]:].numpy())
    assert not np.array_equal(got, ours.generate(**inputs, max_new_tokens=16, repetition_penalty=1.0))
    # the checkpoint's value (generation_config.json) is the default; an explicit argument overrides it
    default = dataclasses.replace(ours, repetition_penalty=penalty)
    np.testing.assert_array_equal(default.generate(**inputs, max_new_tokens=16), got)
