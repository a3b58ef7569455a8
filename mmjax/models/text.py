"""Text transformer encoder: CLIP-style causal or BERT-style bidirectional."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.layers import Array, Dtype


class TextTransformer(nn.Module):
    """Token + position embeddings -> Encoder -> pooling.

    causal=True: CLIP text tower (causal mask, pre-LN, final LN, pooled at the last real token by default).
    pool="eos_id" (first position whose id is `eos_token_id`) and pool="argmax_id" (position of the largest id)
    are Hugging Face CLIPTextModel's two poolings, for checkpoints converted from it (mmjax.convert.hf_clip).
    causal=False: BERT-style bidirectional encoder (pooled at the first/CLS token by default); with norm="post"
    the embedding LayerNorm is on and the final LayerNorm off, as in BERT.
    Returns `(pooled [B, width], tokens [B, L, width])`.

    Parameters: embeddings/{word_embedding [vocab_size, width], pos_embedding [max_len, width], type_embedding
    [type_vocab_size, width] (type_vocab_size > 0), ln (embed_ln)} (layers.TextEmbeddings), encoder/layer_{i}
    (encoder/layers with scan_layers),
    ln_final (final_ln).
    """

    vocab_size: int = 49408
    max_len: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: Optional[int] = None  # default 4 * width
    causal: bool = True
    pool: Optional[str] = None  # "eos" | "cls" | "mean" | "eos_id" | "argmax_id"; default "eos" / "cls" (causal / not)
    norm: str = "pre"
    embed_ln: Optional[bool] = None  # LN after embeddings (BERT); default: norm == "post"
    final_ln: Optional[bool] = None  # LN after the encoder (CLIP ln_final); default: norm == "pre"
    type_vocab_size: int = 0  # >0 adds BERT token-type embeddings (type 0 unless type_ids are given)
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Added last so positional construction keeps working: the id that pool="eos_id" looks for.
    eos_token_id: Optional[int] = None
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat); last for the same reason
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)

    @nn.compact
    def __call__(
        self,
        text_ids: Array,
        text_mask: Optional[Array] = None,
        type_ids: Optional[Array] = None,
        *,
        train: bool = False,
    ) -> tuple[Array, Array]:
        """text_ids: int [B, L]; text_mask: int [B, L] (1 = real token; default all real)."""
        pool = self.pool or ("eos" if self.causal else "cls")
        if pool not in ("eos", "cls", "mean", "eos_id", "argmax_id"):
            raise ValueError(f"pool must be one of 'eos', 'cls', 'mean', 'eos_id', 'argmax_id'; got {pool!r}")
        if pool == "eos_id" and self.eos_token_id is None:
            raise ValueError("pool='eos_id' needs eos_token_id")
        embed_ln = self.norm == "post" if self.embed_ln is None else self.embed_ln
        final_ln = self.norm == "pre" if self.final_ln is None else self.final_ln
        b, length = text_ids.shape
        if text_mask is None:
            text_mask = jnp.ones((b, length), jnp.int32)
        deterministic = not train

        # No mask passed: padded ids are embedded as given (attention masks them out of every real token).
        embeddings = layers.TextEmbeddings(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width, type_vocab_size=self.type_vocab_size,
            use_ln=embed_ln, ln_epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
            name="embeddings")
        x, _ = embeddings(text_ids, type_ids)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = layers.constrain(x)

        bias = layers.padding_bias(text_mask)  # [B, 1, 1, L]
        if self.causal:
            bias = bias + layers.causal_bias(length)  # [B, 1, L, L]
        x = layers.tower_encoder(self)(x, bias, deterministic)
        if final_ln:
            x = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_final")(x)
        tokens = layers.constrain(x)

        if pool == "cls":
            pooled = tokens[:, 0]
        elif pool == "eos":
            # Last real token (CLIP's end-of-text token when the text is right-padded).
            last = jnp.maximum(jnp.sum(text_mask, axis=-1) - 1, 0)
            pooled = jnp.take_along_axis(tokens, last[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        elif pool in ("eos_id", "argmax_id"):
            # As HF CLIPTextModel: the first eos_token_id (pads may share its id), or the largest id (OpenAI's
            # end-of-text token is the highest id of its vocabulary). argmax takes the first maximum, as torch's;
            # a text without the eos id pools at position 0, as HF does.
            hit = text_ids == self.eos_token_id if pool == "eos_id" else text_ids
            pos = jnp.argmax(hit.astype(jnp.int32), axis=-1)
            pooled = jnp.take_along_axis(tokens, pos[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        else:
            pooled = layers.masked_mean(tokens, text_mask)
        return layers.constrain(pooled, layers.POOLED_AXES), tokens
