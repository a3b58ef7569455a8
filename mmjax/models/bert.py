"""BERT encoder with Hugging Face BertModel's outputs: our TextTransformer plus BERT's tanh pooler.

TextTransformer with causal=False, norm="post" is BERT's encoder exactly: word + position (0..L-1) + token-type
embeddings, embedding LayerNorm, post-LN blocks, no final LayerNorm. This module adds the pooler,
tanh(Dense(tokens[:, 0])), and returns HF's output names. `mmjax.convert.hf_bert` maps HF weights onto it.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype
from mmjax.models.text import TextTransformer

# BERT's structure; the `text` dict adds sizes (vocab_size, max_len, width, depth, heads, mlp_dim, ...).
BERT_TEXT_DEFAULTS: dict[str, Any] = dict(causal=False, norm="post", pool="cls", type_vocab_size=2,
                                          ln_epsilon=1e-12)


class BertModel(nn.Module):
    """BERT: `text_encoder` (TextTransformer) -> {"last_hidden_state", "pooler_output"}.

    `dtype`, `param_dtype`, `remat`, `remat_policy`, `attention` and `scan_layers` override the same keys in `text`
    (one setting for the whole model). Parameters: text_encoder/{embeddings, encoder} (see TextTransformer), pooler.
    """

    text: Mapping[str, Any]  # TextTransformer kwargs, over BERT_TEXT_DEFAULTS
    pooler: bool = True  # HF add_pooling_layer; False: no pooler params and no "pooler_output"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)

    def __post_init__(self) -> None:
        # Frozen so the Module stays hashable (jit static args, flax's module caching).
        object.__setattr__(self, "text", flax.core.FrozenDict(self.text))
        super().__post_init__()

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch: text_ids int [B, L], text_mask int [B, L] (1 = real; optional), text_type_ids (optional)."""
        kwargs = {**BERT_TEXT_DEFAULTS, **dict(self.text), "dtype": self.dtype, "param_dtype": self.param_dtype,
                  "remat": self.remat, "remat_policy": self.remat_policy, "attention": self.attention,
                  "scan_layers": self.scan_layers}
        _, tokens = TextTransformer(**kwargs, name="text_encoder")(
            batch["text_ids"], batch.get("text_mask"), batch.get("text_type_ids"), train=train)
        out = {"last_hidden_state": tokens}
        if self.pooler:
            pooled = heads.pooler(tokens[:, 0], dtype=self.dtype, param_dtype=self.param_dtype)
            out["pooler_output"] = layers.constrain(pooled, layers.POOLED_AXES)
        return out
