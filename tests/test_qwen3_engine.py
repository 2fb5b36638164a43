"""Q-Zoom end to end on the embedded tiny Qwen3-VL: a Q-Zoom HF directory (upstream's key places and config keys),
transformers loading it, the engine's prompt (the system turn upstream's Qwen3 evaluation inserts) and a zoomed
answer; the bad inputs that must name what is wrong (a checkpoint read as the other backbone, a DeepStack index
past the vision depth); chat turns and fixed-shape training rows on Qwen3-VL."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from qzoom_jax.checkpoints import hf_checkpoint, qzoom_checkpoint
from qzoom_jax.checkpoints.embedded import EMBEDDED_QWEN3_TINY, EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import synthetic
from qzoom_jax.models import registry
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig
from qzoom_jax.models.qzoom import gate as gate_lib
from qzoom_jax.models.qzoom import twig as twig_lib
from qzoom_jax.runtime.errors import CheckpointError, ConfigError
from qzoom_jax.zoom.engine import QZoom

K, T = 3, 2
TOKENS = 32 * 32
BUDGET = {"min_pixels": 32 * TOKENS, "max_pixels": 64 * TOKENS}


@pytest.fixture(scope="module")
def qzoom_dir(tmp_path_factory):
    model = load_pretrained(EMBEDDED_QWEN3_TINY)
    layers = model.params["model"]["layers"]
    parts = qzoom_checkpoint.QZoomParts(model, EMBEDDED_QWEN3_TINY, twig_lib.init_twig_params(layers, K, T),
                                        gate_lib.init_gate_params(layers, K, T, jax.random.key(0)), K, True)
    return qzoom_checkpoint.save_hf(parts, str(tmp_path_factory.mktemp("q3") / "qzoom"), dtype="float32")


def test_qzoom_keys_sit_where_upstream_reads_them(qzoom_dir):
    with open(os.path.join(qzoom_dir, "config.json")) as f:
        raw = json.load(f)
    assert (raw["enable_twig"], raw["twig_K"], raw["twig_T"], raw["enable_high_res"]) == (True, K, T, True)
    assert not any(k.startswith(("twig", "enable", "high_res")) for k in raw["text_config"])  # top level only
    with safe_open(os.path.join(qzoom_dir, "model.safetensors"), "np") as f:
        keys = set(f.keys())
    lm = "model.language_model."
    assert {f"{lm}twig_layers.{T - 1}.self_attn.q_norm.weight", f"{lm}high_res_layers.0.self_attn.k_norm.weight",
            f"{lm}high_res_head.weight", f"{lm}high_res_head.bias"} <= keys
    assert not any(k.startswith(("model.twig", "model.high_res")) for k in keys)
    # transformers' Qwen3-VL reads every base tensor from it; the branches are the only extra keys.
    hf, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(qzoom_dir, output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(k.startswith((f"{lm}twig_layers.", f"{lm}high_res_"))
                                           for k in info["unexpected_keys"])
    ids = np.array([[1000, 1009] + [1012] * 4 + [1010, 5, 6, 7]], np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "image_grid_thw": np.array([[1, 4, 4]]),
              "pixel_values": np.random.default_rng(0).standard_normal((16, 1536)).astype(np.float32)}
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        ref = hf.float().eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                                mm_token_type_ids=torch.from_numpy((ids == 1012).astype(np.int64))).logits.numpy()
    ours = load_pretrained(qzoom_dir).logits(**inputs)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_engine_zooms_with_the_inserted_system_prompt(qzoom_dir):
    engine = QZoom.load(qzoom_dir, attn_impl="einsum")
    assert registry.backbone(engine.config).roi_sink == "first_token" and engine.parts.K == K
    layers = load_pretrained(EMBEDDED_QWEN3_TINY).params["model"]["layers"]  # the branches read back in place
    jax.tree_util.tree_map(np.testing.assert_array_equal, engine.parts.twig, twig_lib.init_twig_params(layers, K, T))
    assert engine.parts.gate["high_res_head"]["kernel"].shape == (128, 1)
    sample = synthetic.make_sample(3, 0)
    prepared = engine.prepare([sample.image], [sample.prompt], **BUDGET)
    text = engine.processor.decode(prepared.inputs["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    a = engine.run(prepared, max_new_tokens=4, roi_threshold=0.0, gate_threshold=0.0)[0]
    (h, w), = prepared.src_hw
    assert a.zoomed and a.box is not None and a.visual_tokens > h * w and a.roi_logits.shape == (h, w)


def test_the_other_backbones_checkpoint_is_an_error_naming_it():
    with open(os.path.join(EMBEDDED_QWEN3_TINY, "config.json")) as f:
        q3 = json.load(f)
    with open(os.path.join(EMBEDDED_TINY, "config.json")) as f:
        q25 = json.load(f)
    with pytest.raises(ConfigError, match="qwen3_vl"):
        QwenVLConfig.from_dict(q3)
    with pytest.raises(ConfigError, match="qwen2_5_vl"):
        Qwen3VLConfig.from_dict(q25)
    # Weights of one backbone read with the other's config: the first tensor that does not fit is named.
    with pytest.raises(CheckpointError, match=r"model\.|visual\."):
        hf_checkpoint.load_params(EMBEDDED_QWEN3_TINY, config=QwenVLConfig.from_dict(q25))
    with pytest.raises(CheckpointError, match=r"model\.|visual\."):
        hf_checkpoint.load_params(EMBEDDED_TINY, config=Qwen3VLConfig.from_dict(q3))
    bad = {**q3, "vision_config": {**q3["vision_config"], "deepstack_visual_indexes": [0, 1, 4]}}
    with pytest.raises(ConfigError, match=r"deepstack_visual_indexes \[0, 1, 4\].*0\.\.3"):
        Qwen3VLConfig.from_dict(bad)


def test_turns_on_qwen3s_template_have_no_default_system_turn():
    """Qwen3-VL's template writes no default system turn: upstream's training text starts at the user turn (the
    cut of ``conversations._turn_text`` once assumed a system turn before it), and the inference format adds the
    system prompt upstream's Qwen3 evaluation inserts; assistant labels are its answer after the 3-token header."""
    from qzoom_jax.data import conversations
    from qzoom_jax.data.processor import Processor

    processor = Processor.from_pretrained(EMBEDDED_QWEN3_TINY)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"},
             {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "a dog"}]
    for chat_format, head in (("upstream", "<|im_start|>user\n"),
                              ("inference", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")):
        msgs = conversations.messages(turns, 1, chat_format=chat_format)
        ids, labels = conversations.tokens_and_labels(msgs, processor, system=chat_format == "inference")
        text = processor.decode(ids)
        assert text.startswith(head) and text.count("<|im_start|>") == 4 + (chat_format == "inference")
        assert processor.decode(labels[labels != -100]) == "a cat<|im_end|>\na dog<|im_end|>\n"


def test_fixed_shape_training_rows_on_qwen3():
    """Stage 3 / SFT / stage 2 stack rows of different image sizes: Backbone.fixed_layout gives Qwen3-VL's full
    attention frame tables equal shapes (Qwen2.5-VL's window tables have their own minima)."""
    from qzoom_jax.data import conversations

    config = registry.read_config(EMBEDDED_QWEN3_TINY)
    grids = [(1, 8, 8), (1, 4, 24), (1, 14, 6)]
    one = [registry.backbone(config).fixed_layout(np.array([g]), config.vision, 256) for g in grids]
    two = [conversations.padded_layout(config, [g], 512, 2, "u") for g in grids]  # + the filler image
    for layouts in (one, two):
        assert len({tuple(a.shape for a in lay) for lay in layouts}) == 1
