"""The public API end to end on the embedded default, against transformers loading the same directory."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file

import qzoom_jax


@pytest.fixture(scope="module")
def inputs():
    proc = qzoom_jax.Processor.from_pretrained(qzoom_jax.EMBEDDED_DEFAULT)
    rng = np.random.default_rng(0)
    # 308x420 and 140x560 px (W x H): 22x30 and 40x10 patch grids under the tiny budget.
    images = [Image.fromarray(rng.integers(0, 255, (420, 308, 3), np.uint8)),
              Image.fromarray(rng.integers(0, 255, (140, 560, 3), np.uint8))]
    prompts = [proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": q}]}]) for q in ("What is in the picture?", "Color?")]
    return proc, proc(images=images, text=prompts)


def test_embedded_default_matches_transformers(inputs):
    proc, batch = inputs
    assert batch["image_grid_thw"].tolist() == [[1, 30, 22], [1, 10, 40]]
    model = qzoom_jax.load_pretrained()  # no path: the embedded default
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        qzoom_jax.EMBEDDED_DEFAULT, dtype=torch.float32, attn_implementation="eager").eval()
    torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        ref = hf(**torch_batch).logits.numpy()
        ref_tokens = hf.generate(**torch_batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    got = model.logits(**batch)
    valid = batch["attention_mask"].astype(bool)
    err = np.abs(got - ref)[valid].max() / np.abs(ref[valid]).max()
    print(f"embedded default: max|dlogits|/max|logits| = {err:.2e}")
    assert err <= 1e-4
    tokens = model.generate(**batch, max_new_tokens=8)
    np.testing.assert_array_equal(tokens, ref_tokens.numpy())
    assert len(proc.batch_decode(tokens, skip_special_tokens=True)) == 2


def test_bf16_load_runs_close_to_float32(inputs):
    _, batch = inputs
    f32 = qzoom_jax.load_pretrained(dtype="float32").logits(**batch)
    bf16 = qzoom_jax.load_pretrained(dtype="bfloat16")
    assert bf16.params["model"]["embed_tokens"]["embedding"].dtype == np.dtype("bfloat16")
    got = bf16.logits(**batch)
    valid = batch["attention_mask"].astype(bool)
    err, scale = np.abs(got - f32)[valid], np.abs(f32[valid]).max()
    # The sharpened tiny checkpoint has peaked attention, where bf16 rounding moves a few logits the most.
    assert err.max() <= 0.1 * scale and err.mean() <= 0.01 * scale


@pytest.mark.parametrize("generator", ["make_tiny_checkpoint", "make_tiny_qwen3_vl"])
def test_committed_random_checkpoints_are_what_their_generators_write(generator, tmp_path):
    """A generator changed without regenerating its asset leaves users on a stale checkpoint."""
    module = importlib.import_module(f"qzoom_jax.assets.{generator}")
    committed = module.DEFAULT_OUT
    module.main(["--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(committed))
    for name in os.listdir(committed):
        if name.endswith(".json"):
            with open(tmp_path / name) as a, open(os.path.join(committed, name)) as b:
                assert json.load(a) == json.load(b), name
    fresh, kept = load_file(tmp_path / "model.safetensors"), load_file(os.path.join(committed, "model.safetensors"))
    assert fresh.keys() == kept.keys()
    for key in kept:
        np.testing.assert_allclose(fresh[key], kept[key], rtol=1e-6, atol=1e-7, err_msg=key)
