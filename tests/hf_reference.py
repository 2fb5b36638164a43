"""Tiny random Qwen2.5-VL models built with `transformers` (the numerical reference) and copied into JAX."""

from __future__ import annotations

import jax
import numpy as np
import torch
import transformers

from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.checkpoints.hf_checkpoint import params_from_state_dict
from qzoom_jax.models import vlm
from qzoom_jax.models.vlm import QwenVL

VOCAB = 320
IDS = dict(image_token_id=310, video_token_id=311, vision_start_token_id=308, vision_end_token_id=309,
           bos_token_id=300, eos_token_id=301, pad_token_id=300)

# Three shapes that differ in hidden size, heads / KV heads, mrope_section, vision depth, window size and the
# full-attention block indexes (and one has tied embeddings, like Qwen2.5-VL-3B).
TINY_CONFIGS = {
    "gqa2_win112": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=112,
                    fullatt_block_indexes=[1]),
        tie=False),
    "gqa3_win56": dict(
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=3, mrope_section=[4, 2, 2]),
        vision=dict(depth=3, hidden_size=48, intermediate_size=80, num_heads=4, window_size=56,
                    fullatt_block_indexes=[0, 2]),
        tie=False),
    "mha_win224_tied": dict(
        text=dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=8, mrope_section=[2, 2, 4]),
        vision=dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, window_size=224,
                    fullatt_block_indexes=[3]),
        tie=True),
}


def hf_config(name: str, text_layers: int | None = None) -> transformers.Qwen2_5_VLConfig:
    """``text_layers`` overrides the decoder depth (the twig tests need a deeper stack)."""
    spec = TINY_CONFIGS[name]
    t = dict(spec["text"])
    if text_layers is not None:
        t["num_hidden_layers"] = text_layers
    mrope = t.pop("mrope_section")
    text_config = dict(vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=4096,
                       bos_token_id=IDS["bos_token_id"], eos_token_id=IDS["eos_token_id"],
                       pad_token_id=IDS["pad_token_id"],
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}, **t)
    vision_config = dict(out_hidden_size=t["hidden_size"], patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2, in_channels=3, tokens_per_second=2, hidden_act="silu",
                         **spec["vision"])
    return transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                                         tie_word_embeddings=spec["tie"], **IDS)


def tiny_pair(name: str, seed: int = 0, init_scale: float = 4.0, text_layers: int | None = None):
    """(HF model in eval mode, eager attention, float32; our QwenVL with the same weights).

    Weights are scaled up from HF's N(0, 0.02) init so logits are O(1) and greedy choices are not near-ties.
    """
    torch.manual_seed(seed)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(name, text_layers)).eval()
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.ndim > 1:
                p.mul_(init_scale)
    config = QwenVLConfig.from_dict(hf.config.to_dict())
    params = params_from_state_dict(hf.state_dict(), config)
    return hf, QwenVL(config, params)


def prompt_ids(rng: np.random.Generator, n_text: int, image_tokens=()) -> list[int]:
    """A chat-like prompt: text, then per image <vs> <image_pad>*n <ve>, then text, ending in text."""
    ids = list(rng.integers(0, 290, n_text))
    for n in image_tokens:
        ids += [IDS["vision_start_token_id"]] + [IDS["image_token_id"]] * n + [IDS["vision_end_token_id"]]
        ids += list(rng.integers(0, 290, 3))
    return ids


def batch(rows: list[list[int]], padding_side: str = "left"):
    """input_ids / attention_mask / mm_token_type_ids as the HF processor pads them."""
    L = max(len(r) for r in rows)
    ids = np.full((len(rows), L), IDS["pad_token_id"], np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return dict(input_ids=ids, attention_mask=mask,
                mm_token_type_ids=(ids == IDS["image_token_id"]).astype(np.int64))


def random_pixels(rng: np.random.Generator, grids, patch_dim: int = 1176) -> np.ndarray:
    n = int(sum(t * h * w for t, h, w in grids))
    return rng.standard_normal((n, patch_dim)).astype(np.float32)


def to_torch(inputs: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}


def official_config(size: str) -> dict:
    """config.json of Qwen2.5-VL-{3B,7B}-Instruct, the values of reference §1.1 (4.x flat layout)."""
    text = {
        "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                   num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=70),
        "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, max_window_layers=28),
    }[size]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **text,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "hidden_act": "silu",
        "sliding_window": 32768, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "in_chans": 3, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
                          "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                          "hidden_act": "silu", "out_hidden_size": text["hidden_size"]},
    }


def assert_init_matches_table(config, table) -> None:
    """jax.eval_shape of our init has exactly the parameter paths of the checkpoint ``table``, each with the
    table's shape (a stacked layer leaf: the number of layers times the per-layer shape)."""
    shapes = jax.eval_shape(lambda: vlm.init_params(config, jax.random.PRNGKey(0)))
    ours = {"/".join(str(k.key) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    from_table = {}
    for spec in table.values():
        from_table.setdefault("/".join(spec.path), []).append(spec)
    assert ours.keys() == from_table.keys()
    for path, specs in from_table.items():
        stacked = specs[0].layer is not None
        assert ours[path] == ((len(specs), *specs[0].shape) if stacked else specs[0].shape), path
