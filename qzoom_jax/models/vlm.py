"""The full vision-language model on any registered backbone: vision tower + splice + text decoder + lm_head,
and greedy generation. The backbone's own parts come from ``registry.backbone(config)`` (``backbone.py``).

``QwenVL`` holds a config and a param pytree and takes exactly what the HF Qwen-VL processor returns
(NumPy arrays). Host-side work (3-D positions, vision window layout, bucket padding) happens in NumPy; the
numerical work runs in a few jitted pure functions whose shapes are padded to buckets (``buckets.bucket``), so
repeated calls with similar inputs do not recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.models import registry
from qzoom_jax.models.backbone import ModelConfig
from qzoom_jax.models.cache import KVCache, causal_mask
from qzoom_jax.models.layers import RMSNorm
from qzoom_jax.runtime.buckets import bucket, serve_bucket
from qzoom_jax.runtime.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype):
    if isinstance(dtype, str):
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None
    return jnp.dtype(dtype).type


def init_params(config, rng, dtype=jnp.float32):
    """Random params with the checkpoint's exact shapes (HF-like init). Works under ``jax.eval_shape``."""
    return registry.backbone(config).init_params(config, rng, dtype)


# ----------------------------------------------------------------------------------------- pure functions
def embed(params, config: ModelConfig, input_ids, image_features=None):
    """Token embeddings with image features written, in order, at the ``<|image_pad|>`` positions.

    ``image_features`` is [N, D] for the batch's images in order, or [B, N, D] with each row's own images
    (a row then gathers from its own features only, so a batch-sharded input stays local to its devices).
    """
    x = params["model"]["embed_tokens"]["embedding"][input_ids]
    if image_features is None:
        return x
    return _at_image_tokens(config, input_ids, image_features, x)


def _at_image_tokens(config: ModelConfig, input_ids, image_features, x):
    """``x`` [B, L, D] with ``image_features`` ([N, D] or [B, N, D], as ``embed``) written at the image tokens."""
    is_img = input_ids == config.image_token_id
    if image_features.ndim == 3:
        idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, image_features.shape[1] - 1)
        feats = jnp.take_along_axis(image_features, idx[..., None], axis=1)
        return jnp.where(is_img[..., None], feats.astype(x.dtype), x)
    is_img = is_img.reshape(-1)
    idx = jnp.clip(jnp.cumsum(is_img) - 1, 0, image_features.shape[0] - 1)
    spliced = jnp.where(is_img[:, None], image_features[idx].astype(x.dtype), x.reshape(-1, x.shape[-1]))
    return spliced.reshape(x.shape)


def encode(params, config: ModelConfig, pixel_values, layout, *, attn_impl: str = "einsum", remat: str = "none"):
    """The vision tower: (features [N, D], DeepStack features [k, N, D] or None for a backbone without);
    ``remat``: a ``layers.REMAT`` policy for its blocks."""
    bb = registry.backbone(config)
    dtype = params["model"]["embed_tokens"]["embedding"].dtype
    out = bb.encode_images(params["visual"], config.vision, pixel_values.astype(dtype), layout, attn_impl=attn_impl,
                           remat=remat)
    return out if bb.deepstack else (out, None)


def deepstack_residuals(config: ModelConfig, input_ids, deepstack, dtype):
    """[k, B, L, D]: DeepStack feature set j ([k, N, D], or [k, B, N, D] per row) at the image tokens, zeros
    elsewhere; ``decoder_trunk`` adds row j after decoder layer j."""
    zeros = jnp.zeros((*input_ids.shape, deepstack.shape[-1]), dtype)
    return jnp.stack([_at_image_tokens(config, input_ids, d, zeros) for d in deepstack])


def penalized(logits, seen, penalty):
    """transformers' repetition penalty: the logit of every token already seen (prompt or generated) is divided
    by ``penalty`` when positive and multiplied by it when negative. ``seen`` [B, V] bool, None = no penalty."""
    if seen is None:
        return logits
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def seen_tokens(input_ids, vocab_size: int) -> np.ndarray:
    """[B, V] bool: the ids present in each row of ``input_ids`` (host). As transformers, padding ids count."""
    ids = np.asarray(input_ids)
    seen = np.zeros((ids.shape[0], vocab_size), bool)
    seen[np.arange(ids.shape[0])[:, None], ids] = True
    return seen


def lm_logits(params, config: ModelConfig, h):
    """Logits in float32 whatever the compute dtype: bf16 operands, float32 accumulation and output (the
    cross-entropy and argmax over a 152k vocabulary need it; a bf16 output would round every logit)."""
    h = RMSNorm(config.text.rms_norm_eps, h.dtype).apply({"params": params["model"]["norm"]}, h)
    if "lm_head" in params:
        w = params["lm_head"]["kernel"]
    else:
        w = params["model"]["embed_tokens"]["embedding"].T  # tied embeddings (Qwen2.5-VL-3B)
    return jnp.matmul(h, w, preferred_element_type=jnp.float32)


def trunk(params, config: ModelConfig, input_ids, attention_mask, positions, pixel_values=None, layout=None,
          num_layers: int | None = None, cache_len: int | None = None, *, attn_impl: str = "einsum"):
    """Vision + embed + decoder layers ``[:num_layers]`` (all when None), without the final norm.

    Returns ``(h [B, L, D], cos, sin, mask, cache)``: the hidden states after those layers, the M-RoPE tables and
    the boolean causal mask they used (so a branch such as the Q-Zoom twig can continue from layer K with the
    same positions and mask), and the KV cache of those layers (None without ``cache_len``).
    """
    feats = residuals = None
    if pixel_values is not None:
        feats, deepstack = encode(params, config, pixel_values, layout, attn_impl=attn_impl)
    x = embed(params, config, input_ids, feats)
    if feats is not None and deepstack is not None:
        residuals = deepstack_residuals(config, input_ids, deepstack, x.dtype)
    return decoder_trunk(params, config, x, attention_mask, positions, num_layers, cache_len, attn_impl=attn_impl,
                         deepstack=residuals)


def decoder_trunk(params, config: ModelConfig, x, attention_mask, positions, num_layers: int | None = None,
                  cache_len: int | None = None, *, attn_impl: str = "einsum", deepstack=None):
    """``trunk`` from the input embeddings ``x`` [B, L, D] on (image features already spliced in).
    ``deepstack`` [k, B, L, D] (``deepstack_residuals``): row j is added to the hidden states after layer j."""
    t, bb = config.text, registry.backbone(config)
    n = t.num_hidden_layers if num_layers is None else num_layers
    if not 1 <= n <= t.num_hidden_layers:
        raise ValueError(f"num_layers={n} outside 1..{t.num_hidden_layers}")
    cos, sin = bb.rope_tables(config, positions)
    B, L = attention_mask.shape
    cache, key_valid = None, attention_mask
    if cache_len is not None:
        cache = KVCache.zeros(t, n, B, cache_len, x.dtype)
        key_valid = jnp.pad(attention_mask, ((0, 0), (0, cache_len - L)))
    mask = causal_mask(key_valid, L)
    layers = params["model"]["layers"]
    if n != t.num_hidden_layers:
        layers = jax.tree_util.tree_map(lambda a: a[:n], layers)
    h, cache = run_stack(config, layers, x, cos, sin, mask, cache, 0, deepstack, attn_impl=attn_impl)
    return h, cos, sin, mask, cache


def run_stack(config: ModelConfig, layers, x, cos, sin, mask, cache=None, cache_index=0, deepstack=None, *,
              attn_impl: str = "einsum"):
    """The backbone's ``run_layers`` over ``layers`` (the stack from layer 0) with ``deepstack`` [k, B, L, D]
    (or None): row j added after layer j, so layers 0..k-1 run one at a time. Returns (h, cache)."""
    t, bb = config.text, registry.backbone(config)
    if deepstack is None:
        return bb.run_layers(layers, t, x, cos, sin, mask, cache, cache_index, dtype=x.dtype, attn_impl=attn_impl)
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    k = min(deepstack.shape[0], n)
    bounds = [*range(k + 1), *([n] if n > k else [])]
    h, parts = x, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cut = lambda tree: jax.tree_util.tree_map(lambda v: v[a:b], tree)
        h, part = bb.run_layers(cut(layers), t, h, cos, sin, mask, None if cache is None else cut(cache),
                                cache_index, dtype=x.dtype, attn_impl=attn_impl)
        if a < k:
            h = h + deepstack[a].astype(h.dtype)
        parts.append(part)
    if cache is not None:
        cache = KVCache(jnp.concatenate([p.k for p in parts]), jnp.concatenate([p.v for p in parts]))
    return h, cache


def batch_trunk(params, config: ModelConfig, batch, layout, num_layers: int, *, attn_impl: str,
                per_row_layout: bool = False):
    """``decoder_trunk`` over a fixed-shape training batch: ``input_ids``/``attention_mask`` [B, L],
    ``positions`` [B, 3, L], ``pixel_values`` [B, P, C] of one image per row. Each row's image is encoded on its own
    (vmap), so a batch-sharded input never gathers across devices; ``layout`` is shared by every row or, with
    ``per_row_layout``, stacked with a leading batch axis. Returns ``(h, cos, sin, mask)``."""
    one = lambda pv, lay: encode(params, config, pv, lay, attn_impl=attn_impl)
    feats, deepstack = jax.vmap(one, in_axes=(0, 0 if per_row_layout else None))(batch["pixel_values"], layout)
    x = embed(params, config, batch["input_ids"], feats)
    residuals = None
    if deepstack is not None:  # [B, k, N, D] -> [k, B, N, D]: each row's own DeepStack features
        residuals = deepstack_residuals(config, batch["input_ids"], jnp.swapaxes(deepstack, 0, 1), x.dtype)
    positions = jnp.transpose(batch["positions"], (1, 0, 2))
    h, cos, sin, mask, _ = decoder_trunk(params, config, x, batch["attention_mask"], positions, num_layers,
                                         attn_impl=attn_impl, deepstack=residuals)
    return h, cos, sin, mask


def prefill(params, config: ModelConfig, input_ids, attention_mask, positions, pixel_values=None,
            layout=None, cache_len: int | None = None, *, attn_impl: str = "einsum"):
    """Forward over the whole prompt. Returns (logits [B, L, V], KV cache or None).

    With ``cache_len`` (generation) the keys/values of every layer are written into a fresh cache of that
    length and only the last position's logits are computed ([B, 1, V]).
    """
    h, _, _, _, cache = trunk(params, config, input_ids, attention_mask, positions, pixel_values, layout,
                              cache_len=cache_len, attn_impl=attn_impl)
    return lm_logits(params, config, h if cache is None else h[:, -1:]), cache


def greedy_decode(params, config: ModelConfig, first_token, cache, key_valid, next_position, limit, start: int,
                  max_new_tokens: int, image_index=None, seen=None, penalty=1.0, *, capture: tuple[int, ...] = (),
                  attn_impl: str = "einsum"):
    """Greedy decoding from a filled cache. Token t (t >= 1) is fed the previous token at 3-D position
    ``next_position + t - 1`` (same on t/h/w) and cache index ``start + t - 1``. A row stops when it has emitted
    ``eos`` or ``limit`` tokens (traced: a scalar, or [B] for a limit per row; <= the static buffer size
    ``max_new_tokens``); later tokens of a finished row are ``pad``. ``seen`` [B, V] bool (the prompt's ids, as
    ``seen_tokens``) with ``penalty`` applies transformers' repetition penalty; the caller applied it to
    ``first_token`` (``penalized``) and the generated tokens are added as they come.

    ``capture`` (layer indices) with ``image_index`` [B, N] (cache indices of the image tokens): also average,
    per row, the attention probabilities from each decode-step query to those keys, over the steps whose query
    is one of the row's generated tokens 1..n-1 (the last token, usually eos, is never fed back; training
    reference §1.2 step 5). Those layers alone take the einsum path.

    Returns (tokens [B, max_new_tokens], tokens produced, attention [len(capture), B, H, N] float32 or None;
    all zeros for a row that generated a single token).
    """
    t_cfg, bb = config.text, registry.backbone(config)
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    B = first_token.shape[0]
    limit = jnp.broadcast_to(jnp.asarray(limit, jnp.int32), (B,))
    out = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(first_token)
    rows = jnp.arange(B)
    if seen is not None:
        seen = jnp.asarray(seen, bool).at[rows, first_token].set(True)
    n_img = 0 if image_index is None else image_index.shape[1]
    acc = jnp.zeros((len(capture), B, t_cfg.num_attention_heads, n_img), jnp.float32)

    def cond(state):
        step, _, _, done, _, _, _ = state
        return (step < jnp.max(limit)) & ~jnp.all(done)

    def body(state):
        step, out, cache, done, acc, count, seen = state
        prev = out[:, step - 1]
        x = embed(params, config, prev[:, None])
        pos = jnp.broadcast_to((next_position + step - 1).astype(jnp.float32)[None, :, None], (3, B, 1))
        cos, sin = bb.rope_tables(config, pos)
        mask = causal_mask(key_valid, 1, start + step - 1)
        if capture:
            h, cache, probs = bb.run_layers_capturing(params["model"]["layers"], t_cfg, x, cos, sin, mask,
                                                            cache, start + step - 1, capture, dtype=x.dtype,
                                                            attn_impl=attn_impl)
            on_image = jnp.take_along_axis(probs[:, :, :, 0], image_index[None, :, None, :], axis=-1)
            acc = acc + jnp.where(done[None, :, None, None], 0.0, on_image)  # a finished row's query is pad
        else:
            h, cache = bb.run_layers(params["model"]["layers"], t_cfg, x, cos, sin, mask, cache,
                                           start + step - 1, dtype=x.dtype, attn_impl=attn_impl)
        count = count + (~done).astype(jnp.int32)
        logits = penalized(lm_logits(params, config, h)[:, -1], seen, penalty)
        tok = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        if seen is not None:
            seen = seen.at[rows, tok].set(seen[rows, tok] | ~done)
        done = done | (tok == eos) | (step + 1 >= limit)
        return step + 1, out.at[:, step].set(tok), cache, done, acc, count, seen

    init = (jnp.int32(1), out, cache, (first_token == eos) | (limit <= 1), acc, jnp.zeros((B,), jnp.int32), seen)
    step, out, _, _, acc, count, _ = jax.lax.while_loop(cond, body, init)
    if not capture:
        return out, step, None
    return out, step, acc / jnp.maximum(count, 1)[None, :, None, None].astype(jnp.float32)


# ----------------------------------------------------------------------------------------- the model object
@dataclasses.dataclass
class QwenVL:
    """A loaded model: ``.config``, ``.params``; ``logits`` and ``generate`` take HF-processor arrays."""

    config: ModelConfig
    params: dict
    attn_impl: str = "einsum"
    repetition_penalty: float = 1.0  # the checkpoint's generation_config.json (transformers applies it too)

    def __post_init__(self):
        statics = {"static_argnames": ("config", "cache_len", "attn_impl")}
        self._prefill = jax.jit(prefill, **statics)
        self._decode = jax.jit(greedy_decode, static_argnames=("config", "start", "max_new_tokens", "capture",
                                                               "attn_impl"))

    def prepare(self, input_ids, attention_mask, pixel_values, image_grid_thw):
        """Left-pad the batch to a bucketed length and lay out the images. Returns the device-ready tuple
        ``(pad, input_ids, attention_mask, positions [3, B, L], next_position [B], pixel_values, layout)``."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        L = input_ids.shape[1]
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        n_img_tokens = int((input_ids == self.config.image_token_id).sum())
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together")
        pad = serve_bucket(L) - L
        ids = np.pad(input_ids, ((0, 0), (pad, 0)), constant_values=self.config.bos_token_id)
        am = np.pad(attention_mask, ((0, 0), (pad, 0)))
        bb = registry.backbone(self.config)
        positions, next_position = bb.positions(self.config, ids, am, image_grid_thw)
        layout = pv = None
        if pixel_values is not None:
            pixel_values = np.asarray(pixel_values, np.float32)
            grid = np.asarray(image_grid_thw)
            merged = int(grid.prod(-1).sum()) // self.config.vision.merge_unit
            if merged != n_img_tokens:
                raise ValueError(f"input_ids hold {n_img_tokens} image tokens but image_grid_thw describes "
                                 f"{merged} merged patches")
            n_patch = serve_bucket(pixel_values.shape[0], 64)
            layout = bb.vision_layout(grid, self.config.vision, pad_to=n_patch)
            pv = np.pad(pixel_values, ((0, n_patch - pixel_values.shape[0]), (0, 0)))
        elif n_img_tokens:
            raise ValueError(f"input_ids hold {n_img_tokens} image tokens but no pixel_values were given")
        return pad, ids, am, positions, next_position, pv, layout

    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               mm_token_type_ids=None):
        """Logits [B, L, vocab] (float32 NumPy) for a batch as returned by the HF processor."""
        del mm_token_type_ids  # image tokens are found from input_ids, as HF does for images
        pad, ids, am, positions, _, pv, layout = self.prepare(input_ids, attention_mask, pixel_values,
                                                                image_grid_thw)
        logits, _ = self._prefill(self.params, self.config, ids, am, positions, pv, layout,
                                  attn_impl=self.attn_impl)
        return np.asarray(logits[:, pad:], np.float32)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, max_new_tokens: int = 32, repetition_penalty: float | None = None):
        """Greedy generation with a KV cache; stops at ``<|im_end|>``. Returns new tokens [B, <=max_new].
        ``repetition_penalty`` (transformers' semantics) defaults to the checkpoint's generation_config.json."""
        del mm_token_type_ids
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
        tokens, _ = self.generate_prepared(prepared, max_new_tokens, prompt_ids=input_ids,
                                           repetition_penalty=repetition_penalty)
        return tokens

    def generate_with_attention(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                                mm_token_type_ids=None, *, capture_layers, max_new_tokens=128,
                                repetition_penalty: float | None = None):
        """Greedy generation that also returns, for each layer in ``capture_layers``, every head's attention
        probabilities from the generated tokens to the image tokens, averaged over decode steps as the Stage-1
        teacher does (``greedy_decode``). Every row must hold the same number N of image tokens;
        ``max_new_tokens`` is one limit or one per row; ``repetition_penalty`` as in ``generate``.

        Returns (tokens [B, <=max(max_new)], attention float32 [len(capture_layers), B, heads, N]).
        """
        del mm_token_type_ids
        capture = tuple(sorted({int(i) for i in capture_layers}))
        if not capture:
            raise ValueError("capture_layers is empty")
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
        tokens, attn = self.generate_prepared(prepared, max_new_tokens, capture, prompt_ids=input_ids,
                                              repetition_penalty=repetition_penalty)
        order = [capture.index(int(i)) for i in capture_layers]
        return tokens, attn[np.asarray(order)]

    def decode_args(self, prompt_ids, repetition_penalty: float | None):
        """(seen, penalty) for ``greedy_decode``: None when no penalty applies (the checkpoint's when None)."""
        penalty = self.repetition_penalty if repetition_penalty is None else float(repetition_penalty)
        if penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {penalty}")
        if penalty == 1.0 or prompt_ids is None:
            return None, penalty
        return seen_tokens(prompt_ids, self.config.text.vocab_size), penalty

    def generate_prepared(self, prepared: tuple, max_new_tokens, capture: tuple[int, ...] = (), *,
                          prompt_ids=None, repetition_penalty: float | None = None):
        """Greedy generation from ``prepare``'s output: (tokens [B, <=max_new], attention or None).
        ``max_new_tokens``: one limit, or one per row. ``prompt_ids``: the unpadded prompt ids the repetition
        penalty counts (as transformers: the ``input_ids`` given to generate)."""
        limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (prepared[1].shape[0],))
        if limits.min() < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        new_b = bucket(int(limits.max()), 8)
        _, ids, am, positions, next_position, pv, layout = prepared
        image_index = None
        if capture:
            rows, cols = np.nonzero((ids == self.config.image_token_id) & (am != 0))
            counts = np.bincount(rows, minlength=ids.shape[0])
            if counts.min() == 0 or counts.min() != counts.max():
                raise ValueError(f"attention capture needs the same number of image tokens in every row, got "
                                 f"{counts.tolist()}")
            image_index = cols.reshape(ids.shape[0], -1).astype(np.int32)
        seen, penalty = self.decode_args(prompt_ids, repetition_penalty)
        L = ids.shape[1]
        logits, cache = self._prefill(self.params, self.config, ids, am, positions, pv, layout,
                                      cache_len=L + new_b, attn_impl=self.attn_impl)
        first = jnp.argmax(penalized(logits[:, -1], seen, penalty), axis=-1).astype(jnp.int32)
        key_valid = np.pad(am, ((0, 0), (0, new_b)), constant_values=1)
        out, steps, attn = self._decode(self.params, self.config, first, cache, key_valid, next_position,
                                        limits, image_index=image_index, seen=seen, penalty=penalty, start=L,
                                        max_new_tokens=new_b, capture=capture, attn_impl=self.attn_impl)
        tokens = np.asarray(out[:, :int(steps)])
        return tokens, (None if attn is None else np.asarray(attn, np.float32))
