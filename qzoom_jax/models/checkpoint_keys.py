"""The vocabulary of a backbone's checkpoint key table: where one HF tensor goes in our pytree, and how.

Each backbone writes its table (``Backbone.checkpoint_table``) in these terms; ``checkpoints/hf_checkpoint.py``
reads and writes safetensors from it. Nothing here touches a file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# Each transform: (HF tensor -> our array, our array + HF shape -> HF tensor).
#   linear: torch Linear weight [out, in]        -> kernel [in, out]
#   conv:   Conv3d patch embed [Dv, C, T, P, P]  -> kernel [C*T*P*P, Dv]  (same flattening as pixel_values)
#   none:   norms, biases, the embedding table   -> unchanged
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, tuple], np.ndarray]]] = {
    "linear": (lambda w: w.T, lambda k, shape: k.T),
    "conv": (lambda w: w.reshape(w.shape[0], -1).T, lambda k, shape: k.T.reshape(shape)),
    "none": (lambda w: w, lambda k, shape: k),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: where it lives in our pytree and its shape in the checkpoint."""

    path: tuple[str, ...]  # leaf path in our params
    layer: int | None  # index along the leading layer axis of a stacked leaf; None = not stacked
    transform: str  # key of TRANSFORMS
    hf_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of this tensor after the transform (one layer's slice for stacked leaves)."""
        # Apply the transform to a zero-stride stand-in: same shape logic, no memory.
        return TRANSFORMS[self.transform][0](np.broadcast_to(np.int8(0), self.hf_shape)).shape


class TableBuilder:
    """Builds a key table: ``add`` one tensor, ``linear`` a torch Linear (weight, optional bias), ``layer_norm``
    a LayerNorm (weight, bias); ``decoder`` the LLM part every Qwen backbone shares (4.x spelling)."""

    def __init__(self):
        self.table: dict[str, TensorSpec] = {}

    def add(self, key: str, path: str, transform: str, hf_shape, layer: int | None = None) -> None:
        self.table[key] = TensorSpec(tuple(path.split("/")), layer, transform, tuple(hf_shape))

    def linear(self, key: str, path: str, out_dim: int, in_dim: int, bias: bool, layer: int | None = None) -> None:
        self.add(f"{key}.weight", f"{path}/kernel", "linear", (out_dim, in_dim), layer)
        if bias:
            self.add(f"{key}.bias", f"{path}/bias", "none", (out_dim,), layer)

    def layer_norm(self, key: str, path: str, dim: int, layer: int | None = None) -> None:
        self.add(f"{key}.weight", f"{path}/scale", "none", (dim,), layer)
        self.add(f"{key}.bias", f"{path}/bias", "none", (dim,), layer)

    def decoder(self, config) -> None:
        """Embeddings, the decoder stack (``models/decoder.py``'s variant from the text config), the final norm,
        the Q-Zoom branches the config enables (reference §5.1: the twig and the gate) and ``lm_head``."""
        t = config.text
        d = t.hidden_size
        q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim

        def stack(name: str, depth: int) -> None:
            for i in range(depth):
                hf, ours = f"model.{name}.{i}", f"model/{name}"
                self.add(f"{hf}.input_layernorm.weight", f"{ours}/input_layernorm/scale", "none", (d,), i)
                self.add(f"{hf}.post_attention_layernorm.weight", f"{ours}/post_attention_layernorm/scale", "none",
                         (d,), i)
                for proj, out in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                    self.linear(f"{hf}.self_attn.{proj}", f"{ours}/self_attn/{proj}", out, d, t.attention_bias, i)
                self.linear(f"{hf}.self_attn.o_proj", f"{ours}/self_attn/o_proj", d, q_dim, False, i)
                if t.qk_norm:
                    for norm in ("q_norm", "k_norm"):
                        self.add(f"{hf}.self_attn.{norm}.weight", f"{ours}/self_attn/{norm}/scale", "none",
                                 (t.head_dim,), i)
                self.linear(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate_proj", t.intermediate_size, d, False, i)
                self.linear(f"{hf}.mlp.up_proj", f"{ours}/mlp/up_proj", t.intermediate_size, d, False, i)
                self.linear(f"{hf}.mlp.down_proj", f"{ours}/mlp/down_proj", d, t.intermediate_size, False, i)

        self.add("model.embed_tokens.weight", "model/embed_tokens/embedding", "none", (t.vocab_size, d))
        stack("layers", t.num_hidden_layers)
        self.add("model.norm.weight", "model/norm/scale", "none", (d,))
        qz = config.qzoom
        if qz.enable_twig:
            stack("twig_layers", qz.twig_T)
        if qz.enable_high_res:
            stack("high_res_layers", qz.gate_T)
            self.linear("model.high_res_head", "model/high_res_head", 1, d, True)
        if not t.tie_word_embeddings:
            self.linear("lm_head", "lm_head", t.vocab_size, d, False)
