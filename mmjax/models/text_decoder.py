"""Causal text decoder tower: word + position embeddings -> DecoderBlocks -> final LayerNorm [-> LM logits].

With cross_attention each block attends to a memory sequence (an image encoder's tokens, or a fusion model's
sequence): the multimodal decoder of captioners. Without it, the blocks are causal self-attention only: CoCa's
unimodal text decoder. decode=True caches keys and values for incremental decoding (layers.MultiHeadAttention);
the position of the next token is kept in the cache too.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype


class TextDecoder(nn.Module):
    """ids [B, T] -> {"tokens" [B, T, width], "logits" [B, T, vocab] (lm_head), "word_table" [vocab, width]}.

    Parameters: embeddings/{word_embedding, pos_embedding} (layers.TextEmbeddings, no LayerNorm),
    decoder/layer_{i} (layers.DecoderBlock), ln_final, and with lm_head: lm_bias (tied to word_embedding) or
    lm_head (untied).
    """

    vocab_size: int = 49408
    max_len: int = 77
    width: int = 512
    depth: int = 6
    heads: int = 8
    mlp_dim: Optional[int] = None  # default 4 * width
    cross_attention: bool = True
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-5
    lm_head: bool = True
    tie_embeddings: bool = True
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # layers.MultiHeadAttention.attention (decoding itself always runs "einsum")

    @nn.compact
    def __call__(self, ids: Array, mask: Optional[Array] = None, memory: Optional[Array] = None,
                 memory_mask: Optional[Array] = None, *, train: bool = False) -> dict[str, Array]:
        """ids int [B, T]; mask [B, T] (1 = real; training only, decoding has no padding); memory [B, N, width]
        and memory_mask [B, N] (1 = real; default all real) with cross_attention."""
        if self.cross_attention and memory is None:
            raise ValueError("TextDecoder with cross_attention needs `memory` (e.g. the image tokens)")
        if memory is not None and memory.shape[-1] != self.width:
            raise ValueError(f"memory width {memory.shape[-1]} != decoder width {self.width}: project it first")
        b, length = ids.shape
        deterministic = not train
        offset, bias = None, None
        if self.decode:
            created = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if created:  # a decoding step: positions continue from the cache
                offset = position.value
                position.value = position.value + length
        else:
            bias = layers.causal_bias(length)
            if mask is not None:
                bias = bias + layers.padding_bias(mask)
        x, table = layers.TextEmbeddings(vocab_size=self.vocab_size, max_len=self.max_len, width=self.width,
                                         use_ln=self.norm == "post", dtype=self.dtype, param_dtype=self.param_dtype,
                                         name="embeddings")(ids, offset=offset)
        x = layers.constrain(nn.Dropout(self.dropout_rate)(x, deterministic=deterministic))
        memory_bias = None
        if memory is not None and memory_mask is not None:
            memory_bias = layers.padding_bias(memory_mask)
        x = layers.Decoder(depth=self.depth, num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                           cross_attention=self.cross_attention, norm=self.norm, activation=self.activation,
                           dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                           ln_epsilon=self.ln_epsilon, remat=self.remat, remat_policy=self.remat_policy,
                           decode=self.decode, dtype=self.dtype, param_dtype=self.param_dtype,
                           attention=self.attention, name="decoder")(x, bias, memory, memory_bias, deterministic)
        if self.norm == "pre":
            x = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_final")(x)
        out = {"tokens": layers.constrain(x), "word_table": table}
        if self.lm_head:
            out["logits"] = heads.lm_logits(self, x, self.vocab_size, table if self.tie_embeddings else None,
                                            dtype=self.dtype, param_dtype=self.param_dtype)
        return out
