"""The processor on Qwen3-VL's files (16-px patches, 32-px merged units, mean/std 0.5, the ``size`` form of the pixel
budget, Qwen3-VL's chat template) against transformers' Qwen3VLProcessor(return_tensors="np", padding=True), both
resize paths; its files checked against the model's vision tower; video placeholders refused."""

import importlib.util
import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.processor import Processor
from qzoom_jax.runtime.errors import ConfigError, DataError
from tests.data.test_processor import _assert_same, _rand_image

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision is not installed")
QWEN3_VISION = {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}


def _hf_processor(directory, image_processor):
    """transformers' Qwen3VLProcessor around ``image_processor`` read from ``directory``; the video processor's
    class check is skipped (no video processor, as in conftest's Qwen2.5-VL reference)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class NoVideoProcessor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    with open(f"{directory}/chat_template.json", encoding="utf-8") as f:
        template = json.load(f)["chat_template"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NoVideoProcessor(image_processor=image_processor.from_pretrained(directory),
                                tokenizer=AutoTokenizer.from_pretrained(directory), video_processor=None,
                                chat_template=template)


def _hf_call(hf, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf(return_tensors="np", padding=True, **kwargs)


def _batch(processor):
    """Prompt 0: a system turn and three images in one turn; prompt 1: three images over two turns. Sizes: odd ones,
    one over the tiny max budget, one under the min, one RGBA, one side of exactly 32 px."""
    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [img, img, img, txt("Same?")]}]
    second = [{"role": "user", "content": [img, txt("And this one?")]}, {"role": "assistant", "content": "No."},
              {"role": "user", "content": [img, img, txt("Describe " * 12)]}]
    texts = [processor.apply_chat_template(first), processor.apply_chat_template(second)]
    images = [_rand_image(308, 421, seed=1), _rand_image(140, 560, seed=2), _rand_image(900, 1300, seed=3),
              _rand_image(33, 47, seed=4), _rand_image(90, 77, "RGBA", seed=5), _rand_image(32, 500, seed=6)]
    return texts, images


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matches_hf_qwen3_vl_processor(tiny_qwen3_dir, padding_side):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Processor.from_pretrained(tiny_qwen3_dir)
    texts, images = _batch(processor)
    out = processor(images=images, text=texts, padding_side=padding_side)
    ref = _hf_call(_hf_processor(tiny_qwen3_dir, Qwen2VLImageProcessorPil), images=images, text=texts,
                   padding_side=padding_side)
    _assert_same(out, ref)
    # 16-px patches of 3 * 2 * 16 * 16 values, in 32-px merged units; the budget of the size form was applied.
    assert out["pixel_values"].shape[1] == 1536 and (out["image_grid_thw"][:, 1:] % 2 == 0).all()
    tokens = out["image_grid_thw"].prod(1) // 4
    assert tokens.max() <= 256 and tokens.min() >= 4 and out["mm_token_type_ids"].sum() == tokens.sum()


@needs_torchvision
def test_fast_resize_matches_hf_torchvision_processor(tiny_qwen3_dir):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    processor = Processor.from_pretrained(tiny_qwen3_dir, resize="fast")
    texts, images = _batch(processor)
    hf = _hf_processor(tiny_qwen3_dir, Qwen2VLImageProcessor)
    assert hf.image_processor.backend == "torchvision"
    _assert_same(processor(images=images, text=texts), _hf_call(hf, images=images, text=texts))


def test_settings_are_read_like_hf(tiny_qwen3_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ours = Processor.from_pretrained(tiny_qwen3_dir).image_processor
    hf = Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen3_dir)
    assert (ours.patch_size, ours.merge_size, ours.factor, ours.image_mean, ours.image_std) == (
        hf.patch_size, hf.merge_size, 32, tuple(hf.image_mean), tuple(hf.image_std)) == (16, 2, 32, (0.5,) * 3,
                                                                                         (0.5,) * 3)
    assert (ours.min_pixels, ours.max_pixels) == (hf.size["shortest_edge"], hf.size["longest_edge"])


def _checkpoint(tmp_path, source, vision, drop_preprocessor=False):
    out = tmp_path / "ckpt"
    shutil.copytree(source, out)
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": vision}))
    if drop_preprocessor:
        (out / "preprocessor_config.json").unlink()
    return out


def test_files_of_another_backbone_are_refused(tmp_path, tiny_dir, tiny_qwen3_dir):
    assert Processor.from_pretrained(_checkpoint(tmp_path / "ok", tiny_qwen3_dir, QWEN3_VISION))
    wrong = _checkpoint(tmp_path / "wrong", tiny_dir, QWEN3_VISION)  # Qwen2.5-VL's 14-px preprocessor_config.json
    with pytest.raises(ConfigError, match=r"preprocessor_config.json: patch_size 14 does not match "
                                          r"vision_config.patch_size = 16 in .*config.json"):
        Processor.from_pretrained(wrong)
    missing = _checkpoint(tmp_path / "missing", tiny_qwen3_dir, QWEN3_VISION, drop_preprocessor=True)
    with pytest.raises(ConfigError, match="no preprocessor_config.json, and the default patch_size 14 does not match"):
        Processor.from_pretrained(missing)
    merge = _checkpoint(tmp_path / "merge", tiny_qwen3_dir, {**QWEN3_VISION, "spatial_merge_size": 4})
    with pytest.raises(ConfigError, match="merge_size 2 does not match vision_config.spatial_merge_size = 4"):
        Processor.from_pretrained(merge)


def test_video_placeholder_is_an_error_naming_it(tiny_qwen3_dir):
    processor = Processor.from_pretrained(tiny_qwen3_dir)
    video = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"text": "What?"}]}])
    image = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"text": "<|video_pad|>"}]}])
    with pytest.raises(DataError, match=r"^prompt 1 of the batch holds the video placeholder <\|video_pad\|> "):
        processor(images=[Image.new("RGB", (64, 64))], text=[image, video])
    # A literal "<|video_pad|>" typed into a question is text, not a placeholder.
    assert processor(images=[Image.new("RGB", (64, 64))], text=[image])["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert np.all(processor(text=["<|vision_start|>x"])["mm_token_type_ids"] == 0)
