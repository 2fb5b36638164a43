"""config.json in the two layouts found in the wild, Q-Zoom keys, and clear errors."""

import json

import pytest
import transformers

from qzoom_jax.models import registry
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from tests.hf_reference import official_config

# The official Qwen2.5-VL-7B-Instruct config.json (transformers-4.x flat layout), values from reference §1.1.
OFFICIAL_7B = official_config("7B")


def test_official_flat_layout():
    c = QwenVLConfig.from_dict(OFFICIAL_7B)
    assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.num_attention_heads,
            c.text.num_key_value_heads, c.text.head_dim, c.text.vocab_size) == (3584, 28, 28, 4, 128, 152064)
    assert c.text.mrope_section == (16, 24, 24) and c.text.rope_theta == 1e6 and not c.text.tie_word_embeddings
    assert c.vision.fullatt_block_indexes == (7, 15, 23, 31) and c.vision.out_hidden_size == 3584
    assert c.vision.in_channels == 3 and c.vision.window_size == 112 and c.vision.head_dim == 80
    assert (c.image_token_id, c.vision_start_token_id, c.vision_end_token_id, c.eos_token_id) == (
        151655, 151652, 151653, 151645)


def test_nested_v5_layout_equals_flat():
    """transformers 5 re-serialises the official config with text_config / rope_parameters: same model."""
    nested = transformers.Qwen2_5_VLConfig(**OFFICIAL_7B).to_dict()
    assert "text_config" in nested and "rope_parameters" in nested["text_config"]
    assert QwenVLConfig.from_dict(nested) == QwenVLConfig.from_dict(OFFICIAL_7B)


def test_write_read_round_trip_and_transformers_reads_it(tmp_path):
    c = QwenVLConfig.from_dict(OFFICIAL_7B)
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    assert registry.read_config(tmp_path) == c
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.text_config.hidden_size == 3584 and hf.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    assert hf.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_tied_flag_in_either_place():
    assert QwenVLConfig.from_dict({**OFFICIAL_7B, "tie_word_embeddings": True}).text.tie_word_embeddings
    nested = transformers.Qwen2_5_VLConfig(**{**OFFICIAL_7B, "tie_word_embeddings": True}).to_dict()
    assert QwenVLConfig.from_dict(nested).text.tie_word_embeddings


def test_qzoom_keys_are_kept():
    raw = {**OFFICIAL_7B, "enable_twig": True, "twig_K": 18, "twig_T": 3, "roi_source": "qk",
           "enable_high_res": True, "reuse_src_pos": True, "add_noise_to_roi": False}
    q = QwenVLConfig.from_dict(raw).qzoom
    assert (q.enable_twig, q.twig_K, q.twig_T, q.enable_high_res, q.reuse_src_pos) == (True, 18, 3, True, True)
    assert q.high_res_K is None and q.high_res_thresh == 0.1  # upstream defaults when absent
    assert QwenVLConfig.from_dict(raw).to_hf_dict()["twig_K"] == 18


@pytest.mark.parametrize("keys, message", [
    ({"enable_twig": True, "twig_K": 18}, "twig_K and twig_T"),
    ({"enable_twig": True, "twig_K": 18, "twig_T": 3, "roi_source": "hidden_states"}, "'hidden_states'"),
    # upstream silently skips base layers 16..17 here (reference §7 #10); we refuse the checkpoint
    ({"enable_twig": True, "twig_K": 18, "twig_T": 3, "enable_high_res": True, "high_res_K": 16},
     "high_res_K=16 must equal twig_K=18"),
    # the 7B backbone has 28 decoder layers: the branches are copies of layers K..K+T-1
    ({"enable_twig": True, "twig_K": 26, "twig_T": 3}, r"config: twig_K=26 \+ twig_T=3 exceeds the backbone's 28"),
    ({"enable_high_res": True, "high_res_K": 27, "high_res_T": 2}, r"high_res_K=27 \+ high_res_T=2 exceeds"),
    # config.json values are user input: wrong types are named, never silently truthy
    ({"enable_twig": "false"}, r"config: enable_twig must be bool, got 'false'"),
    ({"enable_twig": True, "twig_K": 18.5, "twig_T": 3}, r"twig_K must be int \| None, got 18.5"),
    ({"high_res_thresh": "0.1"}, r"high_res_thresh must be float, got '0.1'"),
])
def test_inconsistent_qzoom_keys_are_named(keys, message):
    with pytest.raises(ConfigError, match=message):
        QwenVLConfig.from_dict({**OFFICIAL_7B, **keys})


def test_gate_defaults_to_the_twig_branch():
    q = QwenVLConfig.from_dict({**OFFICIAL_7B, "enable_twig": True, "twig_K": 18, "twig_T": 3,
                                "enable_high_res": True}).qzoom
    assert (q.gate_K, q.gate_T) == (18, 3)


def test_unknown_model_type_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_7B, "model_type": "llava"}))
    with pytest.raises(ConfigError, match=r"unknown model_type 'llava'.*qwen2_5_vl"):
        registry.read_config(tmp_path)


@pytest.mark.parametrize("broken, message", [
    ({"vision_config": None}, "vision_config"),
    ({"rope_scaling": {"type": "mrope"}}, "mrope_section"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}, r"mrope_section \[16, 24, 16\]"),
])
def test_bad_configs_name_the_key(broken, message):
    with pytest.raises(ConfigError, match=message):
        QwenVLConfig.from_dict({**OFFICIAL_7B, **broken})


def test_missing_key_and_missing_file(tmp_path):
    raw = dict(OFFICIAL_7B)
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size'"):
        QwenVLConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="no config.json"):
        registry.read_config(tmp_path / "nowhere")
