"""QMoP's training examples and objective (the QMoP RECONSTRUCTION, ``models/qmop``): self-distillation of the
frozen uncompressed model into the same frozen model reading the projector's compressed image tokens.

An example is an SFT example (``conversations.make_example``: the teacher's sequence) plus the compressed
model's sequence at the same length and token indices (``layout.student_row``: surplus image tokens become
masked holes), the projector's index tables and the question mask, all under ``qmop_*`` keys. The objective
encodes each row's images once with the frozen vision tower, runs the frozen decoder on the uncompressed
sequence (teacher, no gradient) and on the projector's tokens (student), and compares them at the supervised
tokens: ``kl_weight * T^2 * KL(teacher_T || student_T) + ce_weight * CE(answer)`` (the KL/CE mix and T are our
choices). The backbone is a constant (``stop_gradient``): only the projector and its router get gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.data import conversations, stage1, stage3
from qzoom_jax.data.conversations import IGNORE
from qzoom_jax.models import vlm
from qzoom_jax.models.qmop import layout as qlayout
from qzoom_jax.models.qmop import projector
from qzoom_jax.models.qmop.config import BRANCHES, QMoPConfig


def compressed_fields(example: dict, config, qcfg: QMoPConfig, n_patches: int, max_images: int) -> dict:
    """The ``qmop_*`` fields of an SFT example (host NumPy); ValueError when its images do not fit the tables."""
    ids, mask, positions = example["input_ids"], example["attention_mask"], example["positions"]
    grids = qlayout.image_grids(config, ids, positions)
    n_src = n_patches // config.vision.merge_unit
    tables = qlayout.tables(grids, qcfg.stride, n_src, qlayout.slot_capacity(n_src, max_images, qcfg.stride),
                            max_images)
    s_ids, s_mask, s_pos = qlayout.student_row(config, ids, mask, grids, qcfg.stride)
    return {"qmop_input_ids": s_ids, "qmop_attention_mask": s_mask, "qmop_positions": s_pos,
            "qmop_question_mask": qlayout.question_mask(config, ids, mask, example["labels"]),
            **{f"qmop_{k}": v for k, v in tables.items()}}


def example(record, shape, *, qcfg: QMoPConfig, max_images: int, **kwargs) -> dict[str, np.ndarray]:
    """The QMoP example of ``record`` padded to its bucket ``shape`` = (tokens, patch rows); picklable."""
    ex = conversations.make_example(record, max_len=shape[0], n_patches=shape[1], max_images=max_images, **kwargs)
    try:
        return {**ex, **compressed_fields(ex, kwargs["config"], qcfg, shape[1], max_images)}
    except ValueError as e:
        raise stage1.SkipSample(f"{record.get('uid', '?')}: {e}") from None


def tables_of(batch) -> dict:
    return {k: batch[f"qmop_{k}"] for k in projector.TABLE_KEYS}


def compress(qparams, qcfg: QMoPConfig, params, config, feats, batch, route: str):
    """(student input embeddings [B, L, D], positions [3, B, L], branch weights [B, 3]) of a batch whose rows'
    merged tokens are ``feats`` [B, N, D]."""
    embedding = params["model"]["embed_tokens"]["embedding"]
    question = projector.question_embedding(embedding, batch["input_ids"], batch["qmop_question_mask"])
    tokens, offsets, weights, _ = projector.project(qparams, qcfg, feats, question.astype(feats.dtype),
                                                    tables_of(batch), route)
    ids = batch["qmop_input_ids"]
    x = vlm.embed(params, config, ids, tokens)
    positions = projector.shifted_positions(config, ids, jnp.transpose(batch["qmop_positions"], (1, 0, 2)), offsets)
    return x, positions, weights


def _distill(params, config, h_teacher, h_student, targets, chunk: int, temperature: float):
    """(summed KL, summed CE, correct student argmax, correct teacher argmax) over the scored positions, in fp32,
    ``chunk`` positions at a time (each chunk's logits recomputed in the backward pass)."""
    B, L, D = h_student.shape
    chunk = min(chunk, L)
    n = -(-L // chunk)
    fold = lambda a, fill: jnp.pad(a, ((0, 0), (0, n * chunk - L)) + ((0, 0),) * (a.ndim - 2),
                                   constant_values=fill).reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, xs):
        ht, hs, t = xs
        zt = jax.lax.stop_gradient(vlm.lm_logits(params, config, ht).astype(jnp.float32))
        zs = vlm.lm_logits(params, config, hs).astype(jnp.float32)
        valid = t != IGNORE
        log_pt = jax.nn.log_softmax(zt / temperature, -1)
        log_ps_t = jax.nn.log_softmax(zs / temperature, -1)
        kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps_t), -1) * temperature ** 2
        log_ps = jax.nn.log_softmax(zs, -1)
        ce = -jnp.take_along_axis(log_ps, jnp.where(valid, t, 0)[..., None], -1)[..., 0]
        sums = (jnp.where(valid, kl, 0).sum(), jnp.where(valid, ce, 0).sum(),
                (valid & (jnp.argmax(zs, -1) == t)).sum(), (valid & (jnp.argmax(zt, -1) == t)).sum())
        return tuple(c + s for c, s in zip(carry, sums)), None

    zero = (jnp.float32(0), jnp.float32(0), jnp.int32(0), jnp.int32(0))
    out, _ = jax.lax.scan(one, zero, (fold(h_teacher, 0), fold(h_student, 0), fold(targets, IGNORE)))
    return out


def loss_fn(trainable, frozen, config, batch, layout, K=None, *, threshold=None, attn_impl: str, qcfg: QMoPConfig,
            compute_dtype="bfloat16", kl_weight: float = 1.0, ce_weight: float = 1.0, temperature: float = 1.0,
            chunk: int = 1024):
    """The stage objective (``layout``, ``K``, ``threshold`` unused: rows carry their own layouts). The loss is the
    mean over supervised tokens (0, not NaN, without any); metrics add the KL, the CE, student and teacher token
    accuracy and the mean branch weights."""
    del layout, K, threshold
    dtype = vlm.as_dtype(compute_dtype)
    qparams = jax.tree_util.tree_map(lambda p: p.astype(dtype), trainable)
    params = jax.lax.stop_gradient(frozen)
    vision = stage3.layout_of(batch, config)
    feats = jax.vmap(lambda pv, lay: vlm.encode(params, config, pv, lay, attn_impl=attn_impl)[0])(
        batch["pixel_values"], vision)
    x_t = vlm.embed(params, config, batch["input_ids"], feats)
    h_t = vlm.decoder_trunk(params, config, x_t, batch["attention_mask"],
                            jnp.transpose(batch["positions"], (1, 0, 2)), attn_impl=attn_impl)[0]
    x_s, pos_s, weights = compress(qparams, qcfg, params, config, feats, batch, qcfg.train_route)
    h_s = vlm.decoder_trunk(params, config, x_s, batch["qmop_attention_mask"], pos_s, attn_impl=attn_impl)[0]
    labels = batch["labels"]
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    kl, ce, correct, teacher_correct = _distill(params, config, jax.lax.stop_gradient(h_t), h_s, targets, chunk,
                                                temperature)
    n = jnp.maximum((targets != IGNORE).sum(), 1)
    loss = (kl_weight * kl + ce_weight * ce) / n
    metrics = {"loss": loss, "kl": kl / n, "ce": ce / n, "token_accuracy": correct / n,
               "teacher_accuracy": teacher_correct / n,
               "supervised_tokens": (targets != IGNORE).sum().astype(jnp.float32),
               **{f"weight_{b}": weights[:, i].mean() for i, b in enumerate(BRANCHES)}}
    return loss, metrics
