"""The one attention function every model calls, with a selectable implementation.

What a query may see is a :class:`Mask` of **segment ids** (and a causal flag), never a dense [Lq, S] array:
query i attends key j when their segment ids are equal and, if causal, ``j <= q_start + i``. The decoder gives each
token its row's sample id (1 for an unpacked row, 1..n for a packed one, 0 for padding: ``cache.causal_mask``); the
vision tower gives each slot of its window / frame tables the id of the window or frame in it (0 = empty slot).

``impl``:

* ``"einsum"`` -- einsum + float32 softmax, the dense mask built from the ids; the reference, and the only one that
  can return the attention probabilities (pseudo-labels). Padding queries see nothing (uniform rows, as HF).
* ``"xla"`` -- ``jax.nn.dot_product_attention`` (XLA) with the mask built from the ids.
* ``"splash"`` -- Pallas splash attention (TPU; interpreted on CPU, for tests), fed the segment ids directly.
* ``"pallas_gpu"`` -- JAX's Pallas (Triton) flash attention (GPU; interpreted on CPU), fed the segment ids.
* ``"cudnn"`` -- cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU only): rows with one sample
  are compacted to right padding and given as sequence lengths; packed rows need a dense mask there.
* ``"fused"`` -- the platform's kernel: splash on TPU, cuDNN on GPU, xla on CPU.

The kernels cover self-attention blocks (prefill, training, vision tower). A decode step (one query) or a pass over
a prefix cache (``q_start`` > 0) runs the xla path under every fused impl: one query row is bound by reading the
cache, a flash kernel has nothing to tile there. Outputs at padding queries are unspecified (finite); outputs at
real queries agree between implementations.

Shapes: ``q`` [B, Lq, H, D], ``k``/``v`` [B, S, KV, D] with ``H % KV == 0`` (GQA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.runtime.errors import ConfigError

IMPLS = ("einsum", "xla", "splash", "pallas_gpu", "cudnn", "fused")
# Where each kernel runs; "cpu" for the Pallas kernels means interpret mode (slow: tests only).
PLATFORMS = {"splash": ("tpu", "cpu"), "pallas_gpu": ("gpu", "cpu"), "cudnn": ("gpu",)}
FUSED = {"tpu": "splash", "gpu": "cudnn"}


@jax.tree_util.register_pytree_node_class
class Mask:
    """Who attends whom, as ids: ``q_segment`` [B, Lq] and ``kv_segment`` [B, S] int32 (0 = padding / empty slot),
    ``causal`` (static) with the cache index of query 0, ``q_start`` (a Python int stays static, so kernels can
    see it; a traced one, as in decode steps, is a leaf)."""

    def __init__(self, q_segment, kv_segment, causal: bool = False, q_start=0):
        self.q_segment, self.kv_segment, self.causal, self.q_start = q_segment, kv_segment, causal, q_start

    def tree_flatten(self):
        static = isinstance(self.q_start, (int, np.integer))
        children = (self.q_segment, self.kv_segment) + (() if static else (self.q_start,))
        return children, (self.causal, int(self.q_start) if static else None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        causal, q_start = aux
        return cls(children[0], children[1], causal, q_start if q_start is not None else children[2])

    @property
    def static_start(self) -> bool:
        return isinstance(self.q_start, (int, np.integer))

    def dense(self, *, padding_sees: bool = True):
        """Boolean [B, 1, Lq, S]. ``padding_sees=False`` (einsum): padding queries see nothing, as in HF; else a
        padding query sees the padding keys, so no row is empty (an empty row is 0/0 in a fused softmax)."""
        qs, ks = self.q_segment[:, None, :, None], self.kv_segment[:, None, None, :]
        allowed = qs == ks
        if not padding_sees:
            allowed = allowed & (ks != 0)
        if self.causal:
            lq, s = qs.shape[2], ks.shape[3]
            allowed = allowed & (jnp.arange(s)[None, :] <= self.q_start + jnp.arange(lq)[:, None])
        return allowed


def segments_mask(segment_ids) -> Mask:
    """Non-causal attention within segments of ``segment_ids`` [B, L] (vision windows / frames; 0 = empty)."""
    return Mask(segment_ids, segment_ids, causal=False)


def platform() -> str:
    return jax.devices()[0].platform


def resolve(impl: str, on: str | None = None) -> str:
    """The concrete implementation ``impl`` names on platform ``on`` (default: this process's devices); a kernel
    that cannot run there is a ConfigError naming both."""
    on = on or platform()
    if impl not in IMPLS:
        raise ConfigError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if impl == "fused":
        return FUSED.get(on, "xla")
    if impl in PLATFORMS and on not in PLATFORMS[impl]:
        raise ConfigError(f"attention impl {impl!r} runs on {'/'.join(PLATFORMS[impl])}, not on {on}")
    return impl


def attention(q, k, v, mask, *, impl: str = "einsum", return_probs: bool = False):
    """Attention of ``q`` over ``k``/``v`` under ``mask`` (a :class:`Mask`, or for einsum/xla a dense boolean array
    broadcastable to [B, H, Lq, S]). Returns [B, Lq, H, D] in ``v``'s dtype (and the probabilities [B, H, Lq, S]
    float32 with ``return_probs``, einsum only)."""
    on = platform()
    impl = resolve(impl, on)
    if return_probs and impl != "einsum":
        raise ValueError("attention probabilities are only available with impl='einsum'")
    if impl == "einsum":
        dense = mask.dense(padding_sees=False) if isinstance(mask, Mask) else mask
        return _einsum(q, k, v, dense, return_probs)
    if not isinstance(mask, Mask):
        if impl != "xla":
            raise ValueError(f"attention impl {impl!r} takes a segment-id Mask, not a dense mask")
        return _xla(q, k, v, mask)
    if impl == "xla" or not _kernel_fits(q, k, mask):
        return _xla(q, k, v, mask.dense())
    k, v, mask = _self_keys(k, v, mask)
    if impl == "splash":
        return _splash(q, k, v, mask, interpret=on != "tpu")
    if impl == "pallas_gpu":
        return _pallas_gpu(q, k, v, mask, interpret=on != "gpu")
    return _cudnn(q, k, v, mask)


def _einsum(q, k, v, mask, return_probs: bool):
    B, Lq, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    g = H // KV
    qg = q.reshape(B, Lq, KV, g, D)
    # bf16 inputs, float32 accumulation and softmax.
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(D))
    m = jnp.broadcast_to(mask, (B, H, Lq, S)).reshape(B, KV, g, Lq, S)
    # A finite floor (not -inf) keeps fully-masked rows (padding queries) finite, as HF does.
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out.astype(v.dtype).reshape(B, Lq, H, D)
    if return_probs:
        return out, probs.reshape(B, H, Lq, S)
    return out


def _xla(q, k, v, dense):
    B, Lq, H, _ = q.shape
    mask = jnp.broadcast_to(dense, (B, H, Lq, k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _kernel_fits(q, k, mask: Mask) -> bool:
    """A self-attention block: several queries starting at cache index 0 (keys past them are then invisible under
    the causal mask), or a non-causal block of equal lengths."""
    if not mask.static_start or q.shape[1] == 1:
        return False
    if mask.causal:
        return mask.q_start == 0 and k.shape[1] >= q.shape[1]
    return k.shape[1] == q.shape[1]


def _self_keys(k, v, mask: Mask):
    """Keys/values cut to the query length (a prefill into a longer cache sees none of the empty tail)."""
    lq = mask.q_segment.shape[1]
    if k.shape[1] == lq:
        return k, v, mask
    return k[:, :lq], v[:, :lq], Mask(mask.q_segment, mask.kv_segment[:, :lq], mask.causal, 0)


def _pad_to(x, length: int, axis: int, value=0):
    if x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _fit(q, k, v, mask: Mask, length: int):
    """Pad the sequence to ``length`` for a kernel's block size; the added slots get segment -1, so they only see
    each other (never a real token, and no row is empty)."""
    q, k, v = (_pad_to(t, length, 1) for t in (q, k, v))
    qs = _pad_to(mask.q_segment.astype(jnp.int32), length, 1, -1)
    ks = _pad_to(mask.kv_segment.astype(jnp.int32), length, 1, -1)
    return q, k, v, qs, ks


def _block(length: int, largest: int = 512) -> int:
    for b in (largest, 256, 128):
        if b <= largest and length % b == 0:
            return b
    return 128


# ---- TPU: Pallas splash attention -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, heads: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    b = _block(length)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # GQA: one MQA kernel per key/value head, over that head's group of query heads. Its block tables are
    # concrete constants (built outside any trace), so the cached kernel serves every later trace.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * heads), block_sizes=sizes,
                                                interpret=interpret)


def _fold(q, k, v, mask: Mask, lanes: int):
    """Short non-causal rows (vision windows of 64 slots) side by side in rows of ``lanes``: row r of a group of f
    keeps its ids as ``id * f + r`` (all distinct, empty slots included), so nothing crosses, and the kernel fills
    its 128-lane blocks instead of padding every row to them."""
    B, L = mask.q_segment.shape
    f = lanes // L
    if mask.causal or L >= lanes or lanes % L or B % f:
        return None
    ids = mask.q_segment.astype(jnp.int32) * f + (jnp.arange(B) % f)[:, None]
    fold = lambda t: t.reshape(B // f, f * L, *t.shape[2:])
    return fold(q), fold(k), fold(v), segments_mask(fold(ids))


def _splash(q, k, v, mask: Mask, *, interpret: bool):
    folded = _fold(q, k, v, mask, 128)
    if folded is not None:
        return _splash(*folded, interpret=interpret).reshape(q.shape)
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, L, H, D = q.shape
    KV = k.shape[2]
    length = -(-L // 128) * 128  # lanes of 128
    q, k, v, qs, ks = _fit(q, k, v, mask, length)
    kernel = _splash_kernel(length, H // KV, mask.causal, interpret)
    # Splash does not scale the logits; scaling q in float32 first keeps the einsum's rounding.
    qg = (q.astype(jnp.float32) / np.sqrt(D)).astype(q.dtype).reshape(B, length, KV, H // KV, D)
    qg = qg.transpose(0, 2, 3, 1, 4)                                   # [B, KV, g, L, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, KV, L, D]
    per_head = jax.vmap(lambda qh, kh, vh, seg: kernel(qh, kh, vh, segment_ids=seg), in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(qg, kh, vh, SegmentIds(qs, ks))          # [B, KV, g, L, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, length, H, D)[:, :L].astype(v.dtype)


# ---- GPU: Pallas (Triton) flash attention ---------------------------------------------------------------------
def _pallas_gpu(q, k, v, mask: Mask, *, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    B, L, H, D = q.shape
    length = max(16, 1 << (L - 1).bit_length()) if L < 128 else -(-L // 128) * 128
    q, k, v, qs, _ = _fit(q, k, v, mask, length)
    # The kernel takes one id sequence for queries and keys (self-attention) and equal head counts.
    g = H // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    out = gpu_attention.mha(q, k, v, qs, sm_scale=float(1 / np.sqrt(D)), causal=mask.causal, interpret=interpret)
    return out[:, :L].astype(v.dtype)


# ---- GPU: cuDNN -----------------------------------------------------------------------------------------------
def _cudnn(q, k, v, mask: Mask, implementation: str = "cudnn"):
    """cuDNN takes a causal flag and per-row lengths of right-padded rows. A row whose real tokens form one
    contiguous sample (left- or right-padded) is compacted to the front by a stable per-row permutation (order,
    hence causality, is kept) and restored after. Packed rows (several ids) go as a dense mask.
    ``implementation`` lets the CPU tests run this exact path through XLA."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype} (model.dtype)")
    ks = mask.kv_segment  # self-attention: the query ids are the key ids
    one_sample = jnp.all(ks <= 1)
    order = jnp.argsort(ks == 0, axis=1, stable=True)                 # real tokens first, in order
    take = lambda t: jnp.take_along_axis(t, order.reshape(*order.shape, *([1] * (t.ndim - 2))), axis=1)
    # An empty row (a table's spare rows) gets length 1: its outputs are dropped, a zero length is undefined.
    lengths = jnp.maximum(jnp.sum(ks != 0, axis=1), 1).astype(jnp.int32)

    def compacted():
        out = jax.nn.dot_product_attention(take(q), take(k), take(v), is_causal=mask.causal,
                                           query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                           implementation=implementation)
        inverse = jnp.argsort(order, axis=1)
        return jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)

    def packed():
        dense = jnp.broadcast_to(mask.dense(), (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation=implementation)

    return jax.lax.cond(one_sample, compacted, packed)
