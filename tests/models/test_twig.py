"""The SD-RPN twig branch against an independent computation from transformers modules on a tiny model.

Reference path (all HF): hidden_states[K] of the HF model, fresh ``Qwen2_5_VLDecoderLayer``s holding the twig
weights, HF's rotary embedding / causal mask / get_rope_index, and for the last twig layer its input_layernorm,
q_proj, k_proj, ``apply_rotary_pos_emb`` and ``repeat_kv``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_mod

from qzoom_jax.models.qzoom import twig
from qzoom_jax.models import vlm
from tests.hf_reference import IDS, batch, prompt_ids, random_pixels, tiny_pair, to_torch

GRIDS = [(1, 22, 30), (1, 10, 40)]
K, T, DEPTH = 2, 3, 5
TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    hf, ours = tiny_pair("gqa2_win112", text_layers=DEPTH)
    rng = np.random.default_rng(0)
    rows = [prompt_ids(rng, 5, [22 * 30 // 4]), prompt_ids(rng, 11, [10 * 40 // 4])]
    inputs = batch(rows, "left")
    inputs["pixel_values"] = random_pixels(rng, GRIDS)
    inputs["image_grid_thw"] = np.array(GRIDS, np.int64)

    # Twig = copies of base layers K..K+T-1, then the same random perturbation on both sides, so agreement
    # cannot come from simply re-running the base model.
    base = twig.init_twig_params(ours.params["model"]["layers"], K, T)
    noise = jax.tree_util.tree_map(lambda a: 0.05 * rng.standard_normal(a.shape).astype(np.float32), base)
    twig_params = jax.tree_util.tree_map(lambda a, n: a + n, base, noise)
    torch_layers = []
    for i in range(T):
        layer = hf_mod.Qwen2_5_VLDecoderLayer(hf.config.text_config, K + i).eval()
        layer.load_state_dict(hf.model.language_model.layers[K + i].state_dict())
        sd = layer.state_dict()
        for path, n in jax.tree_util.tree_flatten_with_path(noise)[0]:
            names = [p.key for p in path]
            key = ".".join(names[:-1]) + (".bias" if names[-1] == "bias" else ".weight")
            d = torch.from_numpy(np.asarray(n[i]))
            sd[key] += d.T if names[-1] == "kernel" else d  # our kernels are [in, out] = weight.T
        layer.load_state_dict(sd)
        torch_layers.append(layer)
    return hf, ours, inputs, twig_params, torch_layers


def hf_reference(hf, torch_layers, inputs):
    """Per sample: the RoI logits at its image tokens (sequence order), and HF's hidden_states[K]."""
    t = to_torch(inputs)
    with torch.no_grad():
        h_k = hf(**t, output_hidden_states=True).hidden_states[K]
        pos, _ = hf.model.get_rope_index(t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"],
                                         attention_mask=t["attention_mask"])
        lm = hf.model.language_model
        cos, sin = lm.rotary_emb(h_k, pos)
        mask = create_causal_mask(config=lm.config, inputs_embeds=h_k, attention_mask=t["attention_mask"],
                                  past_key_values=None, allow_is_causal_skip=False)
        x = h_k
        for layer in torch_layers[:-1]:
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        last = torch_layers[-1]
        attn = last.self_attn
        B, L, _ = x.shape
        xn = last.input_layernorm(x)
        q = attn.q_proj(xn).view(B, L, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(xn).view(B, L, -1, attn.head_dim).transpose(1, 2)
        q, k = hf_mod.apply_rotary_pos_emb(q, k, cos, sin)
        k = hf_mod.repeat_kv(k, attn.num_key_value_groups)
        s = torch.einsum("bhd,bhld->bhl", q[:, :, -1], k) / attn.head_dim ** 0.5  # query: last prompt token
        s = s.mean(1).numpy()
    img = inputs["input_ids"] == IDS["image_token_id"]
    return [s[b][img[b]] for b in range(B)], h_k.numpy()


def ours_forward(ours, twig_params, inputs):
    pad, ids, am, positions, _, pv, layout = ours.prepare(inputs["input_ids"], inputs["attention_mask"],
                                                           inputs["pixel_values"], inputs["image_grid_thw"])
    h, cos, sin, mask, _ = vlm.trunk(ours.params, ours.config, ids, am, positions, pv, layout, num_layers=K)
    qi = jnp.full((ids.shape[0],), ids.shape[1] - 1, jnp.int32)
    img = jnp.asarray(ids == ours.config.image_token_id)
    return pad, np.asarray(h), (h, cos, sin, mask, qi, img)


def test_roi_logits_match_transformers(setup):
    hf, ours, inputs, twig_params, torch_layers = setup
    ref, ref_hk = hf_reference(hf, torch_layers, inputs)
    pad, h_k, args = ours_forward(ours, twig_params, inputs)
    h, cos, sin, mask, qi, img = args

    valid = inputs["attention_mask"].astype(bool)
    hk_err = np.abs(h_k[:, pad:] - ref_hk)[valid].max() / np.abs(ref_hk[valid]).max()
    assert hk_err <= TOL, hk_err

    logits = np.asarray(jax.jit(twig.roi_logits, static_argnames=("config",))(
        twig_params, ours.config, h, cos, sin, mask, qi, img))
    assert (logits[~np.asarray(img)] == 0).all()
    maps = twig.roi_map(ours, twig_params, K, **inputs)
    for b, (_, gh, gw) in enumerate(GRIDS):
        got = logits[b][np.asarray(img[b])]
        err = np.abs(got - ref[b]).max() / np.abs(ref[b]).max()
        print(f"sample {b}: H_K rel err {hk_err:.1e}, RoI logits rel err {err:.1e}, max|s| {np.abs(ref[b]).max():.2f}")
        assert err <= TOL
        assert maps[b].shape == (gh // 2, gw // 2)
        np.testing.assert_allclose(maps[b], ref[b].reshape(gh // 2, gw // 2), rtol=0,
                                   atol=TOL * np.abs(ref[b]).max())


def test_init_twig_params_copies_layers(setup):
    _, ours, _, _, _ = setup
    layers = ours.params["model"]["layers"]
    got = twig.init_twig_params(layers, K, T)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b[K:K + T]), got, layers)
    assert jax.tree_util.tree_leaves(got)[0].shape[0] == T
    with pytest.raises(ValueError, match="K=3, T=3, depth=5"):
        twig.init_twig_params(layers, 3, 3)
    with pytest.raises(ValueError, match="outside"):
        vlm.trunk(ours.params, ours.config, None, None, None, None, None, num_layers=DEPTH + 1)


def test_gradients_reach_exactly_the_used_params(setup):
    _, ours, inputs, twig_params, _ = setup
    _, _, (h, cos, sin, mask, qi, img) = ours_forward(ours, twig_params, inputs)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 2, img.shape), jnp.float32)

    def loss(p):  # the Stage-1 BCE-with-logits, averaged over image tokens
        s = twig.roi_logits(p, ours.config, h, cos, sin, mask, qi, img)
        bce = jnp.maximum(s, 0) - s * labels + jnp.log1p(jnp.exp(-jnp.abs(s)))
        return jnp.sum(jnp.where(img, bce, 0)) / jnp.sum(img)

    grads = jax.jit(jax.grad(loss))(twig_params)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = "/".join(p.key for p in path)
        used_in_last = name.split("/")[0] == "input_layernorm" or name.split("/")[1] in ("q_proj", "k_proj")
        for i in range(T - 1):
            assert np.abs(g[i]).max() > 0, f"layer {i} {name}"
        if used_in_last:
            assert np.abs(g[T - 1]).max() > 0, f"last layer {name}"
        else:
            assert not np.asarray(g[T - 1]).any(), f"last layer {name} must get no gradient"
