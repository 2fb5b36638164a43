"""Shared fixtures: the tiny tokenizer directories (Qwen2.5-VL, Qwen3-VL) and the HF reference processor built from
them, offline."""

import warnings

import pytest

from qzoom_jax.data.tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """The tiny tokenizer with Qwen3-VL's added tokens, chat template and image settings."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_qwen3"), backbone="qwen3_vl")


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def make_hf_processor(hf_tokenizer):
    """Factory: HF Qwen2_5_VLProcessor around the torchvision-free PIL image processor.

    AutoProcessor cannot be used here: without torchvision it fails on the (unused) video processor, so the
    processor is built by hand with the video processor's class check skipped; everything else is HF's code.
    """
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class NoVideoProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name != "video_processor":
                return super().check_argument_for_proper_class(argument_name, argument)

    def make(min_pixels, max_pixels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return NoVideoProcessor(
                image_processor=Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels),
                tokenizer=hf_tokenizer,
                video_processor=None,
                chat_template=hf_tokenizer.chat_template,
            )

    return make
